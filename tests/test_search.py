"""Searches: exact budgets, zero-order geometry and restarts, path records, determinism and resume."""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from noiseopt.core import BudgetError, ConfigError, PromptError
from noiseopt.ensemble import Ensemble
from noiseopt.search import (CombinedSearch, MoreSteps, PathSearch, RandomSearch, ZeroOrderSearch, neighbor,
                             rebuild_noise)


class Bright:
    name = "bright"

    def score(self, images, prompts):
        return images.mean((1, 2, 3))


class Red:
    name = "red"

    def score(self, images, prompts):
        return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


@pytest.fixture(scope="module")
def sampler():
    from noiseopt.samplers import DiffusersSampler
    from noiseopt.testing import tiny_sd_pipeline

    return DiffusersSampler(tiny_sd_pipeline(), num_steps=10, guidance_scale=3.0, batch_size=4)


def searches(sampler, ens, **path_options):
    paths = path_options or dict(paths=2, per_path=2, start_step=4, forward=2, backward=3)
    return [RandomSearch(sampler, ens), ZeroOrderSearch(sampler, ens, neighbors=3, lam=0.6), PathSearch(sampler, ens, **paths),
            CombinedSearch(sampler, ens, neighbors=2, lam=0.6, **paths), MoreSteps(sampler, ens)]


def toy_sampler():
    sys.path.insert(0, str(Path(__file__).parent))
    from toy import ToySampler

    return ToySampler(num_steps=10, batch_size=4)


def check_spent(search, sampler, budget):
    "Runs `search` at `budget`; asserts it spent between `budget - K` and `budget`, every NFE counted once; returns it."
    K, before = sampler.num_steps, sampler.nfe
    res = search.run("a cat", budget, seed=3)
    counted = sampler.nfe - before
    extra = res.nfe if search.algo == "steps" else 0  # MoreSteps' long schedule counts on its own sampler
    assert budget - K <= res.nfe <= budget, (search.algo, budget, res.nfe, res.report.get("plan"))
    assert counted + extra == res.nfe + res.baseline_nfe == res.total_nfe, search.algo
    assert ("unspent" in res.report) == (res.nfe < budget)
    assert res.best is not None and res.baseline is not None
    assert all(c.nfe <= res.nfe for c in res.candidates)
    return res


@pytest.mark.parametrize("which", ["toy", "diffusers"])
@pytest.mark.parametrize("samples", [1, 2, 8, 32, 80])
def test_every_search_spends_its_budget(sampler, which, samples):
    "At 1 to 80 samples' worth, every search (paths and both at their defaults too) spends all but less than a sample."
    s = toy_sampler() if which == "toy" else sampler
    ens = Ensemble([Bright(), Red()])
    budget = samples * s.num_steps
    for search in searches(s, ens) + [PathSearch(s, ens), CombinedSearch(s, ens)]:
        res = check_spent(search, s, budget)
        if search.algo == "paths":
            assert res.baseline_nfe == (s.num_steps if res.report["plan"]["paths"] else 0)
        else:
            assert res.baseline_nfe == (s.num_steps if search.algo == "steps" else 0)
    for budget in (37, 50, 83):  # budgets that are no multiple of a sample
        for search in searches(s, ens):
            check_spent(search, s, budget)


def test_the_number_of_paths_grows_with_the_budget(sampler):
    ens = Ensemble([Bright(), Red()])
    search = PathSearch(sampler, ens)
    plans = [search.plan(b * sampler.num_steps) for b in (8, 32, 80)]
    assert [p["paths"] for p in plans] == sorted(p["paths"] for p in plans) and plans[0]["paths"] < plans[-1]["paths"]
    for b, p in zip((8, 32, 80), plans):
        assert b * sampler.num_steps - search.copy_costs()[0] < p["nfe"] <= b * sampler.num_steps
    # a search given its number of paths keeps it and spends the rest on more copies in the first round
    fixed = PathSearch(sampler, ens, paths=2).plan(80 * sampler.num_steps)
    assert fixed["paths"] == 2 and fixed["extra"] > 0
    # below one path of one copy: best-of-N, and it says so
    tiny = search.plan(2 * sampler.num_steps)
    assert tiny["paths"] == 0 and tiny["samples"] == 2 and "best-of-2" in tiny["why"]


