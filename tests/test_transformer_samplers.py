"""FLUX (with and without its guidance embedding), SD3 and PixArt-Σ behind the Sampler protocol: parity with the pipeline,
split denoising, NFE counts, re-noising marginals, and searches within budget; tiny pipelines saved to folders."""
import math
import sys
from pathlib import Path

import pytest
import torch

import noiseopt
from noiseopt.core import generators_from_seeds
from noiseopt.models.core import FlowAdapter
from noiseopt.samplers import DiffusersSampler, FlowMatchSampler
from noiseopt.testing import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from toy import Bright, Red  # noqa: E402

FAMILIES = {
    "flux-dev": (lambda: tiny_flux_pipeline(guidance_embeds=True), dict(guidance_scale=3.5)),
    "flux-schnell": (lambda: tiny_flux_pipeline(guidance_embeds=False), dict(guidance_scale=0.0)),
    "sd3": (tiny_sd3_pipeline, dict(guidance_scale=4.0)),
    "pixart": (tiny_pixart_pipeline, dict(guidance_scale=4.5)),
}
H, W, MSL = 48, 32, 16  # non-square; short T5 sequences keep the tests fast


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer_pipelines")
    out = {}
    for name, (build, _) in FAMILIES.items():
        build().save_pretrained(root / name)
        out[name] = root / name
    return out


def sampler_for(folders, name, **kw):
    opts = {**FAMILIES[name][1], "num_steps": 6, "height": H, "width": W, "batch_size": 2, "max_sequence_length": MSL, **kw}
    return DiffusersSampler.from_pretrained(folders[name], device="cpu", **opts)


