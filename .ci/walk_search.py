#!/usr/bin/env python
"""The walk of `noiseopt search`'s arguments from the command line to result.json, measured (issue 22).

Rule. `noiseopt search PROMPT --algo zo:lam=0.9 --guidance 3.5 --verifiers clip:scale=3,aesthetic --steps 10
--budget 300 --seed 7 --device cpu --out DIR` runs in this process (the working tree's noiseopt) under a tracer.
The arguments are followed by identity: the parsed `Namespace`, the `RunSpec` made from it (the class, for
`from_args`, and its instances, with the values of its fields), the spec's record (`SpecRecord`) and each value
given on the command line: the strings as given (fresh objects), the numbers argparse made of them (an integer is
put back into the `Namespace` as an `int` subclass, so that a small one, which Python shares, can be told apart;
`int()` of it is a plain int, which is followed no further). A call is on the walk when one of its arguments
(`self` included) is one of them, or a tuple, list or dict holding one.

Identity can only add moves, never hide one: the spec's defaults are often interned strings (`"shapes"`, `"rank"`),
which other calls may receive too. A call is seen only where Python runs a function of a noiseopt file (a
dataclass's generated `__init__` is not), and only on the main thread.

A move is a module calling a function of another module on the walk; the same two modules in the same direction
count once, however many functions or times. A climb is a move into a module of a higher layer, by the
architecture notebook's table (an object or callback handed down and called back, since no import goes up).

Two counts are printed:
- the wiring: the walk until the model first computes on an argument, the prompt's conditioning (the first call
  of a function named `condition`: the Sampler protocol's); after it only the `Namespace`, the spec and its record
  are followed, to the write of result.json;
- the whole walk: every argument followed to the write of result.json, the prompt into the text encoder, the
  verifiers and the checker included.

Usage: python .ci/walk_search.py   (prints the moves in the order first made, then the two counts)"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from test_architecture import layer_table  # noqa: E402  the architecture notebook's layer table

import noiseopt  # noqa: E402
from noiseopt.cli import main  # noqa: E402
from noiseopt.runspec import RunSpec  # noqa: E402
from noiseopt.searches.core import SpecRecord  # noqa: E402

ROOT = str(Path(noiseopt.__file__).parent) + "/"
table = layer_table()
_modules = {}


def module_of(code) -> str:
    "The noiseopt module of a code object ('' outside noiseopt)."
    m = _modules.get(code)
    if m is None:
        m = ""
        if code.co_filename.startswith(ROOT):
            parts = code.co_filename[len(ROOT):].removesuffix(".py").split("/")
            m = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        _modules[code] = m
    return m


class Given(int):
    "An integer given on the command line: equal to it, told apart from it by identity."


fresh = lambda text: "".join(list(text))  # noqa: E731  a new str object, not an interned literal
tmp = Path(tempfile.mkdtemp())
argv = ["search", fresh("a red circle left of a blue square"), "--algo", fresh("zo:lam=0.9"), "--guidance",
        fresh("3.5"), "--verifiers", fresh("clip:scale=3,aesthetic"), "--steps", fresh("10"), "--budget", fresh("300"),
        "--seed", fresh("7"), "--device", fresh("cpu"), "--out", str(tmp / "run"), "--quiet"]
values = {id(a): a for a in argv[1:] if not a.startswith("--")}
trackable = lambda x: isinstance(x, (str, float, Given)) or (  # noqa: E731
    isinstance(x, int) and not isinstance(x, bool) and abs(x) > 256)
namespaces, specs = set(), set()


def carried(frame, wiring: bool) -> bool:
    "Whether the call of `frame` receives one of the arguments (after the wiring: the Namespace, the spec, its record)."
    code, loc = frame.f_code, frame.f_locals
    n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
    for name in code.co_varnames[:n]:
        v = loc.get(name)
        if isinstance(v, argparse.Namespace):
            if id(v) not in namespaces:  # what argparse made of the given values
                namespaces.add(id(v))
                for key, x in vars(v).items():
                    if isinstance(x, int) and not isinstance(x, bool) and f"--{key.replace('_', '-')}" in argv:
                        setattr(v, key, x := Given(x))
                    if isinstance(x, float) or isinstance(x, Given):
                        values[id(x)] = x
            return True
        if isinstance(v, RunSpec) and id(v) not in specs:  # its fields are the arguments too, defaults made explicit
            specs.add(id(v))
            for x in (getattr(v, k) for k in RunSpec.WHAT):
                values.update({id(y): y for y in (x if isinstance(x, tuple) else (x,)) if trackable(y)})
        if v is RunSpec or isinstance(v, (RunSpec, SpecRecord)):
            return True
        if wiring:
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else (v,)
            if any(values.get(id(x), values) is x for x in items):
                return True
    return False


class Walk:
    "The moves of one reading of the walk: `wiring` stops following values at the prompt's conditioning."

    def __init__(self, wiring: bool):
        self.wiring, self.wired, self.moves = wiring, False, {}

    def see(self, caller, callee, fn, frame):
        if fn.split(".")[-1] == "condition":  # the model's first computation on an argument
            self.wired = True
        on_walk = fn == "SearchResult.save" or carried(frame, not (self.wiring and self.wired))
        if on_walk and caller and caller != callee and (caller, callee) not in self.moves:
            self.moves[(caller, callee)] = fn

    def climbs(self):
        return [(a, b) for a, b in self.moves if table.get(b, -1) > table.get(a, 99)]


walks, stack, ended = (Walk(wiring=True), Walk(wiring=False)), [], []


def tracer(frame, event, arg):
    if ended:
        return None
    callee = module_of(frame.f_code)
    if not callee:
        return None
    frame.f_trace_lines = False
    fn = frame.f_code.co_qualname
    caller = stack[-1] if stack else None
    for walk in walks:  # each asks of every call: a call within one module may be the first to see a value
        walk.see(caller, callee, fn, frame)
    if callee == "core" and fn == "SearchResult.save":  # result.json is written: the walk ends
        ended.append(fn)
        return None
    stack.append(callee)

    def on_return(frame, event, arg):
        if event == "return":
            stack.pop()
        return None
    return on_return


sys.settrace(tracer)
try:
    code = main(argv)
finally:
    sys.settrace(None)
    shutil.rmtree(tmp, ignore_errors=True)
if not ended:
    raise SystemExit("result.json was never written: the search failed before it")
unplaced = sorted({m for walk in walks for move in walk.moves for m in move if m not in table})
if unplaced:  # a module the architecture notebook's table does not place could hide a climb
    raise SystemExit(f"modules on the walk without a layer in the architecture notebook's table: {unplaced}")
wiring, whole = walks
for (a, b), fn in whole.moves.items():
    print(f"  {a} (L{table.get(a)}) -> {b} (L{table.get(b)}).{fn}{'   CLIMB' if (a, b) in whole.climbs() else ''}"
          f"{'' if (a, b) in wiring.moves else '   (after the wiring)'}")
print(f"exit {code}; the wiring of the arguments: {len(wiring.moves)} moves, of which {len(wiring.climbs())} climbs")
print(f"exit {code}; the whole walk of the arguments to result.json: {len(whole.moves)} moves, "
      f"of which {len(whole.climbs())} climbs")