def test_too_small_budgets_and_bad_settings(sampler):
    ens = Ensemble(Bright())
    for search in searches(sampler, ens):
        for budget in (0, -5, sampler.num_steps - 1):
            with pytest.raises(BudgetError, match="budget"):
                search.run("a cat", budget)
    with pytest.raises(PromptError):
        RandomSearch(sampler, ens).run("  ", 20)
    with pytest.raises(ConfigError, match="backward"):
        PathSearch(sampler, ens, start_step=4, forward=2, backward=2)
    for bad in (dict(lam=0.0), dict(lam=1.5), dict(cos=1.0), dict(lam=0.5, cos=0.5)):
        with pytest.raises(ConfigError, match="lam|cos"):
            ZeroOrderSearch(sampler, ens, **bad)
    assert ZeroOrderSearch(sampler, ens, cos=0.8).lam == pytest.approx(0.6)  # the public implementation's cosine


def test_same_seed_same_result(sampler):
    ens = Ensemble([Bright(), Red()])
    for search in searches(sampler, ens):
        a, b = search.run("a cat", 60, seed=5), search.run("a cat", 60, seed=5)
        assert a.to_dict()["candidates"] == b.to_dict()["candidates"]
        assert torch.equal(a.best.image, b.best.image)
        c = search.run("a cat", 60, seed=6)
        if search.algo != "steps":
            assert c.to_dict()["candidates"] != a.to_dict()["candidates"]


def test_neighbors_keep_the_norm_and_step_lam_away():
    "The paper's lambda: the step grows with it (the sine of the angle to the pivot; the cosine is sqrt(1 - lam^2))."
    x, w = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    distances = []
    for lam in (0.1, 0.6, 1.0):
        y = neighbor(x, w, lam)
        xf, yf = x.flatten(1).double(), y.flatten(1).double()
        assert torch.allclose(yf.norm(dim=1), xf.norm(dim=1), rtol=1e-5)
        cos = torch.nn.functional.cosine_similarity(xf, yf)
        assert torch.allclose(cos, torch.full((3,), math.sqrt(1 - lam**2), dtype=torch.float64), atol=1e-5)
        distances.append(float(((yf - xf).norm(dim=1) / xf.norm(dim=1)).mean()))
    assert distances == sorted(distances) and distances[0] < 0.2 < 1.2 < distances[-1]  # larger lam, larger stride


def test_zero_order_moves_or_restarts_by_the_rule(sampler):
    ens = Ensemble([Bright(), Red()])
    search = ZeroOrderSearch(sampler, ens, neighbors=2, lam=0.7)
    res = search.run("a cat", 200, seed=2)
    cands = res.candidates
    restarts = moves = 0
    pivot = 0
    i = 1
    while i < len(cands):
        round_ = [k for k in range(i, len(cands)) if cands[k].parent == pivot and not cands[k].info.get("restart")]
        round_ = round_[: search.neighbors]
        assert round_ and round_[0] == i
        # rebuilt noises sit on the pivot's sphere at cosine sqrt(1 - lam^2)
        px = rebuild_noise(sampler, cands[pivot].seeds, search.lam).flatten().double()
        for k in round_:
            y = rebuild_noise(sampler, cands[k].seeds, search.lam).flatten().double()
            assert abs(y.norm() / px.norm() - 1) < 1e-5 and abs(torch.dot(y, px) / px.norm() ** 2 - search.cos) < 1e-5
        top = [pivot, *round_][ens.order([cands[k].scores for k in [pivot] + round_])[0]]
        i = round_[-1] + 1
        if top != pivot:
            moves += 1
            pivot = top
            assert i >= len(cands) or not cands[i].info.get("restart")
        elif i < len(cands):
            restarts += 1
            assert cands[i].info.get("restart") and cands[i].parent is None
            pivot = i
            i += 1
    assert moves + restarts >= 3


