"""The GPT judge against a real local OpenAI-compatible server that judges images and injects faults."""
import asyncio
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from noiseopt.core import ConfigError, NoiseoptError, to_pil
from noiseopt.judge import GPTJudge
from noiseopt.judge_server import FakeJudgeServer, expected_overall
from noiseopt.shapes import scenes

KEY = "sk-test-7f3a9c2e-never-log-me"


def batch(n, seed=0):
    imgs, texts, _ = scenes(n, seed=seed)
    return imgs, texts


def expected(imgs, texts):
    return np.array([10 * expected_overall(to_pil(im)[0], t) for im, t in zip(imgs, texts)])


def judge_for(server, **kw):
    return GPTJudge(model="fake-vlm", base_url=server.base_url, api_key=KEY, backoff=0.02, max_backoff=0.2, **kw)


def test_transient_faults_are_retried_in_order_within_concurrency():
    rng = np.random.default_rng(0)
    imgs, texts = batch(64, seed=1)
    faulty = {}

    def plan(info):  # 30% of candidates hit one or two transient faults before an answer
        if info["key"] not in faulty:
            faulty[info["key"]] = rng.random() < 0.3
        if faulty[info["key"]] and info["attempt"] < 1 + (hash(info["key"]) % 2):
            return ("429", "500", "drop", "slow")[int(rng.integers(4))]
        return None

    with FakeJudgeServer(api_key=KEY, plan=plan, slow_seconds=1.5) as server:
        judge = judge_for(server, concurrency=8, timeout=1.0)
        t0 = time.perf_counter()
        scores = judge.score(imgs, texts)
        wall = time.perf_counter() - t0
    faults = [e for e in server.log if e.get("fault")]
    print(f"\n64 candidates, {sum(faulty.values())} with transient faults: {server.requests} requests, "
          f"{judge.usage['retries']} retries, {len(faults)} faults injected, max in flight {server.max_in_flight}, "
          f"{wall:.1f} s")
    assert 0.15 < np.mean(list(faulty.values())) < 0.45 and len(faults) >= 15
    np.testing.assert_allclose(scores.numpy(), expected(imgs, texts), atol=1e-3)
    assert not torch.isnan(scores).any() and judge.usage["failures"] == 0
    # every fault is retried; on a loaded machine (tests run two workers) a connection can also fail before the
    # server logs it, or an unfaulted answer can miss the 1 s timeout: a retry or two more, never a failure
    assert server.max_in_flight <= 8 and 64 + len(faults) <= server.requests <= 64 + judge.usage["retries"]
    assert len(faults) <= judge.usage["retries"] <= len(faults) + 3


def test_permanent_faults_give_nan_exactly_there():
    imgs, texts = batch(12, seed=2)
    broken = {1: "malformed", 4: "refusal", 7: "wrong_schema", 9: "500"}
    bad_prompts = {}
    for i, kind in broken.items():
        texts[i] = texts[i] + " " * (i + 1)  # distinct prompts the plan recognises
        bad_prompts[texts[i]] = kind
    with FakeJudgeServer(api_key=KEY, plan=lambda info: bad_prompts.get(info["prompt"])) as server:
        judge = judge_for(server, max_retries=2)
        scores = judge.score(imgs, texts)
    assert sorted(np.flatnonzero(torch.isnan(scores).numpy()).tolist()) == sorted(broken)
    ok = [i for i in range(12) if i not in broken]
    np.testing.assert_allclose(scores[ok].numpy(), expected(imgs, texts)[ok], atol=1e-3)
    assert sorted(f["batch_index"] for f in judge.failures) == sorted(broken)
    # answers that arrive unusable are asked again once (with a reminder); server errors get max_retries retries
    per_key = {}
    for e in server.log:
        per_key.setdefault(e["prompt"], []).append(e)
    assert all(len(per_key[texts[i]]) == 2 for i in (1, 4, 7)) and len(per_key[texts[9]]) == 3
    assert judge.last_details[1] == {"error": judge.failures[0]["error"]} or "error" in judge.last_details[1]


