"""The sampler reproduces diffusers pipelines, resumes exactly, re-noises exactly, and is deterministic."""
import copy
import json

import pytest
import torch

from noiseopt.core import (ConfigError, ModelNotFoundError, PromptError, SchedulerError, UnsupportedModelError,
                           generators_from_seeds, noise_from_seeds)
from noiseopt.samplers import DiffusersSampler, Sampler, make_scheduler

PROMPT = "a red circle on the left of a blue square"


def reference_images(sampler, x, prompt, negative_prompt=None, steps=None):
    "Images from the pipeline's own __call__, with the sampler's scheduler, from latents x."
    pipe = copy.copy(sampler.pipe)  # a shallow copy shares the modules; only the scheduler is swapped
    pipe.scheduler = type(sampler.scheduler).from_config(sampler.scheduler.config)
    return pipe(prompt, latents=x.clone(), num_images_per_prompt=len(x), num_inference_steps=steps or sampler.num_steps,
                guidance_scale=sampler.guidance_scale, negative_prompt=negative_prompt, output_type="pt",
                height=sampler.height, width=sampler.width).images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_parity_with_pipeline(load, kind, scheduler, guidance, batch):
    sampler = load(kind, scheduler=scheduler, num_steps=6, guidance_scale=guidance, batch_size=2)
    assert isinstance(sampler, Sampler)
    x = sampler.noise(list(range(10, 10 + batch)))
    ours = sampler.decode(sampler.denoise(x, sampler.condition(PROMPT)))
    ref = reference_images(sampler, x, PROMPT)
    assert ours.shape == ref.shape == (batch, 3, sampler.height, sampler.width)
    assert ref.std() > 0.01  # a real image, not a constant
    assert (ours - ref).abs().max().item() < 1e-5
    assert sampler.nfe == batch * 6


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_parity_negative_prompt_and_v_prediction(load, pipeline_dirs, kind, tmp_path):
    sampler = load(kind, scheduler="ddim", num_steps=5, guidance_scale=4.0, negative_prompt="blurry, dark")
    x = sampler.noise([3, 4])
    ours = sampler.decode(sampler.denoise(x, sampler.condition(PROMPT)))
    ref = reference_images(sampler, x, PROMPT, negative_prompt="blurry, dark")
    assert (ours - ref).abs().max().item() < 1e-5
    plain = load(kind, scheduler="ddim", num_steps=5, guidance_scale=4.0)
    assert (plain.decode(plain.denoise(x, plain.condition(PROMPT))) - ours).abs().max() > 1e-4

    # v-prediction (Stable Diffusion 2.x): same pipeline with the scheduler told so
    pipe = DiffusersSampler.from_pretrained(pipeline_dirs[kind], device="cpu").pipe
    config = dict(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.scheduler = make_scheduler("euler", config)
    pipe.save_pretrained(tmp_path / "v")
    v = DiffusersSampler.from_pretrained(tmp_path / "v", num_steps=5, guidance_scale=3.0)
    assert v.scheduler.config.prediction_type == "v_prediction"
    out = v.decode(v.denoise(x, v.condition(PROMPT)))
    assert (out - reference_images(v, x, PROMPT)).abs().max().item() < 1e-5


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a"])
def test_resume_equals_uninterrupted(load, scheduler):
    sampler = load("sd", scheduler=scheduler, num_steps=8, guidance_scale=3.0, batch_size=3)
    cond = sampler.condition(PROMPT)
    seeds = [0, 1, 2]
    x = sampler.noise(seeds)
    full = sampler.denoise(x, cond, seeds=seeds)
    assert sampler.nfe == 3 * 8
    for k in (1, 3, 7):
        sampler.nfe = 0
        part = sampler.denoise(x, cond, 0, k, seeds=seeds)
        assert sampler.nfe == 3 * k
        assert torch.equal(sampler.denoise(part, cond, k, 8, seeds=seeds), full)
        assert sampler.nfe == 3 * 8
    # three legs are the same as one
    a = sampler.denoise(x, cond, 0, 2, seeds=seeds)
    b = sampler.denoise(a, cond, 2, 5, seeds=seeds)
    assert torch.equal(sampler.denoise(b, cond, 5, seeds=seeds), full)


def test_predict_x0_is_the_schedulers_estimate(load):
    for scheduler in ("ddim", "euler"):
        sampler = load("sd", scheduler=scheduler, num_steps=6, guidance_scale=2.0)
        cond = sampler.condition(PROMPT)
        x = sampler.denoise(sampler.noise([5, 6]), cond, 0, 3)
        sampler.nfe = 0
        x0 = sampler.predict_x0(x, cond, 3)
        assert sampler.nfe == 2
        sampler._reset_schedule(3)
        eps = sampler._model_output(x, cond, sampler.timesteps[3])
        a, s = sampler.levels[3].tolist()
        # epsilon prediction: x = a x0 + s eps, so x0 = (x - s eps) / a, in either parameterisation
        assert (x0 - (x - s * eps) / a).abs().max().item() < 1e-4
        assert (x0 - x).abs().max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_renoise_matches_forward_process(load, scheduler):
    sampler = load("sd", scheduler=scheduler, num_steps=10)
    reference = make_scheduler(scheduler, sampler.scheduler.config)
    reference.set_timesteps(10)
    n = 4000
    x0 = noise_from_seeds([123], sampler.latent_shape)
    for i, j in ((7, 3), (9, 1), (5, 4), (4, 0)):
        eps = noise_from_seeds(range(n), sampler.latent_shape)
        x_i = reference.add_noise(x0.expand(n, -1, -1, -1), eps, reference.timesteps[i].repeat(n))
        x_j = sampler.renoise(x_i, i, j, generators_from_seeds(range(n, 2 * n)))
        if j == 0:  # state 0 is kept as pipelines take it: divided by init_noise_sigma
            x_j = x_j * sampler.init_noise_sigma
        direct = reference.add_noise(x0.expand(n, -1, -1, -1), noise_from_seeds(range(2 * n, 3 * n), sampler.latent_shape),
                                     reference.timesteps[j].repeat(n))
        exp_mean = direct.mean(0)
        exp_var = direct.var(0)
        sem = exp_var.sqrt() / n**0.5
        z = ((x_j.mean(0) - exp_mean) / (sem * 2**0.5)).abs()  # both means carry sampling error
        assert z.max() < 5, (i, j, z.max())
        assert abs(x_j.var(0).mean() / exp_var.mean() - 1) < 0.02, (i, j)
        assert abs(x_j.var(0).mean() - x_i.var(0).mean()) > 0.01 or i == j
    assert torch.equal(sampler.renoise(x0, 6, 6, generators_from_seeds([0])), x0)


def test_renoise_is_seeded_per_row(load):
    sampler = load("sd", scheduler="ddim", num_steps=10)
    x = sampler.noise([0, 1, 2])
    a = sampler.renoise(x, 8, 4, generators_from_seeds([10, 11, 12]))
    b = sampler.renoise(x[1:2], 8, 4, generators_from_seeds([11]))
    assert torch.equal(a[1:2], b)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_determinism(load, kind):
    seeds = [4, 8, 15, 16, 23]
    first = load(kind, num_steps=5, batch_size=5)
    second = load(kind, num_steps=5, batch_size=5)
    lat1 = first.denoise(first.noise(seeds), first.condition(PROMPT))
    lat2 = second.denoise(second.noise(seeds), second.condition(PROMPT))
    assert torch.equal(first.noise(seeds), second.noise(seeds))
    assert torch.equal(lat1, lat2)
    assert torch.equal(first.decode(lat1), second.decode(lat2))
    images = first.decode(lat1)
    for batch_size in (1, 2, 3):
        other = load(kind, num_steps=5, batch_size=batch_size)
        assert (other.decode(other.denoise(other.noise(seeds), other.condition(PROMPT))) - images).abs().max() < 1e-5
    # a candidate's image does not depend on its neighbours in the batch
    alone = first.decode(first.denoise(first.noise([15]), first.condition(PROMPT)))
    assert (alone - images[2:3]).abs().max() < 1e-5


def test_euler_ancestral_is_batch_independent_and_seeded(load):
    seeds = [1, 2, 3]
    big = load("sd", scheduler="euler_a", num_steps=5, batch_size=3)
    small = load("sd", scheduler="euler_a", num_steps=5, batch_size=1)
    x = big.noise(seeds)
    a = big.decode(big.denoise(x, big.condition(PROMPT), seeds=seeds))
    assert (small.decode(small.denoise(x, small.condition(PROMPT), seeds=seeds)) - a).abs().max() < 1e-5
    assert (big.decode(big.denoise(x, big.condition(PROMPT), seeds=[7, 8, 9])) - a).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="one per sample"):
        big.denoise(x, big.condition(PROMPT), seeds=[1])


