#!/usr/bin/env python
"""The walk of `noiseopt search`'s arguments from the command line to result.json, measured: every distinct move from
one noiseopt module to another (a function of one calling a function of the other) until result.json is written, and
the climbs among them (a move to a module of a higher layer, by the architecture notebook's table: an object or
callback handed down, since no import goes up). Usage: python .ci/walk_search.py"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_architecture import layer_table  # the architecture notebook's layer table
import noiseopt

ROOT = Path(noiseopt.__file__).parent
table = layer_table()


def module_of(code):
    try:
        rel = Path(code.co_filename).resolve().relative_to(ROOT)
    except ValueError:
        return None
    parts = rel.with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts
    return ".".join(parts)


edges, order, cut = set(), [], []


def prof(frame, event, arg):
    if event != "call":
        return
    callee = module_of(frame.f_code)
    caller = frame.f_back and module_of(frame.f_back.f_code)
    if callee == "core" and frame.f_code.co_name == "save" and not cut:
        cut.append(len(order))  # result.json is being written: the walk ends here
    if callee and caller and callee != caller and (caller, callee) not in edges:
        edges.add((caller, callee))
        order.append((caller, callee, frame.f_code.co_name))


from noiseopt.cli import main

out = Path(tempfile.mkdtemp()) / "run"
sys.setprofile(prof)
code = main(["search", "a red circle left of a blue square", "--algo", "zo", "--guidance", "3", "--budget", "50",
             "--out", str(out), "--quiet"])
sys.setprofile(None)
# the moves until result.json is written: plotting after it (viz) is not part of the walk
if not cut:
    raise SystemExit("result.json was never written: the search failed before it")
walk = order[: cut[0]]
climbs = [(a, b, fn) for a, b, fn in walk if table.get(b, -1) > table.get(a, 99)]
print(f"exit {code}; moves between modules up to result.json: {len(walk)}, of which climbs: {len(climbs)}")
for a, b, fn in walk:
    print(f"  {a} (L{table.get(a)}) -> {b} (L{table.get(b)}).{fn}{'   CLIMB' if (a, b, fn) in climbs else ''}")
