"""The benchmark: its results file (cut lines, order, resume), its settings check, its prompt sets, many processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from noiseopt.benchmarks.data import _finalize, _repair, load_prompts, read_results
from noiseopt.benchmarks.run import benchmark
from noiseopt.benchmarks.tables import format_table, summarize
from noiseopt.cli import main
from noiseopt.errors import ConfigError, NoiseoptError

ARGS = ["--prompts", "shapes-eval", "--stride", "90", "--limit", "2", "--algos", "random,zo,paths", "--budgets",
        "25,50,75", "--device", "cpu"]


def _row(k, algo, budget, **extra):
    return {"prompt_index": k, "prompt": f"p{k}", "algo": algo, "budget": budget, **extra}


def test_a_cut_last_line_is_dropped_and_the_file_ends_in_a_fixed_order(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = [_row(1, "steps", 50), _row(0, "zo", 50), _row(0, "random", 50), _row(0, "zo", 25), _row(0, "random", 50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt_index": 2, "pro')
    assert len(read_results(path)) == 5  # the cut line is not a row
    _repair(path)
    assert path.read_text().endswith("}\n")
    with open(path, "a") as f:  # the next row starts on a line of its own
        f.write(json.dumps(_row(2, "random", 25)) + "\n")
    out = _finalize(path)
    assert [(r["prompt_index"], r["algo"], r["budget"]) for r in out] == [
        (0, "random", 50), (0, "zo", 25), (0, "zo", 50), (1, "steps", 50), (2, "random", 25)]  # duplicates once
    assert read_results(path) == out


def test_a_folder_of_other_settings_is_refused_before_anything_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "shapes", "verifiers": ["clip"], "eval_verifiers": [],
                                                      "ensemble": "rank", "seed": 0, "trajectories": True}))
    with pytest.raises(ConfigError, match="other verifiers"):
        benchmark(tmp_path, "shapes", "shapes-eval", algos=["random"], budgets=[25], limit=1, log=None)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        benchmark(tmp_path / "b", "shapes", "shapes-eval", algos=["best"], budgets=[25], log=None)


def test_prompt_sets(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("a red circle\n\n  a blue square  \n")
    assert load_prompts(str(f)) == ("mine.txt", ["a red circle", "a blue square"])
    assert len(load_prompts("shapes-eval", "shapes")[1]) == 200
    train = load_prompts("shapes-train", "shapes")[1]  # what the sweeps tune on: never a shapes-eval prompt
    assert len(train) > 200 and not set(train) & set(load_prompts("shapes-eval", "shapes")[1])
    assert len(load_prompts("reference")[1]) == 4
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="unknown prompt set 'nope'.*shapes-eval, shapes-train, geneval, partiprompts, t2i-compbench, reference, drawbench"):
        load_prompts("nope", "shapes")
    with pytest.raises(NoiseoptError, match="could not fetch the drawbench prompts"):  # the tests are offline
        load_prompts("drawbench")


def test_the_command_line_says_what_is_wrong(capsys):
    assert main(["bench", "--budgets", "25,lots"]) == 2
    assert "--budgets takes whole numbers" in capsys.readouterr().err
    assert main(["bench", "--algos", "random,best", "--budgets", "25"]) == 2
    assert "unknown algorithm(s) ['best']" in capsys.readouterr().err


def test_summary_intervals_and_skips():
    rows = [_row(k, "random", b, nfe=b, num_steps=25, baseline={"v": 0.0}, best={"v": float(k + b / 25)},
                 checker_baseline=False, checker_best=k > 0) for k in range(3) for b in (25, 50)]
    rows += [_row(k, "paths", 25, skipped="paths needs a budget of at least 50 NFEs", min_budget=50) for k in range(3)]
    s = summarize(rows, "t")
    p = s["algos"]["random"]["points"][1]
    assert p["n"] == 3 and p["search/v"]["mean"] == 3.0 and p["checker"]["mean"] == 2 / 3
    assert s["algos"]["paths"]["points"][0]["needs"] == 50
    table = format_table(s)
    assert "| ensemble + paths" not in table and "| v + paths | needs >= 50 | - | - | 0 |" in table
    assert "| random noise (1 sample) | 25 | 25 | 1 | 3 | 0.000 ± 0.000 | 0% [0, 56] |" in table


def _bench(out, *extra, launcher=(sys.executable, "-m", "noiseopt.bench"), **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*launcher, *ARGS, "--out", str(out), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    proc = _bench(out)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    return out


@pytest.mark.slow
def test_two_processes_write_what_one_does(one_process, tmp_path):
    proc = _bench(tmp_path, launcher=("accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                                      "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "noiseopt.bench"))
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    assert "bench[0]:" in stderr and "bench[1]:" in stderr  # two processes, each with its share
    assert stdout.count("wrote ") == 1  # the main process alone writes the table
    rows = read_results(one_process / "results.jsonl")
    assert len(rows) == 2 * 3 * 3 and not any("skipped" in r for r in rows)  # paths runs as best-of-1 at 25 NFEs
    for name in ("results.jsonl", "table.md", "table.csv"):
        assert (tmp_path / name).read_bytes() == (one_process / name).read_bytes(), name
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_stopped_benchmark_resumes_to_the_same_file(one_process, tmp_path):
    proc = _bench(tmp_path)
    results = tmp_path / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = read_results(results)
    assert 2 <= len(done) < 18 and not (tmp_path / "table.md").exists()  # it stopped part-way
    with open(results, "a") as f:  # as if killed in the middle of a write
        f.write('{"prompt_index": 1, "prompt": "a')
    proc = _bench(tmp_path)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    assert stderr.count("bench[0]:") < 2 * 3  # what was done was not done again
    for name in ("results.jsonl", "table.md", "table.csv"):
        assert (tmp_path / name).read_bytes() == (one_process / name).read_bytes(), name


def test_a_set_with_categories_gets_a_table_by_category():
    "GenEval's figure is per tag: the checker's share of passes per category, next to the one over all prompts."
    tags = ["single_object", "counting", "colors"]
    passes = {"random": {0, 1, 3}, "zo": {0, 3, 4, 5}}  # zo: single_object 2/2, counting 1/2, colors 1/2
    rows = [_row(k, algo, 50, category=tags[k % 3], nfe=50, num_steps=25, baseline={"v": 0.0}, best={"v": 1.0},
                 eval_baseline={"h": float(k)}, eval_best={"h": float(k + 1)}, checker_baseline=k in (0, 4),
                 checker_best=k in passes[algo])
            for k in range(6) for algo in ("random", "zo")]
    rows += [_row(k, "zo", 25, category=tags[k % 3], skipped="zo needs 50", min_budget=50) for k in range(6)]
    s = summarize(rows, "t")
    cat = s["by_category"]
    assert cat["metric"]["kind"] == "checker" and cat["categories"] == tags
    assert {t: st["mean"] for t, st in cat["baseline"].items()} == {"single_object": 0.5, "counting": 0.5, "colors": 0.0}
    assert [(p["algo"], p["budget"]) for p in cat["points"]] == [("random", 50), ("zo", 50)]  # the skipped budget: none
    zo = cat["points"][1]["stats"]
    assert [zo[t]["mean"] for t in tags] == [1.0, 0.5, 0.5] and cat["points"][1]["all"]["mean"] == 4 / 6
    table = format_table(s)
    assert "#### by category: checker accuracy\n\n| method | NFEs | single_object | counting | colors | all |" in table
    assert "| random noise (1 sample) | 25 | 50% [9, 91] | 50% [9, 91] | 0% [0, 66] | 33% [10, 70] |" in table
    assert "| v + random | 50 | 100% [34, 100] | 50% [9, 91] | 0% [0, 66] | 50% [19, 81] |" in table
    assert "| v + zero-order | 50 | 100% [34, 100] | 50% [9, 91] | 50% [9, 91] | 67% [30, 90] |" in table
    # "all" is over the prompts with a category, where a resumed folder also holds rows written without one
    mixed = summarize(rows + [{k: v for k, v in r.items() if k != "category"} | {"prompt_index": r["prompt_index"] + 6}
                              for r in rows if "skipped" not in r], "t")
    assert mixed["by_category"]["baseline_all"]["mean"] == 2 / 6 and mixed["baseline"]["checker"]["mean"] == 4 / 12
    # without a checker, the first held-out verifier; with one category, or none, no such table
    no_checker = [{k: v for k, v in r.items() if not k.startswith("checker")} for r in rows]
    assert summarize(no_checker, "t")["by_category"]["metric"]["key"] == "eval/h"
    for same in ([{**r, "category": "colors"} for r in rows], [{k: v for k, v in r.items() if k != "category"} for r in rows]):
        assert "by_category" not in summarize(same, "t") and "by category" not in format_table(summarize(same, "t"))