def test_path_search_records(sampler):
    ens = Ensemble([Bright(), Red()])
    calls = []
    renoise = sampler.renoise

    def spy(x, from_step, to_step, generators=None):
        out = renoise(x, from_step, to_step, generators)
        calls.append((from_step, to_step, x, out))
        return out

    sampler.renoise = spy
    try:
        search = PathSearch(sampler, ens, paths=2, per_path=3, start_step=4, forward=2, backward=3)
        res = search.run("a cat", search.plan_cost(2, 3), seed=1)  # two paths of three copies, no extra copies
    finally:
        del sampler.renoise
    K = sampler.num_steps
    steps = [c.step for c in res.candidates[1:]]
    expected, i = [], 4
    while i < K:
        i = min(K, i - 2 + 3)
        expected += [i] * 6
    assert steps[: len(expected)] == expected[: len(steps)]
    rounds = sorted({c.info["round"] for c in res.candidates if "round" in c.info})
    for r in rounds[1:]:
        parents = {c.parent for c in res.candidates if c.info.get("round") == r}
        assert len(parents) == search.paths  # N survivors carried into each round
    for from_step, to_step, x, out in calls:
        assert from_step - to_step == 2
        a_i, s_i = sampler.levels[from_step].tolist()
        a_j, s_j = sampler.levels[to_step].tolist()
        resid = (out - (a_j / a_i) * x).flatten()
        expected_std = math.sqrt(s_j**2 - (a_j / a_i * s_i) ** 2)
        assert abs(resid.std().item() / expected_std - 1) < 0.1  # the schedule's noise level


RESUME_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from toy import ToySampler
    from noiseopt.search import make_search

    class SlowRed:  # slow enough that a kill lands mid-run
        name = "red"
        def score(self, images, prompts):
            time.sleep(0.05)
            return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))

    search = make_search(sys.argv[3], ToySampler(num_steps=6, batch_size=2), [SlowRed()])
    res = search.run("a cat", 600, seed=9, out=sys.argv[1])
    print(res.best_index, res.nfe, len(res.candidates))
""")


@pytest.mark.parametrize("algo", ["zo:neighbors=2", "both:paths=2,per_path=2,start_step=3,forward=2,backward=3"])
def test_resume_after_sigkill(tmp_path, algo):
    script = tmp_path / "search.py"
    script.write_text(RESUME_SCRIPT)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([sys.executable, str(script), str(tmp_path / "full"), tests, algo], capture_output=True,
                          text=True, env=env, timeout=600)
    assert full.returncode == 0, full.stderr
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed_dir), tests, algo], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed_dir / "state.json").exists():
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "result.json").exists()  # it really stopped part-way
    import json

    state = json.loads((killed_dir / "state.json").read_text())
    assert 0 < state["spent"] < 600
    # nothing in the folder is a pickle: JSON, PNG and safetensors only
    suffixes = {p.suffix for p in killed_dir.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".jsonl", ".png", ".safetensors"}, suffixes
    resumed = subprocess.run([sys.executable, str(script), str(killed_dir), tests, algo], capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == full.stdout
    a = json.loads((tmp_path / "full" / "result.json").read_text())
    b = json.loads((killed_dir / "result.json").read_text())
    assert a["candidates"] == b["candidates"] and a["best_index"] == b["best_index"]
    assert (tmp_path / "full" / "best.png").read_bytes() == (killed_dir / "best.png").read_bytes()


def test_candidates_record_the_nfes_spent_when_made(sampler):
    res = RandomSearch(sampler, Ensemble(Bright()), batch_size=4).run("a cat", 60, seed=1)
    assert [c.nfe for c in res.candidates] == [10, 20, 30, 40, 50, 60]  # one sample each, in batches of 4
    from noiseopt.viz import trajectory

    points = trajectory(res)
    assert [p["nfe"] for p in points] == [10, 20, 30, 40, 50, 60]
    best = [p["best"]["bright"] for p in points]
    assert best == sorted(best) and points[-1]["index"] == res.best_index


@pytest.mark.parametrize("budget", [44, 60, 90])
def test_both_leaves_the_paths_a_path(sampler, budget):
    ens = Ensemble([Bright(), Red()])
    search = CombinedSearch(sampler, ens, neighbors=2, per_path=2, start_step=4, forward=2, backward=3, split=0.75)
    least = search.path_search.plan_cost(1, 1, from_start=False)
    # by hand: one copy re-noised from step 4 to 2, denoised to 5 and scored on x0 (4 NFEs), then 5 more rounds to 10
    assert least == 4 * 5 + 3 == 23
    res = search.run("a cat", budget)
    first_round = next(i for i, c in enumerate(res.candidates) if c.step < sampler.num_steps)  # scored on x0: a path round
    zo_spent = res.candidates[first_round - 1].nfe  # the last zero-order candidate (paths record only after a round)
    assert zo_spent <= budget - least and budget - sampler.num_steps <= res.nfe <= budget, (zo_spent, res.nfe)
    assert zo_spent >= min(budget - least, int(0.75 * budget)) - sampler.num_steps  # its share, less a sample
