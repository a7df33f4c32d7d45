"""Shared fixtures: tiny Stable Diffusion and SDXL pipelines, saved to disk once per session.

Tests never download: the hub is switched off before anything imports huggingface_hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# one thread per pytest-xdist worker (two workers with two threads each on two cores spin, five times slower)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (whole benchmarks, training, subprocess runs); .ci/run does")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (as .ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of minutes (a whole benchmark, training, a CLI run); --runslow runs it")
    # third-party deprecations (numpy 2 `__array__` in diffusers' schedulers, hub arguments) are not ours to fix
    for module in ("diffusers", "huggingface_hub", "transformers"):
        config.addinivalue_line("filterwarnings", f"ignore::DeprecationWarning:{module}.*")
        config.addinivalue_line("filterwarnings", f"ignore::FutureWarning:{module}.*")
        config.addinivalue_line("filterwarnings", f"ignore::UserWarning:{module}.*")


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory):
    "Folders holding a tiny SD and a tiny SDXL pipeline written by `save_pretrained`."
    from noiseopt.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    dirs = {}
    for kind, build in (("sd", tiny_sd_pipeline), ("sdxl", tiny_sdxl_pipeline)):
        dirs[kind] = root / kind
        build().save_pretrained(dirs[kind])
    return dirs


@pytest.fixture(scope="session")
def load(pipeline_dirs):
    "Returns a function that loads a `DiffusersSampler` over a saved tiny pipeline."
    from noiseopt.samplers import DiffusersSampler

    def _load(kind="sd", **kwargs):
        return DiffusersSampler.from_pretrained(pipeline_dirs[kind], device="cpu", **kwargs)

    return _load