@pytest.mark.parametrize("name", FAMILIES)
def test_parity_with_the_pipeline(folders, name):
    s = sampler_for(folders, name)
    assert isinstance(s.adapter, FlowAdapter) == name.startswith(("flux", "sd3"))  # one class, the family's adapter
    assert type(s) is DiffusersSampler and s.family == {"flux-dev": "flux", "flux-schnell": "flux"}.get(name, name.split("-")[0])
    x = s.noise([0, 1, 2])
    cond = s.condition("a red circle on the left")
    s.nfe = 0
    images = s.decode(s.denoise(x, cond))
    assert s.nfe == 3 * 6  # one NFE per sample per step, guidance included
    kw = {"use_resolution_binning": False} if name == "pixart" else {}
    ref = s.pipe("a red circle on the left", latents=x, num_images_per_prompt=3, num_inference_steps=6, height=H, width=W,
                 output_type="pt", max_sequence_length=MSL, guidance_scale=FAMILIES[name][1]["guidance_scale"], **kw).images
    assert images.shape == (3, 3, H, W)
    assert (images - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", FAMILIES)
def test_split_denoising_is_exact_and_counted(folders, name):
    s = sampler_for(folders, name)
    x, cond = s.noise([3, 4, 5]), s.condition("two blue squares")
    whole = s.denoise(x, cond)
    s.nfe = 0
    half = s.denoise(x, cond, 0, 2)
    rest = s.denoise(s.denoise(half, cond, 2, 5), cond, 5)
    assert torch.equal(rest, whole) and s.nfe == 3 * 6
    x0 = s.predict_x0(half, cond, 2)
    assert s.nfe == 3 * 7 and x0.shape == x.shape
    assert torch.equal(s.noise([4]), x[1:2])  # a sample's noise does not depend on its batch


@pytest.mark.parametrize("name", ["flux-dev", "sd3"])
def test_rectified_flow_renoise_has_the_forward_marginal(folders, name):
    s = sampler_for(folders, name)
    sig = s.levels[:, 1]
    assert torch.allclose(s.levels[:, 0] + sig, torch.ones_like(sig))  # (a, s) = (1 - sigma, sigma)
    i, j = 4, 1  # from a cleaner state back to a noisier one
    x0 = torch.full((64, *s.latent_shape), 0.7)
    e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xs = (1 - sig[i]).float() * x0 + sig[i].float() * e
    xt = s.renoise(xs, i, j, generators_from_seeds(range(64)))
    t = float(sig[j])
    resid = xt - (1 - t) * x0
    assert abs(resid.mean().item()) < 0.02 and abs(resid.std().item() / t - 1) < 0.02  # (1 - t) x0 + t eps
    ratio = (1 - t) / (1 - float(sig[i]))
    extra = math.sqrt(t**2 - (ratio * float(sig[i])) ** 2)
    assert abs((xt - ratio * xs).std().item() / extra - 1) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("algo", ["zo", "paths"])
def test_searches_run_within_budget(folders, name, algo):
    s = sampler_for(folders, name)
    opts = {"paths": 2, "per_path": 2, "start_step": 3, "forward": 2, "backward": 3} if algo == "paths" else {"neighbors": 2}
    before = s.nfe
    res = noiseopt.search_noise("a red circle", model=s, verifiers=[Red(), Bright()], algo=algo, budget=40, seed=1,
                                **opts)
    assert res.nfe <= 40 and s.nfe - before == res.nfe + res.baseline_nfe
    assert res.best.image.shape == (3, H, W)


def test_replace_keeps_the_family_and_its_options(folders):
    s = sampler_for(folders, "flux-dev")
    long = s.replace(num_steps=9)
    assert isinstance(long.adapter, FlowAdapter) and long.num_steps == 9 and long.max_sequence_length == MSL
    assert long.levels[0, 1] == pytest.approx(1.0) and long.levels[-1, 1] == 0
    with pytest.raises(noiseopt.errors.SchedulerError):
        DiffusersSampler(s.pipe, scheduler="ddim")
    unit = 2 * s.vae_scale_factor  # FLUX packs 2 x 2 latent patches
    with pytest.raises(noiseopt.errors.ConfigError, match=f"multiple of {unit}"):
        DiffusersSampler(s.pipe, height=unit * 3 + 2)


def test_one_gpu_options(folders):
    s = DiffusersSampler.from_pretrained(folders["sd3"], device="cpu", vae_tiling=True, vae_slicing=True,
                                         num_steps=2, height=H, width=W, max_sequence_length=MSL)
    assert s.vae.use_tiling and s.vae.use_slicing
    with pytest.raises(noiseopt.errors.ConfigError, match="needs device 'cuda'"):
        DiffusersSampler.from_pretrained(folders["sd3"], device="cpu", offload="model")
    from noiseopt.samplers import model_entry

    entry = model_entry("flux-dev", num_steps=12)  # a registered hub model: its reference settings, nothing loaded
    assert entry.name == "black-forest-labs/FLUX.1-dev"
    with pytest.raises(noiseopt.errors.UnknownNameError, match="has no option 'offlaod'"):
        model_entry("pixart-sigma:offlaod=model")


@pytest.mark.slow
def test_bench_gpu_runs_its_code_on_tiny_pipelines(tmp_path):
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-m", "noiseopt.cli", "bench-gpu", "--tiny", "--steps", "3", "--reps", "1",
                           "--json", str(tmp_path / "gpu.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["models"]) == {"sdxl", "flux-dev"} and "| sdxl |" in done.stdout
    assert all(r["ratio"] > 0.3 for r in report["models"].values())


def test_the_old_flow_sampler_name_still_drives_flux_and_refuses_other_families():
    from noiseopt.errors import UnsupportedModelError
    from noiseopt.testing import tiny_sd_pipeline

    s = FlowMatchSampler(tiny_flux_pipeline(guidance_embeds=True), num_steps=3, height=H, width=W)
    assert s.num_steps == 3 and s.family == "flux" and isinstance(s, DiffusersSampler)
    with pytest.raises(UnsupportedModelError, match="use DiffusersSampler"):
        FlowMatchSampler(tiny_sd_pipeline())
