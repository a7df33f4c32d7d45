"""The shapes world: its generator and grammar, the exact checker, the shipped models, and training."""
import copy
import subprocess

import numpy as np
import pytest
import torch

from noiseopt.core import ConfigError, ModelNotFoundError, PromptError
from noiseopt.shapes import (CONSTRUCTIONS, EVAL_SPECS, SHAPES_EVAL, TRAIN_SPECS, all_specs, assets_path, caption,
                             Spec, check, checker_rates, parse, perturb, random_spec, render, scenes)
from noiseopt.shapes_train import train_prompts


def test_generator_is_seeded_and_captions_follow_the_grammar():
    a, b = scenes(16, seed=7), scenes(16, seed=7)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not torch.equal(a[0], scenes(16, seed=8)[0])
    for spec in all_specs():
        assert parse(caption(spec)) == spec
        assert parse(caption(spec, short_relation=True)) == spec
    # every construction is drawn, and the background is light while shapes are saturated
    rng = np.random.default_rng(0)
    drawn = [random_spec(rng) for _ in range(500)]
    assert {s.construction for s in drawn} == set(CONSTRUCTIONS)
    img = render(drawn[0], rng)
    assert img[0, 0].min() >= 200


def test_eval_prompts_are_held_out_of_training():
    assert len(SHAPES_EVAL) == 200 and {parse(p).construction for p in SHAPES_EVAL} == set(CONSTRUCTIONS)
    held_out = set(EVAL_SPECS)
    assert not held_out & set(TRAIN_SPECS)
    _, texts, specs = scenes(3000, seed=123)
    assert not held_out & set(specs)
    assert not set(SHAPES_EVAL) & set(texts)


def test_checker_rates_on_clean_scenes():
    rates = checker_rates(1000, seed=11)
    assert rates["true"] >= 0.99, rates
    assert rates["changed"] <= 0.01, rates


def test_checker_parts():
    spec = parse("a red circle on the left of a blue square")
    img = render(spec, np.random.default_rng(5))
    v = check(torch.from_numpy(img).permute(2, 0, 1).float() / 255, caption(spec))
    assert v.passed and v.objects and v.count and v.relation
    swapped = check(img, "a red circle on the right of a blue square")
    assert not swapped.passed and swapped.objects and swapped.relation is False
    wrong_color = check(img, "a green circle on the left of a blue square")
    assert not wrong_color.passed and not wrong_color.colors
    # a blank picture has nothing in it
    blank = check(torch.ones(3, 32, 32), "two red circles")
    assert not blank.passed and blank.found == [] and not blank.count
    with pytest.raises(PromptError):
        check(img, "a purple circle")
    rng = np.random.default_rng(1)
    for spec in all_specs()[::7]:
        changed = perturb(spec, rng)
        assert changed != spec and parse(caption(changed)) == changed


def test_train_prompts_are_training_captions_mixed_like_shapes_eval():
    prompts = train_prompts(60)
    specs = [parse(p) for p in prompts]
    assert len(set(specs)) == 60 and not set(specs) & set(EVAL_SPECS) and prompts == train_prompts(60)
    counts = {c: sum(s.construction == c for s in specs) for c in CONSTRUCTIONS}
    assert counts["relation"] > counts["two"] > counts["position"] > max(counts["single"], counts["count"]), counts


def test_negative_renders_make_the_caption_false():
    from noiseopt.shapes_train import negative_render

    rng = np.random.default_rng(5)
    passed, extra, dropped = 0, 0, 0
    for _ in range(300):
        spec = random_spec(rng)
        verdict = check(negative_render(spec, rng), caption(spec))
        passed += verdict.passed
        extra += verdict.objects and not verdict.count  # every named object there, one of them twice
        dropped += not verdict.objects
    # the checker passes about 1% of one-attribute-changed captions on clean scenes; the same bound holds here
    assert passed <= 6, passed
    assert extra >= 50 and dropped >= 20, (extra, dropped)


