"""Issue 25's searches on the toy sampler and a tiny diffusers pipeline: preview pruning, particles (SMC), beams and
cross-entropy over the low band: budgets spent and never exceeded, their rules, the step their previews continue
with, and the benchmark's NFEs to match."""
import math
import sys
from pathlib import Path

import pytest
import torch

from noiseopt.core import Budget
from noiseopt.ensemble import Ensemble
from noiseopt.errors import ConfigError, SchedulerError
from noiseopt.searches import BeamSearch, CrossEntropySearch, ParticleSearch, PruneSearch, RandomSearch, make_search
from noiseopt.searches.core import Run, step_from_x0
from noiseopt.searches.cem import low_band, with_low_band
from noiseopt.searches.smc import effective_sample_size, potential_logs, systematic_resample

sys.path.insert(0, str(Path(__file__).parent))
from toy import Bright, Red, ToySampler  # noqa: E402

NEW = ("prune", "smc", "beam", "cem")


@pytest.fixture(scope="module")
def tiny():
    from noiseopt.samplers import DiffusersSampler
    from noiseopt.testing import tiny_sd_pipeline

    return DiffusersSampler(tiny_sd_pipeline(sample_size=16), num_steps=10, guidance_scale=3.0, batch_size=4)


def unit(search, budget):
    return search.unit_cost(Run(prompt="a cat", seed=0, budget=Budget(budget)))


@pytest.mark.parametrize("which", ["toy", "diffusers"])
@pytest.mark.parametrize("algo", NEW)
def test_budget_never_exceeded_and_spent(tiny, which, algo):
    "At 1 to 32 samples' worth and at budgets no multiple of a sample: all but less than the search's unit is spent."
    s = ToySampler(num_steps=10, batch_size=4) if which == "toy" else tiny
    ens = Ensemble([Bright(), Red()])
    for budget in (10, 20, 37, 83, 200) if which == "toy" else (10, 37, 83):
        search = make_search(algo, s, ens)
        before = s.nfe
        res = search.run("a cat", budget, seed=3)
        assert res.nfe <= budget and budget - res.nfe < unit(search, budget), (algo, budget, res.nfe, res.report)
        assert s.nfe - before == res.nfe + res.baseline_nfe == res.total_nfe  # every NFE counted, once
        assert ("unspent" in res.report) == (res.nfe < budget)
        assert res.best.step == s.num_steps and not res.best.info.get("baseline_only")
        assert all(c.nfe <= res.nfe for c in res.candidates) and res.verifier_calls == len(res.candidates)
        if algo != "cem" and budget >= 2 * s.num_steps:
            assert res.verifier_calls > budget // s.num_steps  # its previews were scored too
            assert res.baseline_nfe == s.num_steps  # its first noise sampled outside the budget, to compare with
    with pytest.raises(Exception, match="budget"):
        make_search(algo, s, ens).run("a cat", s.num_steps - 1)


@pytest.mark.parametrize("algo", NEW)
def test_resume_after_a_stop_gives_the_identical_result(tmp_path, algo):
    "Stopped after each round in turn (Ctrl-C in a callback), the run resumes from its folder to the very same result."
    from noiseopt.errors import Interrupted

    s = ToySampler(num_steps=10, batch_size=4)
    ens = Ensemble([Bright(), Red()])
    full = make_search(algo, s, ens).run("a cat", 200, seed=5, out=tmp_path / "full")
    rounds = len({c.info.get("stage", c.info.get("round")) for c in full.candidates})
    for stop in range(1, max(2, rounds)):
        def halt(search, run, stop=stop):
            if run.rounds == stop:
                raise KeyboardInterrupt

        folder = tmp_path / f"stopped{stop}"
        with pytest.raises(Interrupted):
            make_search(algo, s, ens).run("a cat", 200, seed=5, out=folder, callback=halt)
        assert not (folder / "result.json").exists()
        res = make_search(algo, s, ens).run("a cat", 200, seed=5, out=folder)
        assert res.report["resumed"]["rounds"] == stop
        assert res.to_dict()["candidates"] == full.to_dict()["candidates"], (algo, stop)
        assert res.best_index == full.best_index and res.nfe == full.nfe
        assert (folder / "best.png").read_bytes() == (tmp_path / "full" / "best.png").read_bytes()
        assert res.report.get("plan") == full.report.get("plan")


