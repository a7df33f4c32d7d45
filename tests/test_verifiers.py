"""Real verifiers, checked offline: ImageReward against the original code's outputs, the others against
their formulas computed by hand on tiny config-built models saved to and loaded from folders."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from noiseopt.core import ConfigError, ModelNotFoundError
from noiseopt.verifiers import (AestheticHead, AestheticScore, CLIPScore, HPSv2, ImageReward, PickScore, Verifier,
                                imagereward_from_state_dict, imagereward_tokenizer, load_verifier,
                                pil_preprocess)

GOLDEN = Path(__file__).resolve().parent / "golden" / "imagereward_small"  # reference data carried into the project


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    case = json.loads((GOLDEN / "case.json").read_text())
    model = imagereward_from_state_dict(load_file(str(GOLDEN / "state_dict.safetensors")), case["vision"], case["text"])
    images = [Image.open(GOLDEN / name) for name in case["images"]]
    return case, model, images


def test_imagereward_reproduces_the_original(golden):
    case, model, images = golden
    assert len({im.size for im in images}) == 3  # non-square, portrait and square: resize and crop both matter
    with torch.no_grad():
        pixels = pil_preprocess(images, 224)
        reward = model.reward(pixels, torch.tensor(case["input_ids"]), torch.tensor(case["attention_mask"]))
        tokens = model.vision(pixel_values=pixels[:1]).last_hidden_state
    np.testing.assert_allclose(reward.numpy(), case["reward"], atol=1e-4)
    np.testing.assert_allclose(tokens[0, 0, :8].numpy(), case["image_token_features_first_row"], atol=1e-4)


class GoldenTokens:
    "Stands in for BERT's tokenizer: gives the case's token ids for its prompts (the case has no tokenizer)."

    def __init__(self, case):
        self.rows = {f"prompt {i}": i for i in range(len(case["input_ids"]))}
        self.case = case

    def __call__(self, prompts, padding, truncation, max_length, return_tensors):
        from transformers import BatchEncoding

        assert (padding, truncation, max_length) == ("max_length", True, 35)
        idx = [self.rows[p] for p in prompts]
        return BatchEncoding({"input_ids": torch.tensor([self.case["input_ids"][i] for i in idx]),
                              "attention_mask": torch.tensor([self.case["attention_mask"][i] for i in idx])})


def test_imagereward_verifier_on_tensors(golden):
    case, model, images = golden
    verifier = ImageReward(model, GoldenTokens(case), batch_size=2)  # batches of 2 and 1
    assert isinstance(verifier, Verifier)
    for order in ([0, 1, 2], [2, 0, 1]):
        scores = [verifier.score(to_tensor(images[i])[None], [f"prompt {i}"]) for i in order]
        np.testing.assert_allclose(torch.cat(scores).numpy(), [case["reward"][i] for i in order], atol=1e-4)
    # a batch of same-size images goes through one call
    square = to_tensor(images[2])
    batch = verifier.score(torch.stack([square, square.flip(-1)]), ["prompt 2", "prompt 2"])
    assert batch[0].item() == pytest.approx(case["reward"][2], abs=1e-4) and batch[1].item() != pytest.approx(batch[0].item())


def test_imagereward_refuses_wrong_checkpoints(golden):
    from safetensors.torch import load_file

    case = golden[0]
    state = load_file(str(GOLDEN / "state_dict.safetensors"))
    missing = {k: v for k, v in state.items() if "crossattention.self.key.weight" not in k}
    with pytest.raises(ModelNotFoundError, match="does not fit the text"):
        imagereward_from_state_dict(missing, case["vision"], case["text"])
    with pytest.raises(ModelNotFoundError, match="unexpected key"):
        imagereward_from_state_dict({**state, "blip.itm_head.weight": torch.zeros(2)}, case["vision"], case["text"])
    wrong = dict(case["vision"], hidden_size=32, num_attention_heads=2)
    with pytest.raises((ModelNotFoundError, RuntimeError)):
        imagereward_from_state_dict(state, wrong, case["text"])


def test_imagereward_tokenizer_is_blips(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "bert")
    tok = imagereward_tokenizer(tmp_path / "bert")
    assert tok.bos_token == "[DEC]" and tok.convert_tokens_to_ids("[DEC]") == len(words)
    assert "[ENC]" in tok.all_special_tokens and tok.convert_tokens_to_ids("[ENC]") == len(words) + 1
    ids = tok(["a red cat"], padding="max_length", truncation=True, max_length=35).input_ids[0]
    assert ids[:5] == [2, 5, 6, 7, 3] and len(ids) == 35  # [CLS] a red cat [SEP], padded


# --- CLIP-family verifiers on tiny models ------------------------------------------------------------------------

def tiny_clip(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from noiseopt.testing import clip_tokenizer

    torch.manual_seed(seed)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=24, vocab_size=49408)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=8, projection_dim=24)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24,
                                 logit_scale_init_value=3.0))
    model.save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(folder)
    return folder


def by_hand(folder: Path, images: torch.Tensor, prompts, size: int = 32, mode: str = "crop", crop: str = "round"):
    "Returns the model's own projected, normalised embeddings, computed here from scratch."
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pil_preprocess(images, size, mode=mode, crop=crop)).pooler_output
        t = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask).pooler_output
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), model.logit_scale.exp().item()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


PROMPTS = ["a red circle", "a photo of a cat", "two blue squares", "an astronaut riding a horse"]


def images(n=4, h=40, w=52, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_clip_score_is_the_formula(clip_dir):
    ims = images()
    img, txt, _ = by_hand(clip_dir, ims, PROMPTS)
    cos = (img * txt).sum(-1)
    verifier = CLIPScore.from_pretrained(clip_dir, batch_size=3, prefix="")  # the prefix: tests/test_golden.py
    assert verifier._parts is None  # lazy: nothing loaded yet
    score = verifier.score(ims, PROMPTS)
    torch.testing.assert_close(score, 2.5 * cos.clamp(min=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(CLIPScore.from_pretrained(clip_dir, raw=True, prefix="").score(ims, PROMPTS), cos,
                               atol=1e-5, rtol=0)
    assert (cos < 0).any() or (cos > 0).all()  # the clamp is exercised when a cosine is negative
    with pytest.raises(ConfigError, match="one prompt per image"):
        verifier.score(ims, PROMPTS[:2])


def test_clip_score_prefers_matching_prompts_on_shapes():
    from noiseopt.shapes import caption, load, perturb, scenes

    models = load()
    imgs, texts, specs = scenes(64, seed=12345)
    rng = np.random.default_rng(0)
    wrong = [caption(perturb(s, rng)) for s in specs]
    right, bad = models.clip.score(imgs, texts), models.clip.score(imgs, wrong)
    assert (right > bad).float().mean() > 0.75 and right.mean() > bad.mean()


def test_aesthetic_head_and_whole_path(clip_dir, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    head = AestheticHead(24, (32, 16, 8, 4)).eval()
    for m in head.modules():  # random, non-trivial weights
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.5)
            torch.nn.init.normal_(m.bias, std=0.5)
    e = F.normalize(torch.randn(6, 24, dtype=torch.float64), dim=-1)
    W = [head.layers[i].weight.double() for i in (0, 2, 4, 6, 7)]
    b = [head.layers[i].bias.double() for i in (0, 2, 4, 6, 7)]
    manual = e
    for w_, b_ in zip(W, b):
        manual = manual @ w_.T + b_
    torch.testing.assert_close(head.double()(e), manual.squeeze(-1))
    head.float()
    head.train()  # dropout in training mode changes outputs; the verifier must use eval
    assert not torch.allclose(head(e.float()), head(e.float()))
    path = tmp_path / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    ims = images()
    img, _, _ = by_hand(clip_dir, ims, PROMPTS)
    expected = head.eval()(img)
    for file in (path, tmp_path / "head.pth"):
        verifier = AestheticScore.from_pretrained(head=file, clip=clip_dir)
        torch.testing.assert_close(verifier.score(ims), expected, atol=1e-5, rtol=0)
    assert verifier.parts[1].training is False
    # a folder holding the head under the default file name works too
    (tmp_path / "folder").mkdir()
    torch.save(head.state_dict(), tmp_path / "folder" / "aesthetic-model.pth")
    torch.testing.assert_close(AestheticScore.from_pretrained(head=tmp_path / "folder", clip=clip_dir).score(ims),
                               expected, atol=1e-5, rtol=0)


def test_pickscore_is_the_formula(clip_dir):
    ims = images(3, 48, 30)
    img, txt, scale = by_hand(clip_dir, ims, PROMPTS[:3], crop="floor")  # transformers' processor floors the crop offset
    score = PickScore.from_pretrained(clip_dir, processor=clip_dir).score(ims, PROMPTS[:3])
    torch.testing.assert_close(score, scale * (img * txt).sum(-1), atol=1e-4, rtol=0)
    assert scale == pytest.approx(np.exp(3.0), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("open_clip")
    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (root / "cfg").mkdir()
    (root / "cfg" / "noiseopt-tiny-hps.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / "cfg")
    torch.manual_seed(3)
    model = open_clip.create_model("noiseopt-tiny-hps", pretrained=None).eval()
    (root / "hps").mkdir()
    torch.save({"state_dict": model.state_dict()}, root / "hps" / "HPS_v2.1_compressed.pt")
    return root, model, open_clip.get_tokenizer("noiseopt-tiny-hps")


def test_hpsv2_is_the_formula_with_padding(tiny_open_clip):
    root, model, tokenizer = tiny_open_clip
    ims = images(3, 20, 32)  # wide: padding and cropping differ
    with torch.no_grad():
        img = F.normalize(model.encode_image(pil_preprocess(ims, 32, mode="pad")), dim=-1)
        crop = F.normalize(model.encode_image(pil_preprocess(ims, 32, mode="crop")), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(PROMPTS[:3])), dim=-1)
    verifier = HPSv2.from_pretrained(root / "hps", version="v2.1", model_name="noiseopt-tiny-hps")
    score = verifier.score(ims, PROMPTS[:3])
    torch.testing.assert_close(score, (img * txt).sum(-1), atol=1e-5, rtol=0)
    assert not torch.allclose(score, (crop * txt).sum(-1), atol=1e-4)
    with pytest.raises(ModelNotFoundError, match="HPS_v2_compressed.pt"):
        HPSv2.from_pretrained(root / "hps", version="v2", model_name="noiseopt-tiny-hps").load()
    with pytest.raises(ConfigError, match="unknown HPS version"):
        HPSv2.from_pretrained(root / "hps", version="v3")


def test_open_clip_backbone_for_clip_score(tiny_open_clip):
    _, model, tokenizer = tiny_open_clip
    from noiseopt.verifiers import OpenCLIPEncoder

    ims = images(2)
    enc = OpenCLIPEncoder(model, tokenizer, image_size=32)
    with torch.no_grad():
        cos = (F.normalize(model.encode_image(pil_preprocess(ims, 32)), dim=-1)
               * F.normalize(model.encode_text(tokenizer(PROMPTS[:2])), dim=-1)).sum(-1)
    torch.testing.assert_close(CLIPScore(enc, prefix="").score(ims, PROMPTS[:2]), 2.5 * cos.clamp(min=0), atol=1e-5, rtol=0)


# --- loading errors ----------------------------------------------------------------------------------------------

def test_loading_errors_say_what_and_how(clip_dir, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"THUDM/ImageReward.*hf download THUDM/ImageReward ImageReward.pt"):
        load_verifier("imagereward").load()
    with pytest.raises(ModelNotFoundError, match=r"trl-lib/ddpo-aesthetic-predictor.*hf download"):
        load_verifier("aesthetic").load()
    with pytest.raises(ModelNotFoundError, match=r"openai/clip-vit-large-patch14.*hf download"):
        load_verifier("clip").load()
    with pytest.raises(ModelNotFoundError, match="no 'aesthetic-model.pth' in folder"):
        AestheticScore.from_pretrained(head=tmp_path, clip=clip_dir).load()
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(ModelNotFoundError, match="not an aesthetic head"):
        AestheticScore.from_pretrained(head=bad, clip=clip_dir).load()
    with pytest.raises(ModelNotFoundError, match="could not read the checkpoint"):
        (tmp_path / "junk.pt").write_text("not a checkpoint")
        ImageReward.from_pretrained(tmp_path / "junk.pt").load()


def test_partial_checkpoints_are_refused_not_completed(clip_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(clip_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in state if "visual_projection" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(folder / "model.safetensors"))
    with pytest.raises(ModelNotFoundError, match="refusing random weights"):
        CLIPScore.from_pretrained(folder).load()


def test_registry_names_and_options(clip_dir):
    from noiseopt.errors import UnknownNameError
    from noiseopt.registry import VERIFIERS

    assert load_verifier(f"clip:path={clip_dir},raw=true").raw is True
    vs = [load_verifier(n) for n in ["imagereward", "pickscore", "hps:version=v2", "aesthetic"]]  # lazy: no file touched
    assert [v.name for v in vs] == ["imagereward", "pickscore", "hps", "aesthetic"]
    with pytest.raises(UnknownNameError, match="unknown verifier 'beauty': choose from aesthetic, clip, geneval, gpt"):
        VERIFIERS.check("beauty")
    with pytest.raises(ConfigError, match="key=value"):
        load_verifier("hps:v2")
    with pytest.raises(UnknownNameError, match="verifier 'clip' has no option 'scael': its options are path, open_clip, scale"):
        load_verifier("clip:scael=3")
    with pytest.raises(ConfigError, match="unknown HPS version"):
        load_verifier("hps:version=v9")