def test_a_search_with_the_judge_picks_among_scored_candidates(tmp_path, caplog):
    from noiseopt.ensemble import Ensemble
    from noiseopt.search import RandomSearch
    from noiseopt.shapes import load

    world = load()
    seen, failing = [], set()

    def plan(info):  # every other new image, in the order first asked about, is refused for good
        if info["key"] not in seen:  # by images, not requests: retries interleave with first requests
            seen.append(info["key"])
            if len(seen) % 2 == 1 and len(failing) < 4:
                failing.add(info["key"])
        return "refusal" if info["key"] in failing else None

    caplog.set_level(logging.DEBUG)
    with FakeJudgeServer(api_key=KEY, plan=plan) as server:
        judge = judge_for(server, cache_dir=tmp_path / "cache")
        res = RandomSearch(world.sampler, Ensemble([world.clip, judge]), batch_size=8).run(
            "a red circle", 8 * world.sampler.num_steps, seed=3, out=tmp_path / "run")
    failed = res.report["failed_candidates"]
    assert len(failed) == 4 and all(np.isnan(res.candidates[i].scores["gpt"]) for i in failed)
    assert res.best_index not in failed and not np.isnan(res.best.scores["gpt"])
    assert res.best.info["details"]["gpt"]["scores"]["overall_score"] == pytest.approx(res.best.scores["gpt"] / 10)
    assert res.report["gpt_usage"]["failures"] == 4
    # the key is nowhere: not in the output folder, the cache, the logs, the judge's repr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in caplog.text and KEY not in repr(judge) and KEY not in json.dumps(res.to_dict(), default=str)
    assert KEY not in str(vars(judge))


def test_bad_key_is_one_clear_error_and_one_request():
    imgs, texts = batch(16, seed=4)
    with FakeJudgeServer(api_key="sk-the-right-one") as server:
        judge = GPTJudge(model="fake-vlm", base_url=server.base_url, api_key=KEY, concurrency=8)
        with pytest.raises(NoiseoptError, match="rejected the key") as e:
            judge.score(imgs, texts)
    assert server.requests == 1 and KEY not in str(e.value)


def test_missing_key_stops_before_any_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeJudgeServer(api_key=KEY) as server:
        judge = GPTJudge(base_url=server.base_url)
        with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
            judge.score(*batch(2))
    assert server.requests == 0


def test_cache_makes_a_repeat_free(tmp_path):
    imgs, texts = batch(10, seed=5)
    with FakeJudgeServer(api_key=KEY) as server:
        first = judge_for(server, cache_dir=tmp_path).score(imgs, texts)
        sent = server.requests
        again = judge_for(server, cache_dir=tmp_path)
        second = again.score(imgs, texts)
        assert server.requests == sent == 10 and again.usage["cached"] == 10
        torch.testing.assert_close(first, second)
        judge_for(server, cache_dir=tmp_path, mode="yesno").score(imgs[:2], texts[:2])  # another mode: not cached
        assert server.requests == 12


def test_yesno_mode_and_missing_logprobs():
    imgs, texts = batch(6, seed=6)
    with FakeJudgeServer(api_key=KEY, plan=lambda info: "no_logprobs" if info["prompt"] == texts[2] else None) as server:
        scores = judge_for(server, mode="yesno").score(imgs, texts)
    exp = expected(imgs, texts)  # P(Yes) = overall / 10, as a percentage
    ok = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(scores[ok].numpy(), exp[ok], atol=1e-3)
    assert torch.isnan(scores[2])


def test_text_json_fallback_when_structured_outputs_are_refused():
    imgs, texts = batch(5, seed=7)
    with FakeJudgeServer(api_key=KEY, plan=lambda info: "no_structured") as server:
        judge = judge_for(server)
        scores = judge.score(imgs, texts)
    np.testing.assert_allclose(scores.numpy(), expected(imgs, texts), atol=1e-3)
    assert judge.structured is False and server.requests == 6  # one refused structured request, then text answers


def test_works_inside_a_running_event_loop():
    imgs, texts = batch(3, seed=8)
    with FakeJudgeServer(api_key=KEY) as server:
        judge = judge_for(server)

        async def notebook_cell():  # Jupyter runs cells inside an event loop
            return judge.score(imgs, texts)

        scores = asyncio.run(notebook_cell())
    np.testing.assert_allclose(scores.numpy(), expected(imgs, texts), atol=1e-3)


@pytest.mark.slow
def test_cli_search_with_the_judge(tmp_path):
    out = tmp_path / "run"
    with FakeJudgeServer(api_key=KEY) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        done = subprocess.run([sys.executable, "-m", "noiseopt.cli", "search", "a blue square on the left", "--budget",
                               "100", "--verifiers", "clip,aesthetic,gpt", "--gpt-base-url", server.base_url,
                               "--gpt-model", "fake-vlm", "--out", str(out), "--quiet"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr
        assert server.requests >= 4
    record = json.loads((out / "result.json").read_text())
    assert record["settings"]["verifiers"] == ["clip", "aesthetic", "gpt"]
    assert all(0 <= c["scores"]["gpt"] <= 100 for c in record["candidates"])
    assert "gpt" in done.stdout
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in done.stdout + done.stderr