def test_previews_continue_with_the_samplers_own_step(tiny):
    """On DDIM (tiny SD), Euler (tiny SDXL: state 0 stored over `init_noise_sigma`), flow matching (tiny SD3) and the toy's
    DDIM-like schedule, the step from a preview's clean estimate is the sampler's own step, from the first to the last."""
    from noiseopt.samplers import DiffusersSampler
    from noiseopt.testing import tiny_sd3_pipeline, tiny_sdxl_pipeline

    euler = DiffusersSampler(tiny_sdxl_pipeline(scheduler="euler"), num_steps=8, guidance_scale=2.0)
    flow = DiffusersSampler(tiny_sd3_pipeline(), num_steps=8, guidance_scale=2.0)
    for s in (tiny, euler, flow, ToySampler(num_steps=10)):
        cond, x = s.condition("a cat"), s.noise([1, 2])
        for k in (0, 3, s.num_steps - 1):
            xk = s.denoise(x, cond, 0, k) if k else x
            nfe = s.nfe
            x0 = s.predict_x0(xk, cond, k)
            ours = step_from_x0(s.levels, xk, x0, k)
            assert s.nfe - nfe == 2  # one NFE per state: the preview's
            theirs = s.denoise(xk, cond, k, k + 1)
            assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (repr(s), k)
            if k == 3:
                mid = (xk, x0, theirs)
        # eta = 1: the noise estimate replaced by fresh noise; same seeds, same step
        g = lambda: [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]  # noqa: E731
        xk, x0, theirs = mid  # at the last step the next level has no noise: eta is tried before it
        a, b = [step_from_x0(s.levels, xk, x0, 3, 1.0, g()) for _ in range(2)]
        assert torch.equal(a, b) and not torch.allclose(a, theirs, atol=1e-3)
    with pytest.raises(ConfigError, match="eta"):
        step_from_x0(s.levels, xk, x0, 1, 1.5)


def test_prune_finishes_the_best_previewed_and_its_finals_are_plain_samples():
    s = ToySampler(num_steps=10, batch_size=4)
    search = PruneSearch(s, [Bright()], at=(0.8, 0.5), keep=0.25)
    res = search.run("a cat", 120, seed=2)
    plan, c = res.report["plan"], search.checkpoints
    previews = [[i for i, x in enumerate(res.candidates) if x.info.get("stage") == j] for j in range(len(c))]
    assert [len(p) for p in previews] == plan["counts"][:-1] and plan["counts"][0] > plan["counts"][1] > plan["counts"][2]
    assert plan["counts"][2] == max(1, math.ceil(plan["counts"][1] * 0.25)) == len(res.eligible())  # keep, at the last too
    for j, p in enumerate(previews):
        assert all(res.candidates[i].step == c[j] for i in p)
        ranked = sorted(p, key=lambda i: -res.candidates[i].scores["bright"])
        went_on = previews[j + 1] if j + 1 < len(c) else res.eligible()
        assert sorted(res.candidates[i].parent for i in went_on) == sorted(ranked[: len(went_on)])
    cond = s.condition("a cat")
    for i in res.eligible():  # a finished trajectory is the sampler's own sample of its noise (no noise added)
        x = s.denoise(s.noise(res.candidates[i].seeds[:1]), cond)
        assert torch.allclose(x, res.candidates[i].latent, atol=1e-4)
    assert plan["nfe"] == search.plan_cost(plan["counts"]) == res.nfe


