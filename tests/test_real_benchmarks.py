"""Real benchmarks, offline: the shipped prompt sets load by name with their categories (the hub switched off), a
benchmark runs on them with a tiny diffusers model, its chosen images and baselines export in the layouts GenEval's
and T2I-CompBench's evaluators read (read back here the way they read them), the GenEval judge works as held-out
verifier and checker, and one search split across two CPU processes gives what one process gives."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noiseopt.benchmarks.data import load_prompt_set, read_results
from noiseopt.benchmarks.export import check_export, export_images, t2i_compbench_name
from noiseopt.errors import ConfigError
from noiseopt.prompts import prompt_set

MODEL = "tiny-sd-bench-test"


@pytest.fixture(scope="module")
def tiny_model():
    "A tiny Stable Diffusion (4 steps) that takes any prompt, with a cheap verifier of its own: registered by name."
    from noiseopt.registry import MODELS, register_model
    from noiseopt.samplers import DiffusersSampler, ModelEntry
    from noiseopt.testing import tiny_sd_pipeline
    from noiseopt.verifiers.core import CallableVerifier

    red = lambda images, prompts: images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))  # noqa: E731
    register_model(MODEL, lambda device=None: ModelEntry(
        MODEL, lambda: DiffusersSampler(tiny_sd_pipeline(), num_steps=4), ("red",),
        {"red": lambda: CallableVerifier(red, "red")}), overwrite=True)
    yield MODEL
    MODELS.unregister(MODEL)


def test_the_shipped_sets_load_offline_with_their_categories(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = load_prompt_set("geneval")
    assert len(g) == 553 and g.licence.read_text().startswith("MIT")
    assert g.categories() == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                              "color_attr": 100}
    p = g.prompts[179]
    assert (p.text, p.category, p.index) == ("a photo of two clocks", "counting", 179)
    assert p.meta["include"] == [{"class": "clock", "count": 2}] and g.checker == "geneval"
    animals = load_prompt_set("partiprompts", categories="Animals")
    assert len(animals) == 314 and {q.category for q in animals} == {"Animals"}
    assert all(q.meta["challenge"] for q in animals) and "Apache" in animals.licence.read_text()
    assert len(load_prompt_set("partiprompts", categories="animals,Quantity")) == 314 + 90 - sum(
        1 for q in prompt_set("partiprompts") if q.category == "Animals" and q.meta["challenge"] == "Quantity")
    spatial = load_prompt_set("t2i-compbench:spatial")
    assert len(spatial) == 300 and spatial.prompts[0].text == "a giraffe next to a lamp"
    assert {q.category for q in spatial} == {"spatial"} and spatial.name == "t2i-compbench:spatial"
    assert len(load_prompt_set("t2i-compbench")) == 2400 and len(load_prompt_set("reference")) == 4
    with pytest.raises(ConfigError, match="no category 'spacial': use some of color, shape"):
        load_prompt_set("t2i-compbench", categories="spacial")
    with pytest.raises(ConfigError, match="--categories picks categories of a shipped prompt set"):
        load_prompt_set("shapes-eval", "shapes", categories="x")
    # the package carries the files and their licences as published
    root = Path(prompt_set("geneval").licence).parent.parent
    for folder in ("geneval", "partiprompts", "t2i-compbench"):
        assert (root / folder / "LICENSE").is_file() and len((root / folder / "COMMIT").read_text().strip()) == 40


@pytest.mark.parametrize("args, n, category", [
    (["--prompts", "geneval", "--limit", "2"], 2, "single_object"),
    (["--prompts", "partiprompts", "--categories", "Animals", "--limit", "2"], 2, "Animals"),
    (["--prompts", "t2i-compbench:spatial", "--limit", "2"], 2, "spatial"),
])
def test_the_benchmark_command_runs_on_each_shipped_set_offline(tiny_model, tmp_path, capsys, monkeypatch, args, n,
                                                                 category):
    from noiseopt.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bench"
    status = main(["bench", "--model", tiny_model, *args, "--algos", "random", "--budgets", "4,8", "--checker", "none",
                   "--out", str(out), "--quiet"])
    assert status == 0, capsys.readouterr().err
    rows = read_results(out / "results.jsonl")
    assert len(rows) == n * 2 and {r["category"] for r in rows} == {category}
    assert all((out / r["image"]).is_file() and (out / r["baseline_image"]).is_file() for r in rows)
    assert "2 prompts" in (out / "table.md").read_text()


def test_a_judge_refuses_prompts_it_cannot_judge_before_anything_loads(tiny_model, tmp_path, capsys):
    from noiseopt.cli import main

    status = main(["bench", "--model", tiny_model, "--prompts", "reference", "--eval-verifiers", "geneval",
                   "--algos", "random", "--budgets", "4", "--out", str(tmp_path / "b")])
    assert status == 2 and "GenEval's 553 prompts" in capsys.readouterr().err
    assert not (tmp_path / "b" / "results.jsonl").exists()
    status = main(["bench", "--model", tiny_model, "--prompts", "reference", "--export", "geneval", str(tmp_path / "e"),
                   "--algos", "random", "--budgets", "4", "--out", str(tmp_path / "c")])
    assert status == 2 and "not GenEval's" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown export format 'coco'"):
        check_export("coco")


@pytest.fixture(scope="module")
def geneval_bench(tiny_model, tmp_path_factory):
    "A benchmark on two GenEval prompts (a counting and a colours one), judged by a tiny GenEval judge as checker and held-out verifier."
    from noiseopt.benchmarks.run import benchmark
    from noiseopt.testing import save_tiny_clip, save_tiny_mask2former

    root = tmp_path_factory.mktemp("geneval-bench")
    judge = f"geneval:detector={save_tiny_mask2former(root / 'm2f')},colors={save_tiny_clip(root / 'clip')}"
    out = root / "bench"
    from noiseopt.verifiers.geneval import Detection, GenEvalDetector

    clocks = [Detection("clock", 0.95, (0, 0, 10, 10)), Detection("clock", 0.93, (20, 0, 30, 10))]
    with pytest.MonkeyPatch.context() as mp:  # the tiny detector sees two clocks, whatever the image
        mp.setattr(GenEvalDetector, "detect", lambda self, image: [Detection(d.label, d.score, d.box) for d in clocks])
        summary = benchmark(out, tiny_model, "geneval", algos=["random", "zo"], budgets=[4, 8],
                            categories="counting,colors", stride=100, limit=2, eval_verifiers=[judge], checker=judge,
                            log=None, plot=False, export=("geneval", root / "export"))
    return out, root / "export", summary


def test_the_geneval_judge_is_checker_and_held_out_verifier(geneval_bench):
    out, _, summary = geneval_bench
    rows = read_results(out / "results.jsonl")
    assert [r["category"] for r in rows if r["algo"] == "random" and r["budget"] == 4] == ["counting", "colors"]
    assert rows[0]["prompt"] == "a photo of two clocks"  # which the stand-in detector's two clocks satisfy
    for r in rows:
        want = r["prompt"] == "a photo of two clocks"  # the colours prompt asks for something else
        assert r["checker_best"] is want and r["checker_baseline"] is want
        assert r["eval_best"]["geneval"] == float(want)  # one judge, two uses, one verdict
    assert json.loads((out / "config.json").read_text())["checker"].startswith("geneval:detector=")


def _read_geneval_layout(folder: Path) -> list[tuple[dict, Path]]:
    "Reads a run's folder as GenEval's evaluate_images.py does: numbered folders, metadata.jsonl, samples/NNNN.png."
    found = []
    for sub in os.listdir(folder):
        path = folder / sub
        if not path.is_dir() or not sub.isdigit():
            continue
        with open(path / "metadata.jsonl") as fp:
            metadata = json.load(fp)
        for name in os.listdir(path / "samples"):
            if (path / "samples" / name).is_file() and re.match(r"\d+\.png", name):
                found.append((metadata, path / "samples" / name))
    return found


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_geneval_export_reads_back_as_genevals_evaluator_reads_it(geneval_bench):
    out, export, summary = geneval_bench
    rows = read_results(out / "results.jsonl")
    runs = {r: Path(p) for r, p in summary["export"].items()}
    assert set(runs) == {"random@4", "random@8", "zo@4", "zo@8", "baseline"}
    lines = {p.text: p.index for p in prompt_set("geneval")}
    for run, folder in runs.items():
        found = _read_geneval_layout(folder)
        assert len(found) == 2
        for meta, image in found:
            assert int(image.parent.parent.name) == lines[meta["prompt"]]  # GenEval's own line number
            assert meta == prompt_set("geneval").prompts[lines[meta["prompt"]]].meta
            if run == "baseline":
                src = next(r for r in rows if r["prompt"] == meta["prompt"])["baseline_image"]
            else:
                algo, budget = run.split("@")
                src = next(r for r in rows if r["prompt"] == meta["prompt"] and r["algo"] == algo
                           and r["budget"] == int(budget))["image"]
            assert np.array_equal(_pixels(image), _pixels(out / src))
    # exported again from the finished folder alone: the same files
    again = export_images(out, "geneval", export.parent / "again")
    assert sorted(again) == sorted(runs)
    for run in runs:
        a = sorted(p.relative_to(runs[run]) for p in runs[run].rglob("*"))
        assert a == sorted(p.relative_to(again[run]) for p in again[run].rglob("*"))


def test_the_t2i_compbench_export_reads_back_as_its_scripts_read_it(geneval_bench, tmp_path):
    out, _, _ = geneval_bench
    rows = read_results(out / "results.jsonl")
    made = export_images(out, "t2i-compbench", tmp_path / "t2i")
    for run, folder in made.items():
        names = os.listdir(folder / "samples")
        names.sort(key=lambda x: int(x.split("_")[-1].split(".")[0]))  # as BLIP_vqa.py orders them
        prompts = [x.split("_")[0] for x in names]  # ... and reads each one's prompt
        want = [r for r in rows if run == "baseline" and r["algo"] == "random" and r["budget"] == 4
                or f"{r['algo']}@{r['budget']}" == run]
        assert prompts == [r["prompt"] for r in sorted(want, key=lambda r: r["prompt_index"])]
        key = "baseline_image" if run == "baseline" else "image"
        for name, r in zip(names, sorted(want, key=lambda r: r["prompt_index"])):
            assert np.array_equal(_pixels(folder / "samples" / name), _pixels(out / r[key]))
    assert t2i_compbench_name("a cat_on a/mat", 7) == "a cat on a mat_000007.png"
    assert len(t2i_compbench_name("é" * 300, 0).encode()) <= 200 + len("_000000.png")


def test_a_checker_that_gives_no_verdicts_is_refused_before_anything_loads(tiny_model, tmp_path, capsys):
    from noiseopt.cli import main

    status = main(["bench", "--model", tiny_model, "--prompts", "reference", "--checker", "aesthetic",
                   "--algos", "random", "--budgets", "4", "--out", str(tmp_path / "b")])
    assert status == 2 and "gives scores, not verdicts" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before the folder, let alone a model


def test_a_folder_rerun_with_other_prompts_keeps_each_prompts_images_apart(tiny_model, tmp_path):
    from noiseopt.benchmarks.run import benchmark

    out = tmp_path / "bench"
    for cats in ("counting", "colors"):  # prompt 0 is another prompt the second time
        benchmark(out, tiny_model, "geneval", algos=["random"], budgets=[4], categories=cats, limit=1, checker="none",
                  log=None, plot=False)
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 2 and rows[0]["prompt_index"] == rows[1]["prompt_index"] == 0
    assert rows[0]["image"] != rows[1]["image"] and rows[0]["baseline_image"] != rows[1]["baseline_image"]
    made = export_images(out, "geneval", tmp_path / "export")
    for run in ("random@4", "baseline"):
        found = _read_geneval_layout(made[run])
        assert sorted(m["prompt"] for m, _ in found) == sorted(r["prompt"] for r in rows)
        for meta, image in found:
            r = next(r for r in rows if r["prompt"] == meta["prompt"])
            assert np.array_equal(_pixels(image), _pixels(out / r["image" if run != "baseline" else "baseline_image"]))
    (out / rows[1]["image"]).unlink()  # a finished row without its image: --export refuses before running anything
    with pytest.raises(ConfigError, match="1 finished rows of this benchmark without their images"):
        benchmark(out, tiny_model, "geneval", algos=["random"], budgets=[4, 8], categories="colors", limit=1,
                  checker="none", log=None, plot=False, export=("geneval", tmp_path / "x"))
    assert not any(r["budget"] == 8 for r in read_results(out / "results.jsonl"))


def test_a_finished_folder_without_images_says_so(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"prompt_index": 0, "prompt": "a", "algo": "random",
                                                        "budget": 4}) + "\n")
    with pytest.raises(ConfigError, match="holds 1 of 1 rows without their chosen image"):
        export_images(tmp_path, "t2i-compbench", tmp_path / "x")


# --- one search across processes ---------------------------------------------------------------------------------

def test_a_shard_splits_whole_batches_and_gathers_what_one_process_computes():
    from noiseopt.searches.core import Run, Shard

    x = torch.arange(10.0).view(10, 1)
    fn = lambda xb, kb: xb * 2 + torch.tensor(kb, dtype=torch.float32).view(-1, 1)  # noqa: E731
    keys = list(range(100, 110))
    whole = fn(x, keys)
    for count, batch in ((2, 2), (3, 2), (2, 8), (4, 3)):
        mine, calls = {}, []
        for index in range(count):  # each process's own share (its gather here returns only its own)
            s = Shard(index, count, gather=lambda obj, i=index: mine.__setitem__(i, obj) or [obj])
            s.map(lambda xb, kb: calls.append(len(xb)) or fn(xb, kb), x, keys, batch)
        assert all(c <= batch for c in calls)
        assert torch.equal(torch.cat([t for i in range(count) for t in mine[i][0]]), whole), (count, batch)
        if -(-10 // batch) >= count:  # enough batches: each process takes whole ones, the batches one process makes
            assert sorted(calls) == sorted([batch] * (10 // batch) + ([10 % batch] if 10 % batch else []))
    run = Run(prompt="p", seed=0, budget=None)
    two = [Shard(0, 2), Shard(1, 2)]
    two[0]._gather = lambda obj: [obj, ([torch.zeros(5, 1)], 7)]
    two[0].map(lambda xb, kb: xb, x, keys, 5, run)
    assert run.remote_nfe == 7  # the other process's NFEs are counted for this one


def _search(tmp: Path, launcher=()) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher] if launcher else [sys.executable, "-m", "noiseopt"]
    subprocess.run([*cmd, "search", "a red circle left of a blue square", "--algo", "smc", "--budget", "200",
                    "--batch-size", "2", "--device", "cpu", "--out", str(tmp), "--quiet"],
                   check=True, env=env, timeout=600, capture_output=True, text=True)
    return json.loads((tmp / "result.json").read_text())


@pytest.mark.slow
def test_one_search_across_two_processes_gives_what_one_process_gives(tmp_path):
    one = _search(tmp_path / "one")
    two = _search(tmp_path / "two", ("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                     "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "noiseopt"))
    assert (one["best_index"], one["baseline_index"], one["nfe"], one["verifier_calls"]) == \
        (two["best_index"], two["baseline_index"], two["nfe"], two["verifier_calls"])
    assert len(one["candidates"]) == len(two["candidates"]) > 20
    for a, b in zip(one["candidates"], two["candidates"]):
        assert (a["seeds"], a["step"], a["nfe"], a["parent"]) == (b["seeds"], b["step"], b["nfe"], b["parent"])
        assert all(abs(a["scores"][k] - b["scores"][k]) < 1e-5 for k in a["scores"])
    # written once, by the main process: one line per candidate, and the same images
    lines = (tmp_path / "two" / "candidates.jsonl").read_text().splitlines()
    assert len(lines) == len(two["candidates"])
    for name in ("best.png", "baseline.png"):
        assert np.array_equal(_pixels(tmp_path / "one" / name), _pixels(tmp_path / "two" / name))
    # the same command again resumes the finished run in both processes, and writes nothing twice; a line a killed
    # round wrote after the saved state is cut (by the main process alone)
    with open(tmp_path / "two" / "candidates.jsonl", "a") as f:
        f.write(lines[-1] + "\n")
    again = _search(tmp_path / "two", ("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                                       "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "noiseopt"))
    assert again["report"]["resumed"]["candidates"] == len(two["candidates"])
    assert [c["seeds"] for c in again["candidates"]] == [c["seeds"] for c in two["candidates"]]
    assert (tmp_path / "two" / "candidates.jsonl").read_text().splitlines() == lines
