"""The architecture holds: the Sampler contract (a plain-torch sampler runs every search), the registries, layers
that no import crosses upward, a CLI whose help needs no torch, and checkpoints without pickle that grow with a round."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import noiseopt
from noiseopt.errors import BudgetError, ConfigError, SchedulerError, UnknownNameError
from noiseopt.registry import SEARCHES, VERIFIERS, list_searches, register_search, register_verifier
from noiseopt.search import CheckpointStore, RandomSearch, Search, make_search, search_state

sys.path.insert(0, str(Path(__file__).parent))
from toy import Bright, Red, ToySampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("random", "zo", "paths", "both", "steps")


# --- the Sampler contract -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", BUILTIN)
@pytest.mark.parametrize("budget", [40, 64, 97])
def test_every_search_runs_on_a_sampler_written_from_the_protocol(algo, budget):
    sampler = ToySampler(num_steps=8, batch_size=3)
    res = noiseopt.search_noise("a cat", model=sampler, verifiers=[Red(), Bright()], algo=algo, budget=budget, seed=2)
    counted = sampler.nfe + (res.nfe if algo == "steps" else 0)  # the longer schedule counts on its own sampler
    assert res.nfe <= budget and counted == res.nfe + res.baseline_nfe
    assert res.best is not None and res.baseline is not None and res.best.step == res.best.info.get("num_steps", 8)
    again = noiseopt.search_noise("a cat", model=ToySampler(num_steps=8, batch_size=1), verifiers=[Red(), Bright()],
                                  algo=algo, budget=budget, seed=2)
    def record(r):  # a candidate's pool utility is judged within its batch: all else is independent of batching
        return [{**c.to_dict(), "info": {k: v for k, v in c.info.items() if k != "pool_utility"}} for c in r.candidates]

    assert record(again) == record(res)


def test_searches_that_restart_mid_schedule_say_so():
    fixed = ToySampler(restartable=False)
    for algo in ("paths", "both"):
        with pytest.raises(SchedulerError, match=f"{algo} search needs a sampler that can stop and resume"):
            make_search(algo, fixed, [Red()])
    for algo in ("random", "zo", "steps"):
        assert noiseopt.search_noise("a cat", model=fixed, verifiers=[Red()], algo=algo, budget=40).nfe <= 40


# --- registries: one place ------------------------------------------------------------------------------------------

PLUGIN = '''
from dataclasses import dataclass
from noiseopt.registry import register_search, register_verifier
from noiseopt.search import Search, search_state

@register_verifier("greenness")
def greenness(weight: float = 1.0):
    class Green:
        name = "greenness"
        def score(self, images, prompts):
            return weight * images[:, 1].mean((1, 2))
    return Green()

@search_state
@dataclass
class Left:
    left: int

@register_search("twice")
class Twice(Search):
    def __init__(self, sampler, ensemble, per_round: int = 2, batch_size=None):
        super().__init__(sampler, ensemble, batch_size)
        self.per_round = per_round
    def begin(self, run):
        return Left(run.budget.total // self.steps)
    def advance(self, run, state):
        seeds, x = self.fresh_noise(run, min(self.per_round, state.left))
        self.sample(run, x, [[s] for s in seeds])
        return Left(state.left - len(seeds)) if state.left > len(seeds) else None
'''


def test_a_verifier_and_a_search_registered_in_one_place_are_used_by_name():
    namespace = {"__name__": "my_plugin"}
    exec(PLUGIN, namespace)  # the plugin file's code, run in this process: its decorators register the names
    try:
        res = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=["greenness:weight=2", Red()],
                                    algo="twice:per_round=2", budget=40)
        assert res.algo == "twice" and res.settings["verifiers"] == ["greenness", "red"] and len(res.candidates) == 5
        with pytest.raises(UnknownNameError, match="verifier 'greenness' has no option 'wieght': its options are weight"):
            noiseopt.search_noise("a cat", model=ToySampler(), verifiers=["greenness:wieght=2"], algo="twice", budget=40)
    finally:
        VERIFIERS.unregister("greenness")
        SEARCHES.unregister("twice")
    assert "twice" not in list_searches()

    class NotADataclass:
        pass

    with pytest.raises(ConfigError, match="must be a dataclass"):
        search_state(NotADataclass)



def noiseopt_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "noiseopt.cli", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_the_cli_uses_a_plugins_verifier_and_search(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    done = noiseopt_cli("--plugin", str(plugin), "search", "a red circle", "--algo", "twice:per_round=3",
                        "--verifiers", "clip,greenness:weight=2", "--budget", "100", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "result.json").read_text())
    assert record["algo"] == "twice" and record["settings"]["per_round"] == 3
    assert record["settings"]["verifiers"] == ["clip", "greenness"] and len(record["candidates"]) == 4
    bad = noiseopt_cli("--plugin", str(plugin), "search", "a red circle", "--algo", "twice:rounds=3", "--out",
                       str(tmp_path / "bad"))
    assert bad.returncode == 2 and "search 'twice' has no option 'rounds': its options are per_round" in bad.stderr


def test_an_installed_package_registers_through_entry_points(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "my_verifier").mkdir(parents=True)
    (pkg / "my_verifier" / "__init__.py").write_text(
        "class Dark:\n    name = 'dark'\n    def score(self, images, prompts):\n        return -images.mean((1, 2, 3))\n")
    info = pkg / "my_verifier-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-verifier\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[noiseopt.verifiers]\ndark = my_verifier:Dark\n")
    code = ("import sys; from noiseopt.registry import list_verifiers, VERIFIERS; "
            "assert 'dark' in list_verifiers(); print(VERIFIERS.create('dark').name); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(pkg)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dark", "False"]  # listing and making it imported no torch


def test_names_and_options_are_checked_before_anything_loads(monkeypatch):
    import noiseopt.shapes

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the names were checked")

    monkeypatch.setattr(noiseopt.shapes, "load_sampler", boom)
    monkeypatch.setattr(noiseopt.shapes, "load_clip", boom)
    cases = [dict(verifiers=["beauty"]), dict(verifiers=["clip:scael=3"]), dict(algo="genetic"),
             dict(algo="random", paths=5), dict(algo="zo:lamda=0.5"), dict(dtype="fp16")]
    for kwargs in cases:
        with pytest.raises(UnknownNameError) as e:
            noiseopt.search_noise("a red circle", **kwargs)
        assert "choose from" in str(e.value) or "its options are" in str(e.value), str(e.value)


# --- layers --------------------------------------------------------------------------------------------------------

def layer_table() -> dict[str, int]:
    "Reads the layer table of the architecture notebook: module name -> layer."
    nb = json.loads((ROOT / "nbs" / "00_architecture.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    section = text.split("## Layers", 1)[1].split("## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            table[cells[1].strip("`")] = int(cells[0])
    return table


def module_name(path: Path, root: Path = ROOT / "noiseopt") -> str:
    "Returns the dotted name of a package file as the layer table writes it: `searches.core`, `searches` for its `__init__`."
    parts = path.relative_to(root).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts
    return ".".join(parts)


def package_modules(root: Path = ROOT / "noiseopt") -> dict[str, Path]:
    "Returns every module of the package (subpackages included) by its dotted name."
    return {module_name(p, root): p for p in root.rglob("*.py") if p.name != "_modidx.py" and "assets" not in p.parts}


def package_imports(path: Path, module: str, known=None) -> set[str]:
    """Returns the noiseopt modules that `path` imports anywhere, function bodies included, as dotted names.

    `from noiseopt.searches import core` names `searches.core` where such a module exists, else `searches`."""
    known = set(package_modules()) if known is None else set(known)
    package = module.split(".") if path.name == "__init__.py" and module != "__init__" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["noiseopt", *package[: len(package) - (node.level - 1)]]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "noiseopt" or len(parts) < 2:
                continue
            # the longest prefix that is a module: `noiseopt.searches.core.Run` -> searches.core
            for k in range(len(parts), 1, -1):
                if ".".join(parts[1:k]) in known:
                    found.add(".".join(parts[1:k]))
                    break
    found.discard(module)
    return found


def import_graph(root: Path = ROOT / "noiseopt") -> dict[str, set[str]]:
    "Returns, for every module of the package under `root`, the package modules it imports."
    modules = package_modules(root)
    return {m: package_imports(p, m, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "Returns the import cycles of `graph` (each as the list of modules around it), one per strongly connected group."
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_above_it():
    table = layer_table()
    modules = set(package_modules())
    assert modules == set(table), f"modules missing from the map: {modules - set(table)}; gone: {set(table) - modules}"
    graph = import_graph()
    upward = [f"{m} (layer {table[m]}) imports {t} (layer {table[t]})"
              for m in sorted(modules) for t in sorted(graph[m]) if t in table and table[t] > table[m]]
    assert not upward, upward


def test_no_two_modules_import_each_other():
    assert cycles(import_graph()) == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "core.py"
    bad.write_text("def f():\n    from noiseopt.runspec import search_noise\n    from .viz import trajectory\n")
    assert package_imports(bad, "core", {"core", "runspec", "viz"}) == {"runspec", "viz"}


def test_the_cycle_check_catches_two_modules_of_one_layer_importing_each_other(tmp_path):
    (tmp_path / "searches").mkdir()
    (tmp_path / "searches" / "__init__.py").write_text("from .core import Search\n")
    (tmp_path / "searches" / "core.py").write_text("class Search:\n    pass\n")
    (tmp_path / "viz.py").write_text("def plot():\n    from noiseopt.bench import method_label\n")
    (tmp_path / "bench.py").write_text("from .searches.core import Search\n\ndef table():\n    from .viz import plot\n")
    graph = import_graph(tmp_path)
    assert graph["searches"] == {"searches.core"} and graph["bench"] == {"searches.core", "viz"}
    assert cycles(graph) == [["bench", "viz"]]
    (tmp_path / "viz.py").write_text("def plot():\n    pass\n")
    assert cycles(import_graph(tmp_path)) == []


HELP = """
import sys
from noiseopt.cli import main
for argv in ([], ["--help"], ["search", "--help"], ["bench", "--help"], ["sweep", "--help"], ["info", "--help"],
             ["bench-verifiers", "--help"], ["bench-gpu", "--help"], ["shapes", "--help"], ["shapes", "train", "--help"], ["shapes", "eval", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
import noiseopt.bench, noiseopt.benchmarks.run  # the old path and `python -m noiseopt.bench`'s module
print("TORCH" if "torch" in sys.modules else "NO-TORCH")
"""


def test_help_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("NO-TORCH")
    assert "registered: beam, both, cem, paths, prune, random, smc, steps, zo" in " ".join(done.stdout.split())  # the registry's


# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_a_rounds_checkpoint_grows_with_its_candidates_not_with_the_run(tmp_path):
    writes = []

    def measure(search, run):
        writes.append(search_store_bytes(tmp_path / "run"))

    sampler = ToySampler(num_steps=4, batch_size=1, size=16)
    RandomSearch(sampler, [Red()]).run("a cat", 4 * 24, out=tmp_path / "run", callback=measure)
    per_round = [b - a for a, b in zip(writes, writes[1:])]
    assert len(per_round) == 24
    # every round makes one candidate: its bytes are the same in round 1 and round 24, not proportional to the run
    assert max(per_round) <= 1.1 * min(per_round), per_round
    assert not [p for p in (tmp_path / "run").rglob("*") if p.suffix in (".pt", ".pkl", ".pickle")]


def search_store_bytes(folder: Path) -> int:
    "Bytes of the files a checkpoint added: the candidates' files and records (the state is rewritten, not added)."
    files = [p for p in folder.rglob("*") if p.is_file() and p.name not in (CheckpointStore.STATE, CheckpointStore.STATE_TENSORS)]
    return sum(p.stat().st_size for p in files)


def test_store_counts_what_it_writes_per_round(tmp_path):
    counts = []
    sampler = ToySampler(num_steps=4, batch_size=2, size=16)
    search = make_search("zo:neighbors=2", sampler, [Red()])
    original = CheckpointStore.append

    def spy(self, candidates, first):
        before = self.bytes_written
        original(self, candidates, first)
        counts.append((len(candidates), self.bytes_written - before))

    CheckpointStore.append = spy
    try:
        search.run("a cat", 4 * 20, out=tmp_path / "zo")
    finally:
        CheckpointStore.append = original
    per_candidate = [b / n for n, b in counts if n]
    assert max(per_candidate) <= 1.1 * min(per_candidate), counts


def test_resume_refuses_other_settings_and_never_unpickles(tmp_path):
    sampler = ToySampler(num_steps=4)
    RandomSearch(sampler, [Red()]).run("a cat", 20, out=tmp_path / "r")
    with pytest.raises(ConfigError, match="holds another run \\(prompt: 'a cat' in the folder, 'a dog' now\\)"):
        RandomSearch(sampler, [Red()]).run("a dog", 20, out=tmp_path / "r")
    (tmp_path / "r" / "state.json").write_text('{"__reduce__": "os.system"}')  # not a checkpoint: refused, not run
    with pytest.raises(ConfigError, match="holds no readable noiseopt checkpoint"):
        RandomSearch(sampler, [Red()]).run("a cat", 20, out=tmp_path / "r")


def test_budget_errors_name_the_minimum():
    with pytest.raises(BudgetError, match="at least 8 NFEs"):
        noiseopt.search_noise("a cat", model=ToySampler(num_steps=8), verifiers=[Red()], budget=7)


def test_offloaded_verifiers_score_as_before_and_rest_on_the_cpu():
    from torch import nn

    class Head:
        name = "head"

        def __init__(self):
            torch.manual_seed(0)
            self.parts = (nn.Linear(3, 1),)

        def score(self, images, prompts):
            return self.parts[0](images.mean((2, 3))).squeeze(1).detach()

    seen = []
    plain = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Head()], budget=24)
    off = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Head()], budget=24, offload_verifiers=True,
                                callback=lambda s, r: seen.append(s.ensemble.verifiers[0]))
    assert [c.scores for c in off.candidates] == [c.scores for c in plain.candidates]
    assert type(seen[0]).__name__ == "OffloadedVerifier" and seen[0].name == "head" and len(seen[0].modules) == 1


# --- notebooks read as documentation --------------------------------------------------------------------------------

def heading_lines(markdown: str, first_cell: bool) -> list[str]:
    """Returns the lines of a markdown cell that render as top-level headings where prose was meant: `#` alone, or a
    `# ` line anywhere but the notebook's title (the first line of its first cell); fenced code is skipped."""
    out, fence = [], False
    for j, line in enumerate(markdown.split("\n")):
        if line.startswith("```"):
            fence = not fence
        elif not fence and (line.strip() == "#" or (line.startswith("# ") and not (first_cell and j == 0))):
            out.append(line)
    return out


def test_markdown_renders_as_prose_not_as_headings():
    bad = []
    for path in sorted((ROOT / "nbs").rglob("*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]
        for k, cell in enumerate(cells):
            lines = heading_lines("".join(cell["source"]), first_cell=k == 0)
            if lines:
                bad.append(f"{path.relative_to(ROOT)} markdown cell {k}: {lines[0][:60]!r}")
    assert not bad, bad


def test_the_markdown_check_catches_a_body_written_as_comments():
    assert heading_lines("## The loop\n#\n# Each round samples", first_cell=False) == ["#", "# Each round samples"]
    assert heading_lines("# search\n\n> summary\n\n```\n# a comment in code\n```", first_cell=True) == []


DIRECTIVES_WITHOUT_OUTPUT = ("export", "exporti", "default_exp", "hide", "gpu", "slow", "net", "eval:")


def examples_without_output(notebook: dict) -> list[str]:
    "Returns the first line of each example cell (not exported, hidden or skipped by the tests) that shows no output."
    out = []
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        directives = [line.split()[1] for line in source.splitlines() if line.startswith("#|") and len(line.split()) > 1]
        if cell["cell_type"] == "code" and not any(d in DIRECTIVES_WITHOUT_OUTPUT for d in directives) and not cell.get("outputs"):
            out.append(source.strip().splitlines()[0] if source.strip() else "(empty)")
    return out


def test_every_example_shows_its_output():
    bare = {str(p.relative_to(ROOT)): examples_without_output(json.loads(p.read_text()))
            for p in sorted((ROOT / "nbs").rglob("*.ipynb"))}
    assert not {k: v for k, v in bare.items() if v}, "run .ci/execute_notebook.py on these notebooks: " + repr(bare)


def test_the_output_check_catches_a_bare_example():
    nb = {"cells": [{"cell_type": "code", "source": ["#| export\n", "x = 1"], "outputs": []},
                    {"cell_type": "code", "source": ["assert x == 1"], "outputs": []},
                    {"cell_type": "code", "source": ["#| gpu\n", "run()"], "outputs": []},
                    {"cell_type": "code", "source": ["x"], "outputs": [{"output_type": "execute_result"}]}]}
    assert examples_without_output(nb) == ["assert x == 1"]