def test_particles_resample_by_their_potential():
    w = torch.tensor([0.7, 0.1, 0.1, 0.1])
    assert systematic_resample(w, 0.5) == [0, 0, 0, 2] and systematic_resample(torch.ones(4), 0.3) == [0, 1, 2, 3]
    assert effective_sample_size(torch.ones(4)) == pytest.approx(4) and effective_sample_size(w) == pytest.approx(1 / 0.52)
    h = [[0.1, 0.5, 0.2], [0.3, 0.2, 0.4]]
    assert potential_logs(h, "max", 2).tolist() == pytest.approx([1.0, 0.8])
    assert potential_logs(h, "difference", 1).tolist() == pytest.approx([-0.3, 0.2])
    assert potential_logs(h, "sum", 1).tolist() == pytest.approx([0.8, 0.9])
    s = ToySampler(num_steps=10, batch_size=4)
    # a high lam concentrates the weights: the particles are resampled, copies of the best previews go on
    res = ParticleSearch(s, [Bright()], lam=50.0).run("a cat", 80, seed=1)
    first = [i for i, c in enumerate(res.candidates) if c.info.get("stage") == 0]
    assert res.candidates[first[0]].info["resampled"] and res.candidates[first[0]].info["ess"] < 4
    nxt = [c.parent for c in res.candidates if c.info.get("stage") == 1]
    best = max(first, key=lambda i: res.candidates[i].scores["bright"])
    assert nxt.count(best) >= 2 and len(set(nxt)) < len(nxt)
    # lam = 0: equal weights, never resampled: each particle keeps its own line
    res = ParticleSearch(s, [Bright()], lam=0.0).run("a cat", 80, seed=1)
    assert not any(c.info.get("resampled") for c in res.candidates)
    lines = [c.seeds[0] for c in res.candidates if c.step == s.num_steps and not c.info.get("baseline_only")]
    assert len(set(lines)) == 8
    with pytest.raises(ConfigError, match="potential"):
        ParticleSearch(s, [Bright()], potential="mean")
    for bad in (dict(eta=0.0), dict(lam=math.inf), dict(ess=1.5)):
        with pytest.raises(ConfigError):
            ParticleSearch(s, [Bright()], **bad)
    # never resampled (ess=0): the weights carry over, adding up the potentials, and grow uneven
    res = ParticleSearch(s, [Bright()], lam=2.0, ess=0.0, potential="sum").run("a cat", 80, seed=1)
    ess = [next(c.info["ess"] for c in res.candidates if c.info.get("stage") == j) for j in range(4)]
    assert ess[-1] < ess[0] and not any(c.info.get("resampled") for c in res.candidates)


def test_beams_branch_from_the_best_previews():
    s = ToySampler(num_steps=10, batch_size=4)
    res = BeamSearch(s, [Bright()], beams=2, at=(0.8, 0.5)).run("a cat", 60, seed=4)
    for j in (0, 1):
        stage = [i for i, c in enumerate(res.candidates) if c.info.get("stage") == j]
        top = sorted(stage, key=lambda i: -res.candidates[i].scores["bright"])[:2]
        after = [c for c in res.candidates if c.info.get("stage") == j + 1] if j == 0 else \
            [res.candidates[i] for i in res.eligible()]
        assert len(after) == 6 and {c.parent for c in after} == set(top)
        assert sum(c.parent == top[0] for c in after) == 3  # round robin, the best first
        # branches of one state differ: the stochastic step drew fresh noise for each
        same = [c for c in after if c.parent == top[0]]
        assert len({round(c.scores["bright"], 6) for c in same}) == len(same)


def test_cem_keeps_the_noise_gaussian_and_moves_its_low_band():
    x = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    m = low_band(x, 8)
    assert m.shape == (64, 4, 4, 4) and abs(float(m.std()) - 1) < 0.05
    y = with_low_band(x, torch.zeros_like(m), 8)
    assert torch.allclose(low_band(y, 8), torch.zeros_like(m), atol=1e-5)
    assert torch.allclose(y - torch.nn.functional.avg_pool2d(y, 8).repeat_interleave(8, 2).repeat_interleave(8, 3),
                          x - torch.nn.functional.avg_pool2d(x, 8).repeat_interleave(8, 2).repeat_interleave(8, 3), atol=1e-5)
    z = with_low_band(x, low_band(torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(1)), 8), 8)
    assert abs(float(z.std()) - 1) < 0.02  # a standard Gaussian low band keeps the noise standard
    s = ToySampler(num_steps=10, batch_size=4, size=8)
    ens = Ensemble([Bright()])
    cem, rnd = CrossEntropySearch(s, ens, population=4, factor=4), RandomSearch(s, ens)
    a, b = cem.run("a cat", 120, seed=7), rnd.run("a cat", 120, seed=7)
    assert [c.seeds for c in a.candidates[:4]] == [c.seeds for c in b.candidates[:4]]  # its first round: plain noises
    assert a.candidates[0].scores == b.candidates[0].scores and a.baseline_index == 0
    late = [c.scores["bright"] for c in a.candidates[8:]]
    assert sum(late) / len(late) > sum(c.scores["bright"] for c in b.candidates[8:]) / len(late)  # it learned
    with pytest.raises(ConfigError, match="factor"):
        CrossEntropySearch(s, ens, factor=3)
    with pytest.raises(ConfigError, match="fewer than the population"):
        CrossEntropySearch(s, ens, population=2, elites=2)
    with pytest.raises(ConfigError, match="identical"):
        BeamSearch(s, ens, eta=0)


