"""Issue 24's more-steps baseline: a DDIM schedule of any length keeps its start and lands every step on itself, so
that more steps converge (the ODE's solution) instead of piling up error; the shapes model samples that way."""
import torch

from noiseopt.models.core import even_ddim, state_levels
from noiseopt.samplers import DiffusersSampler
from noiseopt.testing import tiny_sd_pipeline


def sampler(steps=10, **kw):
    return DiffusersSampler(tiny_sd_pipeline(), num_steps=steps, guidance_scale=1.0, batch_size=2, **kw)


def test_the_even_schedule_is_the_leading_grid_step_for_step():
    s = sampler(10)
    top = int(s.timesteps[0])
    even = sampler(10, scheduler=even_ddim(s.scheduler.config, top))
    assert even.timesteps.tolist() == s.timesteps.tolist()
    assert torch.equal(even.levels, s.levels)
    cond, x = s.condition("a cat"), s.noise([1, 2])
    assert torch.equal(even.denoise(x, cond), s.denoise(x, cond))
    # and part-way, as the searches use it
    assert torch.equal(even.denoise(even.denoise(x, cond, 0, 4), cond, 4), s.denoise(x, cond))


def test_more_steps_keep_the_start_and_converge():
    s = sampler(10)
    cond, x = s.condition("a cat"), s.noise([3])
    out = {}
    for n in (10, 20, 80, 160):
        long = s.with_steps(n)
        assert int(long.timesteps[0]) == int(s.timesteps[0]) and int(long.timesteps[-1]) == int(s.timesteps[-1])
        t = long.timesteps.tolist()
        assert len(t) == n and t == sorted(t, reverse=True) and len(set(t)) == n
        # every step lands on the schedule: state k sits at timestep k (the noise levels say so)
        levels = state_levels(long.scheduler, long.timesteps)
        abar = long.scheduler.alphas_cumprod.double()
        assert torch.allclose(levels[1:-1, 0] ** 2, abar[long.timesteps[1:]], atol=1e-12)
        out[n] = long.denoise(x, cond).double()
    # more steps approach the ODE's solution (a first-order solver's error falls as 1 / n): the gap between 80 and 160
    # steps is far below that of 10 and 20
    assert (out[160] - out[80]).abs().mean() < 0.25 * (out[20] - out[10]).abs().mean()


def test_the_shapes_model_samples_on_its_even_schedule():
    from noiseopt.shapes import SHAPES_FIRST_TIMESTEP, load_sampler

    s = load_sampler()
    assert type(s.scheduler).__name__ == "EvenDDIMScheduler" and s.scheduler.clipped_eps and s.restartable
    assert s.timesteps.tolist() == list(range(961, 0, -40)) and SHAPES_FIRST_TIMESTEP == 961
    long = s.with_steps(400)
    assert long.scheduler.clipped_eps and int(long.timesteps[0]) == 961 and int(long.timesteps[-1]) == 1
    assert type(load_sampler(scheduler="ddim").scheduler).__name__ == "DDIMScheduler"  # the shipped one, by name


def test_no_more_steps_than_timesteps():
    "Rounded to whole timesteps, a longer schedule would repeat some, and a DDIM step from t to t does not move."
    import pytest

    from noiseopt.ensemble import Ensemble
    from noiseopt.errors import BudgetError
    from noiseopt.searches import MoreSteps

    s = sampler(10)  # from t = 901 to t = 1: 901 timesteps
    assert len(set(s.with_steps(901).timesteps.tolist())) == 901
    with pytest.raises(ValueError, match="at most 901 steps"):
        s.with_steps(902)

    class Flat:
        name = "flat"

        def score(self, images, prompts):
            return images.mean((1, 2, 3))

    with pytest.raises(BudgetError, match="at most 901 steps"):
        MoreSteps(s, Ensemble([Flat()])).run("a cat", 1000)


def test_the_more_steps_curve_command(capsys):
    "noiseopt shapes eval --steps: the same noises at each step count, from one start, with intervals."
    from noiseopt.benchmarks.run import format_curve, steps_curve
    from noiseopt.cli import main

    report = steps_curve((25, 40), prompts=["a red circle", "a blue square above a red circle"], samples=1, log=None)
    assert list(report["steps"]) == [25, 40] and report["prompts"] == 2
    for n, r in report["steps"].items():
        assert r["schedule"].startswith(f"{n} steps from t=961")
        assert 0 <= r["checker"]["lo"] <= r["checker"]["mean"] <= r["checker"]["hi"] <= 1 and r["clip"]["n"] == 2
    assert "| 40 | 40 steps from t=961" in format_curve(report)
    assert main(["shapes", "eval", "--steps", "25,x"]) == 2
    assert "--steps takes whole step counts" in capsys.readouterr().err