def test_swapped_negatives_exchange_a_relations_objects():
    from noiseopt.shapes_train import negative_caption, negative_render, render_pair, swapped

    rng = np.random.default_rng(6)
    relations = [s for s in TRAIN_SPECS if s.construction == "relation" and s.objects[0] != s.objects[1]]
    failed_on_relation = 0
    for spec in relations[:40]:
        other = swapped(spec)
        assert other.relation == spec.relation and other.objects == spec.objects[::-1]
        verdict = check(negative_render(spec, rng, kind="swapped"), caption(spec))
        failed_on_relation += verdict.objects and verdict.count and verdict.relation is False
    assert failed_on_relation >= 36, failed_on_relation  # the objects all there, in the opposite order
    two = Spec("two", (("red", "circle"), ("blue", "square")))
    assert swapped(two) == Spec("two", (("blue", "circle"), ("red", "square")))
    assert swapped(Spec("two", (("red", "circle"), ("red", "square")))) is None  # exchanging changes nothing
    assert swapped(Spec("two", (("red", "circle"), ("blue", "circle")))) is None
    assert swapped(Spec("single", (("red", "circle"),))) is None
    for spec in relations[:20] + [two]:  # a pair differs in nothing but the exchange
        true, other = render_pair(spec, rng)
        assert check(torch.from_numpy(true).permute(2, 0, 1).float() / 255, caption(spec)).passed
        exchanged = torch.from_numpy(other).permute(2, 0, 1).float() / 255
        assert not check(exchanged, caption(spec)).passed and check(exchanged, caption(swapped(spec))).passed
        assert ((true != other).any(-1) == 0).sum() > 0.5 * true.shape[0] * true.shape[1]  # the background is shared
    assert render_pair(Spec("single", (("red", "circle"),)), rng)[1] is None
    captions = {negative_caption(relations[0], rng) for _ in range(40)}
    assert caption(swapped(relations[0])) in captions or caption(swapped(relations[0]), short_relation=True) in captions
    assert caption(relations[0]) not in captions and len(captions) > 3


@pytest.fixture(scope="module")
def models():
    from noiseopt.shapes import load

    return load()


