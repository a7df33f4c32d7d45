#!/usr/bin/env python
"""Writes README.md from nbs/index.ipynb with nbconvert (Quarto, nbdev's usual tool, is not used).

Cells marked `#| hide` are left out and nbdev's `#|` directives are stripped; links relative to nbs/
(images/, tutorials/, bench/) are made relative to the repository's root. With --check, exits 1
instead of writing when README.md is not what the notebook makes."""
import argparse
import re
import sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent


def render(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    cells = []
    for cell in nb.cells:
        lines = cell.source.splitlines()
        directives = [line for line in lines if line.startswith("#|")]
        if any(d.replace(" ", "") in ("#|hide", "#|exporti", "#|export") for d in directives):
            continue
        cell.source = "\n".join(line for line in lines if not line.startswith("#|")).strip("\n")
        if cell.cell_type == "code":
            cell.outputs = []
        cells.append(cell)
    nb.cells = cells
    nb.metadata["language_info"] = {"name": "python"}
    body, _ = MarkdownExporter().from_notebook_node(nb)
    # links relative to nbs/ (images, tutorials, benchmark files) are relative to the root in README.md
    body = re.sub(r"\]\((images|tutorials|bench)/", r"](nbs/\1/", body)
    header = "<!-- generated from nbs/index.ipynb by .ci/build_readme.py: edit the notebook, not this file -->\n\n"
    return header + body.strip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail instead of writing if README.md is stale")
    args = parser.parse_args()
    text = render(ROOT / "nbs" / "index.ipynb")
    readme = ROOT / "README.md"
    if args.check:
        if not readme.is_file() or readme.read_text(encoding="utf-8") != text:
            print("README.md is not what nbs/index.ipynb makes: run python .ci/build_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
