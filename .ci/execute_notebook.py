#!/usr/bin/env python
"""Runs notebooks in place and saves their outputs, so the docs show figures and printed results.

Cells flagged with one of settings.ini's `tst_flags` (`#| gpu`, `#| slow`) or `#| eval: false` are
skipped, as `nbdev_test` skips them. Usage: python .ci/execute_notebook.py nbs/02_shapes.ipynb ..."""
import os
import sys
from configparser import ConfigParser
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parent.parent


def skip_flags() -> set[str]:
    cfg = ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())


def skipped(cell, flags: set[str]) -> bool:
    if cell.cell_type != "code":
        return True
    for line in cell.source.splitlines():
        if not line.startswith("#|"):
            continue
        words = line[2:].replace(":", ": ").split()
        if words and (words[0] in flags or (words[0] == "eval:" and words[1:2] == ["false"])):
            return True
    return False


def main(paths: list[str]) -> int:
    flags = skip_flags()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for path in map(Path, paths):
        nb = read_nb(path)
        shell = CaptureShell(path)
        cwd = os.getcwd()
        os.chdir(path.parent)
        try:
            shell.run_all(nb, exc_stop=True, preproc=lambda c: skipped(c, flags))
        finally:
            os.chdir(cwd)
        write_nb(nb, path)
        print(f"executed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
