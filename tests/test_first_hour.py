"""A new user's first hour: Ctrl-C keeps every finished batch, resumes say where they start, no empty files,
progress where a person watches, readable pictures, threads, and errors before anything loads."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy import Red, ToySampler  # noqa: E402

from noiseopt.searches import make_search  # noqa: E402


class StopAt(ToySampler):
    "A toy sampler that raises KeyboardInterrupt (as Ctrl-C does) at its `stop_at`-th denoise call."

    def __init__(self, stop_at=None, **kw):
        super().__init__(**kw)
        self.stop_at, self.calls = stop_at, 0

    def denoise(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().denoise(*args, **kwargs)


@pytest.mark.parametrize("algo", ["zo:neighbors=4", "paths:paths=2,per_path=2,start_step=2,forward=2,backward=3"])
def test_ctrl_c_keeps_the_finished_batches_of_a_round_and_the_resume_reuses_them(tmp_path, algo, capsys):
    "A round of several batches used to lose its finished batches to Ctrl-C; now they are saved and reused."
    from noiseopt.errors import Interrupted
    budget = 60
    full = make_search(algo, StopAt(num_steps=6, batch_size=2), [Red()]).run("a cat", budget, seed=4)
    out = tmp_path / "run"
    for stop_at in (3, 4, 5, 6, 7, 9, 10**6):  # stop the same run again and again, at a later batch each time
        sampler = StopAt(stop_at, num_steps=6, batch_size=2)
        try:
            res = make_search(algo, sampler, [Red()]).run("a cat", budget, seed=4, out=out, progress=True)
            break
        except Interrupted as e:
            assert e.folder == out and e.budget == budget
            assert not (out / "state.safetensors").exists() or (out / "state.safetensors").stat().st_size > 0
    else:
        pytest.fail("the run never finished")
    err = capsys.readouterr().err
    assert "resuming the run in" in err and "of the round in progress kept" in err, err
    assert [c.scores for c in res.candidates] == [c.scores for c in full.candidates]
    assert res.best_index == full.best_index and res.nfe == full.nfe
    assert not (out / "batches.json").exists()  # dropped once their round was saved whole


def test_an_interrupt_saves_the_batches_and_says_what_it_kept(tmp_path):
    from noiseopt.errors import Interrupted

    out = tmp_path / "run"
    sampler = StopAt(5, num_steps=6, batch_size=2)  # the 2nd batch of a round of two
    with pytest.raises(Interrupted) as e:  # still a KeyboardInterrupt for code that catches those
        make_search("zo:neighbors=4", sampler, [Red()]).run("a cat", 60, seed=4, out=out)
    assert isinstance(e.value, KeyboardInterrupt)
    kept = json.loads((out / "batches.json").read_text())
    assert e.value.batches == len(kept["batches"]) >= 1 and e.value.candidates > 0
    assert f"{e.value.candidates} candidates" in str(e.value) and "run the same command again" in str(e.value)
    with pytest.raises(Interrupted, match="nothing was saved"):
        make_search("random", StopAt(1, num_steps=6, batch_size=2), [Red()]).run("a cat", 30, seed=4)


def test_batches_of_a_first_round_are_kept_for_the_same_run_only(tmp_path, capsys):
    "A stop inside a search's first round (no state saved yet) used to recompute its finished batches."
    from noiseopt.errors import ConfigError, Interrupted

    algo, out = "paths:paths=4,per_path=1,start_step=3,forward=2,backward=3", tmp_path / "run"
    full = StopAt(num_steps=6, batch_size=2)
    expected = make_search(algo, full, [Red()]).run("a cat", 60, seed=4)
    with pytest.raises(Interrupted, match="1 finished batch of the round in progress"):
        make_search(algo, StopAt(3, num_steps=6, batch_size=2), [Red()]).run("a cat", 60, seed=4, out=out)
    assert not (out / "state.json").exists() and (out / "batches.json").exists()
    with pytest.raises(ConfigError, match="holds another run"):  # another prompt's batches are never reused
        make_search(algo, StopAt(num_steps=6, batch_size=2), [Red()]).run("a dog", 60, seed=4, out=out)
    again = StopAt(num_steps=6, batch_size=2)
    res = make_search(algo, again, [Red()]).run("a cat", 60, seed=4, out=out, progress=True)
    assert "1 finished batch of the round in progress kept" in capsys.readouterr().err
    assert again.calls == full.calls - 1 and res.report["resumed"]["reused_batches"] == 1  # one batch not recomputed
    assert [c.scores for c in res.candidates] == [c.scores for c in expected.candidates] and res.nfe == expected.nfe


def test_an_interrupt_keeps_batches_of_a_search_whose_settings_json_cannot_hold(tmp_path):
    "A setting that is not plain JSON (a Path) turned Ctrl-C into a TypeError and a half-written checkpoint."
    from noiseopt.errors import Interrupted
    from noiseopt.searches import ZeroOrderSearch

    class Tagged(ZeroOrderSearch):
        def __init__(self, sampler, ensemble, tag: Path = Path("/x"), **kw):
            super().__init__(sampler, ensemble, **kw)
            self.tag = tag

    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="1 finished batch"):
        Tagged(StopAt(5, num_steps=6, batch_size=2), [Red()], neighbors=4).run("a cat", 60, seed=4, out=out)
    assert json.loads((out / "batches.json").read_text())["settings"]["tag"] == "/x"


def test_a_finished_run_leaves_no_empty_file(tmp_path):
    "A finished run used to leave a 0-byte state.safetensors."
    for algo in ("random", "zo:neighbors=2"):
        out = tmp_path / algo.split(":")[0]
        make_search(algo, ToySampler(num_steps=6, batch_size=2), [Red()]).run("a cat", 36, seed=1, out=out)
        empty = [p.name for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0]
        assert not empty, empty


def cli(*args, env=None, timeout=300):
    "Runs the noiseopt command in a fresh process; returns (completed process, seconds)."
    t = time.perf_counter()
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    base = {k: v for k, v in os.environ.items() if k not in proxies}  # the hub checks below probe directly
    proc = subprocess.run([sys.executable, "-m", "noiseopt.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**base, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc, time.perf_counter() - t


def test_a_bad_budget_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    "--budget 0 and --budget -5 used to be reported after 4.5 s of model loading."
    import noiseopt
    from noiseopt.errors import BudgetError
    from noiseopt.runspec import RunSpec

    def build(self, entry=None):
        raise AssertionError("the model would load before the budget was checked")

    monkeypatch.setattr(RunSpec, "build", build)
    for budget, algo in ((0, "random"), (-5, "zo"), (24, "random"), (24, "paths"), (2.5, "random")):
        with pytest.raises(BudgetError, match="needs a budget of at least"):
            noiseopt.search_noise("a red circle", algo=algo, budget=budget)
    with pytest.raises(BudgetError, match="at least 25 NFEs"):  # a model object: checked on its steps, nothing loaded
        noiseopt.search_noise("a red circle", model=ToySampler(num_steps=25), verifiers=[Red()], budget=0)
    for budget in ("0", "-5"):
        proc, seconds = cli("search", "a red circle", "--budget", budget, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "at least 25 NFEs" in proc.stderr and not (tmp_path / "o").exists()


def test_the_judge_without_openai_is_refused_before_anything_loads(tmp_path, monkeypatch):
    "--verifiers gpt without openai used to denoise for 10.7 s, then print a 56-line traceback."
    import importlib.util

    import noiseopt
    from noiseopt.errors import ConfigError

    from noiseopt.samplers import ModelEntry

    def never():
        raise AssertionError("the model loaded before the judge was checked")

    entry = ModelEntry("never", load_sampler=never)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(ConfigError, match=r'pip install "noiseopt\[openai\]"'):
        noiseopt.search_noise("a red circle", model=entry, verifiers=["gpt"], budget=30, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs an API key"):  # the key, too, is checked before anything loads
        noiseopt.search_noise("a red circle", model=entry, verifiers=["gpt"], budget=30, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"}])
def test_a_hub_model_that_cannot_be_fetched_is_one_line_at_once(tmp_path, env):
    "--model sdxl offline used to take 27 s and 14 lines (five retries and a diffusers warning)."
    proc, seconds = cli("search", "a cat", "--model", "sdxl", "--out", str(tmp_path / "o"),
                        env={**env, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert seconds < 10  # the process's start and imports included; 27 s and five retries before
    assert "stabilityai/stable-diffusion-xl-base-1.0" in proc.stderr and "hf download" in proc.stderr
    assert ("HF_HUB_OFFLINE" in proc.stderr) == (env["HF_HUB_OFFLINE"] == "1") and not (tmp_path / "o").exists()
    from noiseopt.samplers import check_hub

    check_hub(str(tmp_path))  # a folder is never looked up


def test_the_hub_check_is_quick_and_leaves_proxies_to_the_download(tmp_path, monkeypatch):
    import huggingface_hub  # noqa: F401  (imported before the clock starts)

    from noiseopt.errors import ModelNotFoundError
    from noiseopt.samplers import check_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # a name that never resolves
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(k, raising=False)
    t = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="cannot be reached"):
        check_hub("org/model")
    assert time.perf_counter() - t < 2
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    check_hub("org/model")  # through a proxy the download itself says what fails


def test_threads_on_every_computing_command_and_a_default_that_leaves_cores_free():
    "noiseopt search had no way to set threads, and torch's default oversubscribes a small busy machine."
    from noiseopt.cli import build_parser

    parser = build_parser()
    for argv in (["search", "a cat"], ["bench"], ["sweep"], ["bench-verifiers"], ["bench-gpu"], ["shapes", "eval"],
                 ["shapes", "train", "--out", "x"]):
        assert parser.parse_args(argv + ["--threads", "3"]).threads == 3, argv
    probe = ("import torch, noiseopt.core as c; from noiseopt.runspec import RunSpec; "
             "RunSpec.from_args('a red circle').build(); print(torch.get_num_threads(), c.default_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    threads, default = map(int, out.stdout.split())
    assert threads == default == max(1, len(os.sched_getaffinity(0)) // 2), out.stderr
    choice = "2" if default == 1 else "1"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**env, "OMP_NUM_THREADS": choice}, timeout=300)
    assert out.stdout.split()[0] == choice  # a choice in the environment stands
    proc, _ = cli("search", "a red circle", "--threads", "0")
    assert proc.returncode == 2 and "threads must be a whole number" in proc.stderr


def test_progress_is_on_where_a_person_watches(monkeypatch):
    "search_noise used to be silent by default (the README's example ran 1 min 35 s without a line)."
    from noiseopt.searches.core import watched

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert watched()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not watched()
    monkeypatch.setattr(sys, "stderr", __import__("io").StringIO())  # a log file, a pipe: nobody watches
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not watched()
    import inspect

    import noiseopt

    assert inspect.signature(noiseopt.search_noise).parameters["progress"].default is None


def test_pictures_a_person_can_read(tmp_path):
    "best.png and baseline.png on shapes were 32 x 32 pixels, and multi-line titles overlapped the row above."
    import matplotlib

    matplotlib.use("Agg")
    from PIL import Image

    import noiseopt
    from noiseopt.viz import image_grid

    res = noiseopt.search_noise("a red circle", budget=50, out=tmp_path / "o", progress=False)
    for name, cand in (("best", res.best), ("baseline", res.baseline)):
        png = Image.open(tmp_path / "o" / f"{name}.png")
        assert png.size == (256, 256)
        import numpy as np

        small = torch.from_numpy(np.asarray(png.convert("RGB"))).permute(2, 0, 1).float()[:, ::8, ::8] / 255
        assert torch.allclose(small, cand.image.float(), atol=1 / 255 + 1e-6)  # nearest: every pixel an 8 x 8 block
    fig = image_grid([torch.rand(3, 32, 32) for _ in range(16)], titles=["a green square\nabove a green circle"] * 8
                     + ["best of 8"] * 8, verdicts=[True, False] * 8, ncols=8, size=1.7, suptitle="top; bottom")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [a for a in fig.axes if a.images]
    clashes = [(i, j) for i, a in enumerate(axes) for j, b in enumerate(axes)
               if a is not b and a.title.get_window_extent(r).overlaps(b.get_window_extent(r))]
    assert not clashes, clashes


def test_the_shapes_caption_error_reads_as_english():
    from noiseopt.errors import PromptError
    from noiseopt.shapes import parse

    with pytest.raises(PromptError) as e:
        parse("a purple hexagon")
    assert "colours are red, green, blue and yellow and whose shapes are circle, square and triangle" in str(e.value)


def _first_code_cell(path):
    import nbformat

    return next(c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code")


@pytest.mark.parametrize("nb", ["nbs/tutorials/01_quickstart.ipynb", "nbs/tutorials/04_colab.ipynb"])
def test_the_tutorials_install_only_what_is_missing_from_a_source_that_exists(nb, monkeypatch, capsys):
    "The Colab notebook installed from a repository that does not exist, and the quickstart's pip ran under nbconvert."
    root = Path(__file__).parent.parent
    cell = _first_code_cell(root / nb)
    assert "github.com/noiseopt" not in cell and "NOISEOPT_SOURCE" in cell
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    exec(compile(cell, nb, "exec"), {})  # noiseopt is installed here: nothing to install
    import noiseopt

    assert not ran and f"noiseopt {noiseopt.__version__}" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "noiseopt", None)  # as on a fresh runtime: import noiseopt fails
    monkeypatch.chdir(Path(__file__).parent)  # a folder without a wheel, and no source named
    monkeypatch.delenv("NOISEOPT_SOURCE", raising=False)
    with pytest.raises(RuntimeError, match="no source was found"):
        exec(compile(cell, nb, "exec"), {})
    wheel = Path(__file__).parent / "noiseopt-9.9-py3-none-any.whl"
    monkeypatch.setenv("NOISEOPT_SOURCE", str(wheel))
    with pytest.raises(ImportError):  # pip "ran" (faked here), then the import is tried again
        exec(compile(cell, nb, "exec"), {})
    assert ran and ran[-1][0][-1] == str(wheel)


def test_the_readme_states_the_cpu_choice_first_and_its_demo_shows_a_gain():
    "The README's first command pulled CUDA torch with the CPU hint after it, and its demo prompt showed no gain."
    import re

    import noiseopt

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", readme, re.S).group(1).splitlines()
    assert "download.pytorch.org/whl/cpu" in block[0] and block[1].startswith("pip install -e . && noiseopt search")
    prompt = re.search(r'noiseopt search "([^"]+)"', block[1]).group(1)
    res = noiseopt.search_noise(prompt, progress=False)  # the command's defaults: random, 8 samples, seed 0
    assert not res.report["checker"]["baseline"]["passed"] and res.report["checker"]["best"]["passed"]
