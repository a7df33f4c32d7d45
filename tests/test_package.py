"""The package imports lightly, installs its command and extras, and its CLI fails politely."""
import importlib.metadata
import subprocess
import sys

import pytest

HEAVY = ("diffusers", "transformers", "open_clip", "openai")


def run(*args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)


def test_import_leaves_heavy_libraries_unloaded():
    code = ("import sys, noiseopt, noiseopt.core, noiseopt.samplers, noiseopt.testing, noiseopt.cli, "
            "noiseopt.shapes, noiseopt.shapes_train, noiseopt.verifiers, noiseopt.ensemble, noiseopt.search, "
            "noiseopt.viz, noiseopt.bench, noiseopt.judge, noiseopt.runspec, noiseopt.searches, noiseopt.verifiers.gpt; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = run(sys.executable, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # and they do load when a sampler needs them (the check above can see them)
    out = run(sys.executable, "-c", "import sys; from noiseopt.testing import tiny_sd_pipeline; tiny_sd_pipeline(); "
                                    "print('diffusers' in sys.modules, 'transformers' in sys.modules)")
    assert out.stdout.strip() == "True True", out.stderr


def test_cli_help_and_errors():
    out = run("noiseopt", "--help")
    assert out.returncode == 0 and "usage: noiseopt" in out.stdout and "info" in out.stdout
    import noiseopt

    out = run("noiseopt", "--version")
    assert out.returncode == 0 and noiseopt.__version__ in out.stdout
    out = run("noiseopt", "info", "--device", "cpu")
    assert out.returncode == 0 and "default device   cpu" in out.stdout
    out = run("noiseopt", "info", "--device", "tpu:9")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]  # one line
    assert out.stderr.startswith("noiseopt: error: unknown device 'tpu:9'") and "Traceback" not in out.stderr
    out = run(sys.executable, "-m", "noiseopt.cli", "--help")
    assert out.returncode == 0 and "usage: noiseopt" in out.stdout


def test_extras_are_declared():
    meta = importlib.metadata.metadata("noiseopt")
    extras = set(meta.get_all("Provides-Extra"))
    assert {"openai", "dev", "all"} <= extras
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("openai") and 'extra == "openai"' in r for r in requires)
    assert any(r.startswith("diffusers") and "extra" not in r for r in requires)


@pytest.mark.slow
def test_pre_commit_hook_refuses_modules_out_of_step(tmp_path):
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        import pytest
        pytest.skip("needs a git checkout")
    clone = tmp_path / "clone"
    assert run("git", "clone", "-q", str(root), str(clone)).returncode == 0
    git = lambda *a: run("git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", *a)  # noqa: E731
    assert git("config", "core.hooksPath", ".ci/hooks").returncode == 0
    module = clone / "noiseopt" / "core.py"
    module.write_text(module.read_text() + "\nHAND_EDIT = 1\n")
    git("add", "-A")
    refused = git("commit", "-m", "edit a generated module by hand")
    assert refused.returncode != 0 and "noiseopt/core.py" in refused.stderr
    assert "HAND_EDIT" not in module.read_text()  # the hook re-exported the module from its notebook
    # a change made in the notebook and exported is accepted
    (clone / "tests" / "note.txt").write_text("not a notebook\n")
    git("add", "-A")
    accepted = git("commit", "-m", "an ordinary change")
    assert accepted.returncode == 0, accepted.stderr