def test_bad_input(load, pipeline_dirs, tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        DiffusersSampler.from_pretrained(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        DiffusersSampler.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="hf download"):  # a hub id, and the hub is off in tests
        DiffusersSampler.from_pretrained("noiseopt-tests/no-such-model")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnsupportedModelError, match="KandinskyPipeline"):
        DiffusersSampler.from_pretrained(tmp_path / "other")

    sampler = load("sd", num_steps=4)
    for prompt in ("", "   ", None, ["a cat"]):
        with pytest.raises(PromptError):
            sampler.condition(prompt)
    pipe = sampler.pipe
    for steps in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="num_steps"):
            DiffusersSampler(pipe, num_steps=steps)
    with pytest.raises(ConfigError, match="height=33"):
        DiffusersSampler(pipe, height=33)
    with pytest.raises(ConfigError, match="unknown scheduler"):
        DiffusersSampler(pipe, scheduler="heun-ish")
    cond = sampler.condition(PROMPT)
    x = sampler.noise([0])
    with pytest.raises(ConfigError, match="outside the schedule"):
        sampler.denoise(x, cond, 0, 5)
    with pytest.raises(ConfigError, match="renoise"):
        sampler.denoise(x, cond, 3, 1)
    with pytest.raises(ConfigError, match="goes back"):
        sampler.renoise(x, 1, 3)

    multistep = DiffusersSampler(pipe, num_steps=4, scheduler="dpm++")
    assert multistep.denoise(x, cond).shape == x.shape  # a whole schedule is fine
    for call in (lambda: multistep.denoise(x, cond, 0, 2), lambda: multistep.denoise(x, cond, 2, 4),
                 lambda: multistep.renoise(x, 3, 1), lambda: multistep.predict_x0(x, cond, 1)):
        with pytest.raises(SchedulerError, match="ddim"):
            call()


def test_sizes_and_defaults(load):
    sd, xl = load("sd"), load("sdxl")
    assert sd.guidance_scale == 7.5 and xl.guidance_scale == 5.0  # the pipelines' own defaults
    assert sd.num_steps == 30 and (sd.height, sd.width) == (32, 32)
    wide = load("sd", height=32, width=48, num_steps=3)
    assert wide.latent_shape == (4, 16, 24)
    x = wide.noise([0])
    assert wide.decode(wide.denoise(x, wide.condition(PROMPT))).shape == (1, 3, 32, 48)
    assert (wide.decode(wide.denoise(x, wide.condition(PROMPT))) - reference_images(wide, x, PROMPT)).abs().max() < 1e-5
