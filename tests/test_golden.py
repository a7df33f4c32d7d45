"""The verifiers agree with their originals: each case of tests/golden (computed by the original code on a small seeded
model, see its README) is reproduced through the public loading API, one image per call and as one mixed-size list."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from noiseopt.core import from_pil
from noiseopt.verifiers import AestheticScore, CLIPScore, HPSv2, PickScore

GOLDEN = Path(__file__).resolve().parent / "golden"
TOL = 1e-4  # the originals run in float32 too: what is left is summation order


def case(name: str):
    c = json.loads((GOLDEN / name / "case.json").read_text())
    images = [Image.open(GOLDEN / name / f).convert("RGB") for f in c["images"]]
    assert [list(im.size) for im in images] == c["sizes"]  # awkward sizes: odd, non-square, smaller and larger than 224
    return c, images, c.get("prompts", [""] * len(images))


def load(name: str):
    root = GOLDEN / name
    if name == "aesthetic_small":
        return AestheticScore.from_pretrained(head=root / "head.safetensors", clip=root / "clip")
    if name == "clipscore_small":
        return CLIPScore.from_pretrained(root / "clip")
    if name == "pickscore_small":
        return PickScore.from_pretrained(root / "model", root / "processor")
    import open_clip

    open_clip.add_model_config(root / "model_configs")
    return HPSv2.from_pretrained(root / "hps_tiny.safetensors", model_name=json.loads((root / "case.json").read_text())["model_name"])


CASES = ["aesthetic_small", "clipscore_small", "pickscore_small", "hpsv2_small"]


@pytest.mark.parametrize("name", CASES)
def test_one_image_per_call_as_tensors(name):
    c, images, prompts = case(name)
    verifier = load(name)
    got = torch.tensor([float(verifier.score(from_pil(im), [p])[0]) for im, p in zip(images, prompts)])
    torch.testing.assert_close(got, torch.tensor(c["scores"]), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_one_mixed_size_list(name):
    c, images, prompts = case(name)
    verifier = load(name)
    as_pil = verifier.score(images, prompts)
    as_tensors = verifier.score([from_pil(im)[0] for im in images], prompts)
    torch.testing.assert_close(as_pil, torch.tensor(c["scores"]), atol=TOL, rtol=0)
    torch.testing.assert_close(as_tensors, as_pil, atol=1e-6, rtol=0)


def test_the_easy_mistakes_are_caught():
    "The originals' traps move the scores by far more than the tolerance: the tests above would see them."
    c, images, prompts = case("clipscore_small")
    no_prefix = CLIPScore.from_pretrained(GOLDEN / "clipscore_small" / "clip", prefix="").score(images, prompts)
    torch.testing.assert_close(no_prefix, torch.tensor(c["diagnostics"]["scores_without_prefix"]), atol=TOL, rtol=0)
    assert (no_prefix - torch.tensor(c["scores"])).abs().max() > 10 * TOL
    c, images, prompts = case("hpsv2_small")
    assert max(abs(a - b) for a, b in zip(c["scores"], c["diagnostics"]["scores_pil_8bit_pad"])) > TOL


def test_clip_text_is_cleaned_as_the_original_tokenizer_cleans_it():
    from noiseopt.verifiers import clip_text_clean

    assert clip_text_clean("a  cat &amp;amp; a\tdog ") == "a cat & a dog"
    assert clip_text_clean("cafÃ©") == "café"  # ftfy mends mojibake


def test_pickscore_probabilities_are_the_softmax_of_its_scores():
    c, images, prompts = case("pickscore_small")
    verifier = load("pickscore_small")
    probs = verifier.probabilities(images, prompts[0])
    scores = verifier.scores(images, [prompts[0]] * len(images))
    torch.testing.assert_close(probs, torch.softmax(scores, 0))
    assert abs(float(probs.sum()) - 1) < 1e-6
    as_option = PickScore.from_pretrained(GOLDEN / "pickscore_small" / "model", GOLDEN / "pickscore_small" / "processor",
                                          probabilities=True)
    torch.testing.assert_close(as_option.score(images, [prompts[0]] * len(images)), probs)
