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


def searches(sampler, ens):
    paths = lambda: PathSearch(sampler, ens, paths=2, per_path=2, start_step=4, forward=2, backward=3)  # noqa: E731
    return [RandomSearch(sampler, ens), ZeroOrderSearch(sampler, ens, neighbors=3, lam=0.8), paths(),
            CombinedSearch(sampler, ens, neighbors=2, lam=0.8, paths=2, per_path=2, start_step=4, forward=2, backward=3),
            MoreSteps(sampler, ens)]


@pytest.mark.parametrize("budget", [37, 50, 83])
def test_budgets_are_exact(sampler, budget):
    ens = Ensemble([Bright(), Red()])
    for search in searches(sampler, ens):
        before = sampler.nfe
        res = search.run("a cat", budget, seed=3)
        counted = sampler.nfe - before
        extra = res.nfe if search.algo == "steps" else 0  # MoreSteps' long schedule counts on its own sampler
        assert res.nfe <= budget, search.algo
        assert counted + extra == res.nfe + res.baseline_nfe, search.algo
        # it uses the budget up to one unit of its structure: a sample, or for paths one round (N x M re-noised
        # candidates, each denoised `backward` steps and scored on predict_x0) and one more sample
        unit = sampler.num_steps
        if search.algo in ("paths", "both"):
            p = search if search.algo == "paths" else search.path_search
            unit = p.paths * p.per_path * (p.backward + 1) + sampler.num_steps
        assert budget - res.nfe < unit, (search.algo, res.nfe)
        assert res.best is not None and res.baseline is not None
        assert all(c.nfe <= res.nfe for c in res.candidates)
        assert res.baseline_nfe == (sampler.num_steps if search.algo in ("paths", "steps") else 0)


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
    with pytest.raises(ConfigError, match="lam"):
        ZeroOrderSearch(sampler, ens, lam=1.0)


def test_same_seed_same_result(sampler):
    ens = Ensemble([Bright(), Red()])
    for search in searches(sampler, ens):
        a, b = search.run("a cat", 60, seed=5), search.run("a cat", 60, seed=5)
        assert a.to_dict()["candidates"] == b.to_dict()["candidates"]
        assert torch.equal(a.best.image, b.best.image)
        c = search.run("a cat", 60, seed=6)
        if search.algo != "steps":
            assert c.to_dict()["candidates"] != a.to_dict()["candidates"]


def test_neighbors_keep_the_norm_at_cosine_lam():
    x = torch.randn(3, 4, 8, 8)
    for lam in (0.0, 0.5, 0.95):
        y = neighbor(x, torch.randn(3, 4, 8, 8), lam)
        xf, yf = x.flatten(1).double(), y.flatten(1).double()
        assert torch.allclose(yf.norm(dim=1), xf.norm(dim=1), rtol=1e-5)
        assert torch.allclose(torch.nn.functional.cosine_similarity(xf, yf), torch.full((3,), lam, dtype=torch.float64), atol=1e-5)


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
        # rebuilt noises sit on the pivot's sphere at cosine lam
        px = rebuild_noise(sampler, cands[pivot].seeds, search.lam).flatten().double()
        for k in round_:
            y = rebuild_noise(sampler, cands[k].seeds, search.lam).flatten().double()
            assert abs(y.norm() / px.norm() - 1) < 1e-5 and abs(torch.dot(y, px) / px.norm() ** 2 - search.lam) < 1e-5
        util = ens.utility([cands[k].scores for k in [pivot] + round_])
        best = int(torch.argmax(util[1:])) + 1
        i = round_[-1] + 1
        if util[best] > util[0]:
            moves += 1
            pivot = round_[best - 1]
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
        res = search.run("a cat", 2 * 10 + 2 * 3 * (3 + 1) * 6, seed=1)
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
def test_both_leaves_the_paths_a_round(sampler, budget):
    ens = Ensemble([Bright(), Red()])
    paths = PathSearch(sampler, ens, paths=2, per_path=2, start_step=4, forward=2, backward=3)
    one_round = paths.one_round_cost()
    # the cost by hand: 2 paths to step 4, 4 candidates from step 2 to 5 and their x0 NFE, then 2 x 5 steps to finish
    assert one_round == 2 * 4 + 4 * (5 - 2 + 1) + 2 * 5 == 34
    res = CombinedSearch(sampler, ens, neighbors=2, lam=0.8, paths=2, per_path=2, start_step=4, forward=2, backward=3,
                         split=0.75).run("a cat", budget)
    first_round = next(i for i, c in enumerate(res.candidates) if c.step < sampler.num_steps)  # scored on x0: a path round
    zo_spent = res.candidates[first_round - 1].nfe  # the last zero-order candidate (paths record only after a round)
    assert zo_spent <= budget - one_round and res.nfe <= budget, (zo_spent, res.nfe)
    assert zo_spent >= min(budget - one_round, int(0.75 * budget)) - sampler.num_steps  # its share, less a sample