def test_searches_that_continue_from_previews_refuse_samplers_that_cannot():
    s = ToySampler(num_steps=10, restartable=False)
    for cls in (PruneSearch, ParticleSearch, BeamSearch):
        with pytest.raises(SchedulerError, match="mid-schedule"):
            cls(s, [Bright()])
    s = ToySampler(num_steps=10)
    by_name = make_search("prune:at=0.9/0.6,keep=0.3", s, [Bright()])  # levels on the command line: slash-separated
    assert by_name.at == (0.9, 0.6) and by_name.keep == 0.3 and by_name.settings()["at"] == (0.9, 0.6)
    with pytest.raises(ConfigError, match="noise level"):
        make_search("beam:at=0.9/high", s, [Bright()])
    s.levels = None
    with pytest.raises(SchedulerError, match="levels"):
        PruneSearch(s, [Bright()])


def test_nfes_to_match_reads_random_searchs_curve():
    from noiseopt.benchmarks.tables import curve_match, format_table, summarize

    assert curve_match([25, 100, 400], [1.0, 2.0, 3.0], 2.5) == (pytest.approx(200.0), "")
    assert curve_match([25, 100, 400], [1.0, 2.0, 3.0], 0.5) == (25.0, "<=")
    assert curve_match([25, 100, 400], [1.0, 2.0, 3.0], 3.5) == (math.inf, ">")
    assert curve_match([25, 100, 400], [1.0, 0.5, 3.0], 2.0)[0] == pytest.approx(100 * 4 ** (1.5 / 2.5))
    rows = []
    for k in range(6):
        for b, v in ((25, 1.0), (50, 2.0), (100, 3.0), (200, 4.0)):
            rows.append({"prompt_index": k, "prompt": f"p{k}", "algo": "random", "budget": b, "nfe": b, "num_steps": 25,
                         "verifier_calls": b // 25, "baseline": {"v": 1.0}, "best": {"v": v + 0.1 * k}})
        rows.append({"prompt_index": k, "prompt": f"p{k}", "algo": "prune", "budget": 50, "nfe": 50, "num_steps": 25,
                     "verifier_calls": 30, "baseline": {"v": 1.0}, "best": {"v": 3.0 + 0.1 * k}})
    s = summarize(rows, "t")
    cell = s["match"]["prune"][50]["search/v"]
    assert cell["match"] == pytest.approx(100.0) and cell["factor"] == pytest.approx(2.0)
    assert cell["lo"] - 1e-9 <= 2.0 <= cell["hi"] + 1e-9
    text = format_table(s)
    assert "NFEs to match" in text and "100 (x2)" in text and "| 30 |" in text  # the verifier calls column
    # a verifier that failed on one prompt (NaN) leaves that prompt out of the match, paired, instead of "> max"
    rows[-1]["best"]["v"] = math.nan
    cell = summarize(rows, "t")["match"]["prune"][50]["search/v"]
    assert cell["flag"] == "" and 1.5 < cell["factor"] < 2.5
    assert curve_match([25, 100], [1.0, math.nan], 0.5) == (pytest.approx(math.nan, nan_ok=True), "n/a")


@pytest.mark.parametrize("algo", ["paths:paths=2,per_path=2", "both:paths=2,per_path=2,neighbors=2", "zo:neighbors=2",
                                  "random"])
def test_a_resumed_run_reports_what_the_uninterrupted_one_reports(tmp_path, algo):
    """The plan a search made in its first round (`report["plan"]`: path search's paths and copies) and what it says of
    its unspent NFEs come back on resume, though `begin` is not called again: the report equals the uninterrupted one."""
    from noiseopt.errors import Interrupted

    s = ToySampler(num_steps=10, batch_size=4)
    ens = Ensemble([Bright(), Red()])
    full = make_search(algo, s, ens).run("a cat", 205, seed=5, out=tmp_path / "full")
    assert full.report.get("plan") or algo.startswith(("zo", "random"))

    def halt(search, run):  # stopped after the first round that recorded candidates (random's first only plans)
        if run.record.candidates:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        make_search(algo, s, ens).run("a cat", 205, seed=5, out=tmp_path / "stopped", callback=halt)
    res = make_search(algo, s, ens).run("a cat", 205, seed=5, out=tmp_path / "stopped")
    assert 1 <= res.report.pop("resumed")["rounds"] <= 2
    assert res.report == full.report and res.to_dict()["candidates"] == full.to_dict()["candidates"]
