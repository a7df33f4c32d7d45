"""One test per bug found while reworking the architecture (issue 11); each failed on the code before its fix."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

import noiseopt
from noiseopt.errors import ModelNotFoundError, UnknownNameError

sys.path.insert(0, str(Path(__file__).parent))
from toy import Bright, Red, ToySampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "noiseopt.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_falsy_options_are_not_dropped():
    "search_noise(guidance=0.0) used to be dropped by an `if v` and ran at the model's guidance 2."
    seen = []
    noiseopt.search_noise("a red circle", guidance=0.0, steps=3, budget=3, callback=lambda s, r: seen.append(s.sampler))
    assert seen[0].guidance_scale == 0.0 and seen[0].num_steps == 3


def test_clip_with_options_on_shapes_is_the_shapes_clip():
    "--verifiers clip:scale=3 on the shapes model used to load OpenAI's ViT-L/14 (offline: an error) instead of the tiny CLIP."
    seen = []
    res = noiseopt.search_noise("a red circle", verifiers=["clip:scale=3", "aesthetic"], steps=3, budget=6,
                                callback=lambda s, r: seen.append(s.ensemble.verifiers[0]))
    clip = seen[0]
    assert clip.scale == 3 and clip.encoder.model.config.vision_config.image_size == 32  # the shapes CLIP
    assert res.settings["verifiers"] == ["clip", "aesthetic"]


def test_options_a_search_does_not_take_are_refused():
    "make_search used to ignore options the chosen algorithm does not take (--algo random --paths 5 ran silently)."
    with pytest.raises(UnknownNameError, match="search 'random' has no option 'paths'"):
        noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Red()], algo="random", paths=5)
    bad = cli("search", "a red circle", "--algo", "random:paths=5", "--out", "/tmp/never-written")
    assert bad.returncode == 2 and "has no option 'paths'" in bad.stderr and "Traceback" not in bad.stderr


def test_an_unknown_verifier_is_reported_before_the_model_loads(monkeypatch):
    "An unknown verifier name used to be reported only after the model had loaded."
    import noiseopt.shapes

    monkeypatch.setattr(noiseopt.shapes, "load_sampler", lambda *a, **k: pytest.fail("the model loaded first"))
    with pytest.raises(UnknownNameError, match="unknown verifier 'beauty'"):
        noiseopt.search_noise("a red circle", verifiers=["clip", "beauty"])


def test_result_files_are_readable_by_others(tmp_path):
    "Result files used to be written with mode 0600 (mkstemp in the atomic writer)."
    res = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Red()], budget=16, out=tmp_path / "r")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("result.json", "best.png", "state.json", "candidates.jsonl"):
        assert stat.S_IMODE((tmp_path / "r" / name).stat().st_mode) == 0o666 & ~mask, name
    assert res.nfe == 16


def test_the_grid_shows_the_baseline_once():
    "grid.png of a random search used to show the baseline twice (as baseline and as a top candidate)."
    from noiseopt.viz import candidate_grid

    res = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Red()], budget=48)
    fig = candidate_grid(res)
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes]
    assert titles.count("baseline") + titles.count("baseline = best") == 1 and len(titles) == len(res.candidates)


def test_the_trajectory_keeps_its_meaning():
    "trajectory.png plotted a pool-relative mean rank (its values changed meaning as the pool grew). It then drew each"
    "verifier's own maximum, which issue 24 reversed on purpose: it draws the scores of the image the search returns."
    from noiseopt.viz import plot_trajectory, trajectory

    res = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Red(), Bright()], algo="zo", budget=160, seed=4)
    points = trajectory(res)
    for name in ("red", "bright"):
        ys = [p["best"][name] for p in points]
        assert ys == sorted(ys) and ys[-1] == max(c.scores[name] for c in res.candidates if c.step == 8)
    # the chosen one's utility: for a mean rank, the share of the pool so far it ranks above, in [0, 1]
    assert all(0 <= p["utility"] <= 1 for p in points) and points[0]["utility"] == 1.0
    # drawn: the scores of the candidate the search would return at each NFE, not each verifier's own maximum
    # (issue 24: a verifier's maximum can belong to a candidate the ensemble does not choose)
    fig = plot_trajectory(res)
    assert [ax.get_ylabel() for ax in fig.axes] == ["red of the chosen so far", "bright of the chosen so far",
                                                   "utility (share of the pool below)"]
    assert list(fig.axes[-1].lines[0].get_ydata()) == [p["utility"] for p in points]
    for ax, name in zip(fig.axes, ("red", "bright")):
        assert list(ax.lines[0].get_ydata()) == [res.candidates[p["index"]].scores[name] for p in points]
    assert points[-1]["index"] == res.best_index
    raw = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Red(), Bright()], ensemble="raw", budget=40)
    assert [ax.get_ylabel() for ax in plot_trajectory(raw).axes][-1] == "utility (weighted sum)"


def test_a_missing_model_is_named_not_a_verifier(tmp_path):
    "--model /nonexistent used to load the verifiers first and fail naming openai/clip-vit-large-patch14."
    # the message quotes the path cut to 80 characters: a long temporary folder may cut the name itself
    with pytest.raises(ModelNotFoundError, match="unknown model") as e:
        noiseopt.search_noise("a cat", model=str(tmp_path / "nonexistent"))
    assert "clip" not in str(e.value)
    bad = cli("search", "a cat", "--model", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "o"))
    assert bad.returncode == 2 and "unknown model" in bad.stderr and "clip" not in bad.stderr, bad.stderr


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path):
    "Ctrl-C during a search used to print a 46-line traceback (rc 130)."
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "noiseopt.cli", "search", "a red circle", "--budget", "5000",
                             "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "images").glob("*.png")):  # a first round is saved
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "run the same command again" in err
    assert str(out) in err and "candidates (" in err  # it says what it kept


def test_a_long_prompt_is_not_echoed_whole():
    "A 10,000-character prompt used to be echoed whole in its error."
    bad = cli("search", "a purple hexagon " * 600, "--out", "/tmp/never-written")
    assert bad.returncode == 2 and len(bad.stderr) < 600 and "10200 characters" in bad.stderr, bad.stderr[:300]


def test_the_default_output_folder_names_every_setting():
    "The default output folder's name ignored budget and steps: a rerun with another budget met 'other settings'."
    from noiseopt.cli import build_parser, default_out

    parse = build_parser().parse_args
    a = default_out(parse(["search", "a red circle", "--budget", "100"]))
    assert a != default_out(parse(["search", "a red circle", "--budget", "200"]))
    assert a != default_out(parse(["search", "a red circle", "--budget", "100", "--steps", "10"]))
    assert a == default_out(parse(["search", "a red circle", "--budget", "100", "--quiet"]))  # not a setting
    assert a.name.startswith("a-red-circle-random-seed0-")


def test_result_json_holds_the_checkers_verdicts(tmp_path):
    "result.json lacked the checker's verdicts that the command prints."
    noiseopt.search_noise("a red circle", steps=5, budget=10, out=tmp_path / "r")
    report = json.loads((tmp_path / "r" / "result.json").read_text())["report"]
    assert set(report["checker"]) == {"baseline", "best"} and isinstance(report["checker"]["best"]["passed"], bool)
    assert report["checker"]["best"]["caption"] == "a red circle"


def test_repository_files():
    "noiseopt_out/ was not ignored by git, and there was no LICENSE file although settings.ini says apache2."
    assert "noiseopt_out/" in (ROOT / ".gitignore").read_text().split()
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def test_a_sampler_from_the_protocol_alone_runs_the_steps_baseline():
    "A sampler written from the documented protocol could not run `steps` (the search called `with_num_steps`)."
    res = noiseopt.search_noise("a cat", model=ToySampler(num_steps=4), verifiers=[Red()], algo="steps", budget=12)
    assert res.best.info["num_steps"] == 12


def test_objects_are_accepted_as_verifiers():
    "search_noise(verifiers=[my_verifier]) failed with AttributeError: 'Red' object has no attribute 'strip'."
    res = noiseopt.search_noise("a red circle", verifiers=[Red()], steps=3, budget=6)
    assert res.settings["verifiers"] == ["red"]


def test_the_trajectory_chooses_as_the_search_does():
    "A candidate a verifier failed on (NaN) is chosen only when every one failed, in the trajectory as in the search."
    from noiseopt.viz import trajectory

    res = noiseopt.search_noise("a cat", model=ToySampler(), verifiers=[Red(), Bright()], algo="random", budget=48)
    top = trajectory(res)[-1]["index"]
    assert top == res.best_index
    res.candidates[top].info["failed"] = ["red"]
    assert trajectory(res)[-1]["index"] != top  # the search would not return it now