def test_shipped_weights_load_offline(models):
    from noiseopt.samplers import DiffusersSampler
    from noiseopt.verifiers import AestheticScore, CLIPScore, Verifier

    assert isinstance(models.sampler, DiffusersSampler) and models.sampler.vae is None
    assert models.sampler.num_steps == 25 and models.sampler.guidance_scale == 2.0
    assert isinstance(models.clip, CLIPScore) and isinstance(models.aesthetic, AestheticScore)
    assert all(isinstance(v, Verifier) for v in models.verifiers)
    size = sum(p.stat().st_size for p in assets_path().rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"shipped weights take {size / 2**20:.1f} MB"
    with pytest.raises(ModelNotFoundError, match="noiseopt shapes train"):
        from noiseopt.shapes import load
        load("/nonexistent/shapes")


def test_sampler_settings_can_be_changed(models):
    from noiseopt.shapes_train import with_settings

    changed = with_settings(models, guidance_scale=3.0, spacing="trailing")
    assert changed.sampler is not models.sampler and changed.sampler.guidance_scale == 3.0
    assert changed.clip is models.clip  # the verifiers are shared, the models' own sampler untouched
    assert int(models.sampler.timesteps[0]) == 961 and int(changed.sampler.timesteps[0]) == 999  # leading vs trailing
    assert with_settings(models) is models and models.sampler.guidance_scale == 2.0
    with pytest.raises(ConfigError, match="spacing"):
        with_settings(models, spacing="karras")


@pytest.mark.slow
def test_trained_model_beats_untrained(models):
    from noiseopt.samplers import DiffusersSampler
    from noiseopt.shapes_train import build_unet

    prompts = list(SHAPES_EVAL[::12][:16])
    assert {parse(p).construction for p in prompts} >= {"position", "two", "relation"}
    pipe = copy.copy(models.sampler.pipe)
    torch.manual_seed(0)
    pipe.unet = build_unet().eval()
    untrained = DiffusersSampler(pipe, num_steps=25, guidance_scale=2.0, batch_size=16)

    def passes(sampler):
        total = 0
        for k, prompt in enumerate(prompts):
            seeds = [1000 + 2 * k, 1001 + 2 * k]
            images = sampler.decode(sampler.denoise(sampler.noise(seeds), sampler.condition(prompt)))
            total += sum(check(im, prompt).passed for im in images)
        return total

    trained, chance = passes(models.sampler), passes(untrained)
    print(f"passes out of {2 * len(prompts)}: trained {trained}, untrained {chance}")
    # the untrained model sets the chance level; the trained one must clear it by a wide margin
    assert trained >= chance + 6 and trained >= 0.15 * 2 * len(prompts)


def test_shapes_verifiers_prefer_true_captions_and_clean_images(models):
    from noiseopt.shapes_train import _auc, degrade

    rng = np.random.default_rng(3)
    specs = [EVAL_SPECS[i] for i in rng.choice(len(EVAL_SPECS), 64, replace=False)]
    images = torch.stack([torch.from_numpy(render(s, rng)).permute(2, 0, 1).float() / 255 for s in specs])
    true = models.clip.score(images, [caption(s) for s in specs])
    changed = models.clip.score(images, [caption(perturb(s, rng)) for s in specs])
    assert (true > changed).float().mean() >= 0.75, (true > changed).float().mean()
    degraded, _ = degrade(images, rng, p_clean=0.0)
    auc = _auc(models.aesthetic.score(images).tolist(), models.aesthetic.score(degraded).tolist())
    assert auc >= 0.9, auc
    # verifiers never change the images they are given
    before = images.clone()
    models.clip.score(images, [caption(s) for s in specs])
    assert torch.equal(images, before)


def test_training_smoke_run_and_resume(tmp_path):
    from noiseopt.shapes import load
    from noiseopt.shapes_train import train

    with pytest.raises(ConfigError, match="train the 'clip' part first"):
        train(tmp_path, minutes=5, parts=("order",), order_steps=2)
    assert train(tmp_path, minutes=5, model_steps=2, clip_steps=2, order_steps=2)
    log = (tmp_path / "train.log").read_text()
    assert "model: step 2/2" in log and "clip: step 2/2" in log and "order: step 2/2" in log
    assert train(tmp_path, minutes=5, model_steps=3, clip_steps=3, order_steps=3)
    assert (tmp_path / "train.log").read_text().count("resumed at step 2") == 3
    small = load(tmp_path)
    images = small.sampler.decode(small.sampler.denoise(small.sampler.noise([0]), small.sampler.condition("a red circle")))
    assert images.shape == (1, 3, 32, 32)


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_shapes_eval_and_errors(tmp_path):
    out = run("noiseopt", "shapes", "eval", "--prompts", "3", "--samples", "2", "--no-timing",
              "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    assert "| overall | 3 |" in out.stdout and "aesthetic: AUC" in out.stdout
    assert out.stdout.startswith("shapes-eval: 3 prompts x 2 samples, seed 0 (25 steps, guidance 2, even from t=961 spacing)")
    assert (tmp_path / "r.json").is_file()
    train = run("noiseopt", "shapes", "eval", "--split", "train", "--prompts", "2", "--samples", "2", "--no-timing",
                "--guidance", "1.5", "--spacing", "trailing", "--json", str(tmp_path / "t.json"))
    assert train.returncode == 0, train.stderr
    assert train.stdout.startswith("training prompts: 2 prompts x 2 samples, seed 0 (25 steps, guidance 1.5, trailing")
    import json
    assert [r["prompt"] for r in json.loads((tmp_path / "t.json").read_text())["rows"]] == train_prompts(2)
    for args in (("shapes", "eval", "--samples", "0"), ("shapes", "eval", "--path", str(tmp_path / "none")),
                 ("shapes", "eval", "--split", "train", "--guidance", "0.5"),
                 ("shapes", "train", "--out", str(tmp_path / "t"), "--minutes", "0"),
                 ("shapes", "train", "--out", str(tmp_path / "t"), "--parts", "vae")):
        bad = run("noiseopt", *args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.startswith("noiseopt: error:") and "Traceback" not in bad.stderr


def test_the_checkers_scope_as_the_readme_says():
    "Objects the caption does not name do not fail it; a named object must appear exactly as often as said."
    import numpy as np

    from noiseopt.shapes import check, parse, render

    rng = np.random.default_rng(0)
    for k in range(5):
        pair = render(parse("a red circle and a blue square"), rng)
        v = check(pair, "a red circle")
        assert v.passed and v.extra == 1, k
        two = render(parse("two red squares"), rng)
        assert check(two, "two red squares").passed and not check(two, "a red square").passed  # one too many
