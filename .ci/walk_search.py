#!/usr/bin/env python
"""The walk of `noiseopt search`'s arguments from the command line to result.json, measured (issue 22).

Rule. `noiseopt search PROMPT --algo zo --guidance 3.5 --verifiers clip:scale=3,aesthetic --budget 300 --out DIR` runs in this process under a tracer.
The arguments are followed by identity: the parsed `Namespace`, the `RunSpec` made from it (the class, for
`from_args`, and its instances, with the values of its fields), the spec's record (`SpecRecord`) and each value given on the command line (fresh
objects, so that no other value shares their identity). A call is on the walk when one of its arguments (`self`
included) is one of them. The walk is the wiring: it follows the arguments until the model first computes on one,
the prompt's conditioning (the Sampler protocol's `condition`, where the prompt meets the text encoder): from there
the objects the arguments were turned into are at work (the prompt reaching the text encoder and the verifiers is
the search, not its wiring), and the walk follows only the spec and its record, to the write of result.json,
which ends it. (Following the prompt into the text encoder too adds two moves: searches.core -> samplers'
`condition`, samplers -> models.core's `encode`.)

A move is a module calling a function of another module on the walk; the same two modules in the same direction
count once, however many functions or times. A climb is a move into a module of a higher layer, by the
architecture notebook's table (an object or callback handed down and called back, since no import goes up).

Usage: python .ci/walk_search.py   (prints the moves in the order first made, then the counts)"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_architecture import layer_table  # the architecture notebook's layer table

import noiseopt
from noiseopt.cli import main
from noiseopt.runspec import RunSpec
from noiseopt.searches.core import SpecRecord

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


fresh = lambda text: "".join(list(text))  # noqa: E731  a new str object, not the interned literal
argv = ["search", fresh("a red circle left of a blue square"), "--algo", fresh("zo"), "--guidance", fresh("3.5"),
        "--verifiers", fresh("clip:scale=3,aesthetic"),
        "--budget", fresh("300"), "--out", str(Path(tempfile.mkdtemp()) / "run"), "--quiet"]
values = {id(a): a for a in argv[1:]}  # and what argparse makes of them, added when the Namespace is first seen


def carried(frame) -> bool:
    "Whether the call of `frame` receives one of the arguments."
    code, loc = frame.f_code, frame.f_locals
    n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
    wiring = not ended_wiring
    for name in code.co_varnames[:n]:
        v = loc.get(name)
        if isinstance(v, argparse.Namespace):
            # what argparse made of the given values: the numbers it parsed (new objects; the strings are the given ones)
            values.update({id(x): x for x in vars(v).values() if isinstance(x, float) or
                           (isinstance(x, int) and not isinstance(x, bool) and abs(x) > 256)})
            return True
        if isinstance(v, RunSpec) and id(v) not in specs:  # its fields are the arguments too, defaults made explicit
            specs.add(id(v))
            for x in (getattr(v, k) for k in RunSpec.WHAT):
                for y in (x if isinstance(x, tuple) else (x,)):
                    if isinstance(y, (str, float)) or (isinstance(y, int) and not isinstance(y, bool) and abs(y) > 256):
                        values[id(y)] = y
        if v is RunSpec or isinstance(v, (RunSpec, SpecRecord)):
            return True
        if wiring:
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else (v,)
            if any(values.get(id(x), values) is x for x in items):
                return True
    return False


stack, moves, ended_wiring, ended, specs = [], {}, [], [], set()


def tracer(frame, event, arg):
    if ended:
        return None
    callee = module_of(frame.f_code)
    if not callee:
        return None
    frame.f_trace_lines = False
    fn = frame.f_code.co_qualname
    caller = stack[-1] if stack else None
    if fn.split(".")[-1] == "condition":  # the model's first computation on an argument: the wiring is done
        ended_wiring.append(fn)
    done = callee == "core" and fn == "SearchResult.save"
    on_walk = done or carried(frame)  # asked of every call: a call within one module may be the first to see a value
    if on_walk and caller and caller != callee and (caller, callee) not in moves:
        moves[(caller, callee)] = fn
    if done:
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
if not ended:
    raise SystemExit("result.json was never written: the search failed before it")
climbs = [(a, b) for a, b in moves if table.get(b, -1) > table.get(a, 99)]
for (a, b), fn in moves.items():
    print(f"  {a} (L{table.get(a)}) -> {b} (L{table.get(b)}).{fn}{'   CLIMB' if (a, b) in climbs else ''}")
print(f"exit {code}; the walk of the arguments to result.json: {len(moves)} moves, of which {len(climbs)} climbs")
