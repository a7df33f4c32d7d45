"""The GenEval judge: its rules on hand-made detections for every GenEval tag (thresholds, counts, colours,
positions, exclusions), every one of GenEval's 553 prompts passed by detections that satisfy it and failed when one
object goes missing; and its eyes (a tiny Mask2Former and a tiny CLIP built from configurations) wired as GenEval
wires them."""
import numpy as np
import pytest
import torch

from noiseopt.errors import ConfigError
from noiseopt.prompts import geneval_metadata, prompt_set
from noiseopt.verifiers.geneval import (GENEVAL_COLORS, CLIPColorClassifier, Detection, GenEvalDetector, GenEvalJudge,
                                        GenEvalThresholds, box_iou, geneval_classnames, geneval_rules,
                                        kept_detections, mask_box, relative_position)


def det(label, score, box, color=None, mask=None):
    return Detection(label, score, tuple(float(v) for v in box), mask, color)


# --- the rules, tag by tag -----------------------------------------------------------------------------------------

def test_single_object():
    meta = geneval_metadata("a photo of a bench")
    assert meta["tag"] == "single_object"
    assert geneval_rules(meta, [det("bench", 0.9, (0, 0, 9, 9))]).passed
    # under the detection threshold of 0.3 (strictly above counts), another class, or nothing: a failure
    for dets in ([det("bench", 0.3, (0, 0, 9, 9))], [det("chair", 0.9, (0, 0, 9, 9))], []):
        v = geneval_rules(meta, dets)
        assert not v.passed and v.reasons == ["expected bench>=1, found 0"]
    # extra objects of other classes do not matter, nor a second bench
    assert geneval_rules(meta, [det("bench", 0.31, (0, 0, 9, 9)), det("bench", 0.8, (20, 0, 29, 9)),
                                det("dog", 0.99, (40, 0, 49, 9))]).passed


def test_two_object():
    meta = geneval_metadata("a photo of a bench and a sports ball")
    assert meta["tag"] == "two_object"
    both = [det("bench", 0.9, (0, 0, 9, 9)), det("sports ball", 0.5, (50, 50, 59, 59))]
    assert geneval_rules(meta, both).passed
    v = geneval_rules(meta, both[:1])
    assert not v.passed and v.reasons == ["expected sports ball>=1, found 0"]


def test_counting_ignores_a_low_confidence_extra_object_and_refuses_a_confident_one():
    meta = geneval_metadata("a photo of two clocks")
    assert meta["tag"] == "counting" and meta["exclude"] == [{"class": "clock", "count": 3}]
    two = [det("clock", 0.97, (0, 0, 9, 9)), det("clock", 0.95, (20, 0, 29, 9))]
    assert geneval_rules(meta, two).passed
    # a third clock seen at 0.5: above the detection threshold (0.3) but under the counting one (0.9), so ignored
    assert geneval_rules(meta, two + [det("clock", 0.5, (40, 0, 49, 9))]).passed
    v = geneval_rules(meta, two + [det("clock", 0.92, (40, 0, 49, 9))])
    assert not v.passed and v.reasons == ["expected clock<3, found 3"]
    # one of the two only at 0.85: under the counting threshold, so one clock is found
    v = geneval_rules(meta, [two[0], det("clock", 0.85, (20, 0, 29, 9))])
    assert not v.passed and v.reasons == ["expected clock>=2, found 1"]
    # the same detections on a non-counting prompt: 0.85 counts there
    assert len(kept_detections([two[0], det("clock", 0.85, (20, 0, 29, 9))], "two_object")["clock"]) == 2


def test_colors():
    meta = geneval_metadata("a photo of a blue fire hydrant")
    assert meta["tag"] == "colors"
    assert geneval_rules(meta, [det("fire hydrant", 0.9, (0, 0, 9, 9), "blue")]).passed
    v = geneval_rules(meta, [det("fire hydrant", 0.9, (0, 0, 9, 9), "red")])
    assert not v.passed and v.reasons == ["expected blue fire hydrant>=1, found 0 blue; and 1 red"]
    # only the most confident hydrant's colour is read
    v = geneval_rules(meta, [det("fire hydrant", 0.9, (0, 0, 9, 9), "red"), det("fire hydrant", 0.8, (20, 0, 29, 9), "blue")])
    assert not v.passed
    # an object whose colour was not classified matches no colour
    assert not geneval_rules(meta, [det("fire hydrant", 0.9, (0, 0, 9, 9))]).passed


def test_color_attr_binds_each_colour_to_its_object():
    meta = geneval_metadata("a photo of a purple wine glass and a black apple")
    assert meta["tag"] == "color_attr"
    right = [det("wine glass", 0.9, (0, 0, 9, 9), "purple"), det("apple", 0.9, (20, 0, 29, 9), "black")]
    swapped = [det("wine glass", 0.9, (0, 0, 9, 9), "black"), det("apple", 0.9, (20, 0, 29, 9), "purple")]
    assert geneval_rules(meta, right).passed
    v = geneval_rules(meta, swapped)
    assert not v.passed and len(v.reasons) == 2


def test_position_with_objects_side_by_side():
    meta = geneval_metadata("a photo of a dog right of a teddy bear")
    assert meta["tag"] == "position" and meta["include"][1]["position"] == ["right of", 0]
    bear = det("teddy bear", 0.9, (0, 40, 30, 70))
    side_by_side = det("dog", 0.8, (40, 42, 70, 72))  # to the right, at the same height
    assert relative_position(side_by_side.box, bear.box) == {"right of"}
    assert geneval_rules(meta, [bear, side_by_side]).passed
    above = {**meta, "include": [meta["include"][0], {"class": "dog", "count": 1, "position": ["above", 0]}]}
    v = geneval_rules(above, [bear, side_by_side])
    assert not v.passed and v.reasons == ["expected dog above target, found right of target"]
    # left of it: the relation is the other one
    v = geneval_rules(meta, [bear, det("dog", 0.8, (-40, 42, -10, 72))])
    assert not v.passed and "found left of target" in v.reasons[0]
    # nearly on top of each other: within 0.1 of the summed sizes, no relation at all
    on_top = det("dog", 0.8, (2, 41, 29, 69))
    assert relative_position(on_top.box, bear.box) == set()
    assert not geneval_rules(meta, [bear, on_top]).passed
    # a diagonal offset holds both relations only where each axis carries more than half of it
    assert relative_position((100, 100, 110, 110), (0, 0, 10, 10)) == {"right of", "below"}
    # no target: the failure says so, and the dog is not measured
    v = geneval_rules(meta, [side_by_side])
    assert v.reasons == ["expected teddy bear>=1, found 0", "no target for dog to be right of"]


def test_position_threshold_is_a_share_of_the_summed_sizes():
    a, b = (0, 0, 10, 10), (13, 0, 23, 10)  # centres 13 apart, sizes 10 + 10: 0.1 of them is 2
    assert relative_position(b, a, 0.1) == {"right of"}
    assert relative_position(b, a, 0.7) == set()  # 0.7 x 20 = 14 > 13


def test_max_objects_and_overlap():
    many = [det("cup", 0.95 if i == 0 else 0.8 - i * 0.01, (i * 20, 0, i * 20 + 9, 9)) for i in range(20)]
    assert len(kept_detections(many, "counting")["cup"]) == 1  # only one above 0.9
    kept = kept_detections(many, "single_object")["cup"]
    assert len(kept) == 16 and [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
    twins = [det("cup", 0.9, (0, 0, 9, 9)), det("cup", 0.8, (1, 0, 10, 9))]
    assert len(kept_detections(twins, "x", GenEvalThresholds())["cup"]) == 2  # GenEval's default keeps both
    assert len(kept_detections(twins, "x", GenEvalThresholds(overlap=0.5))["cup"]) == 1
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0 and box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)


_DIRECTION = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}


def satisfying(meta):
    "Detections that satisfy a GenEval prompt: each clause's objects, coloured, placed as its position asks."
    dets, groups = [], []
    for n, clause in enumerate(meta["include"]):
        if "position" in clause:
            dx, dy = _DIRECTION[clause["position"][0]]
            cx, cy = groups[clause["position"][1]]
            cx, cy = cx + 200 * dx, cy + 200 * dy
        else:
            cx, cy = 1000 + 1000 * n, 1000
        groups.append((cx, cy))
        for k in range(clause["count"]):
            x = cx + 12 * k  # a count's objects in a row, each 10 wide
            dets.append(det(clause["class"], 0.95, (x, cy, x + 10, cy + 10), clause.get("color")))
    return dets


def test_every_geneval_prompt_passes_with_what_it_asks_and_fails_without_one_object():
    prompts = prompt_set("geneval")
    assert {p.category for p in prompts} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for p in prompts:
        dets = satisfying(p.meta)
        v = geneval_rules(p.meta, dets)
        assert v.passed, (p.text, v.reasons)
        assert not geneval_rules(p.meta, dets[:-1]).passed, p.text
        if p.category == "counting":  # one more of the counted class, confidently
            extra = det(dets[0].label, 0.95, (0, 0, 5, 5))
            assert not geneval_rules(p.meta, dets + [extra]).passed, p.text
        if any("color" in c for c in p.meta["include"]):  # a wrong colour on the last object
            last = dets[-1]
            wrong = next(c for c in GENEVAL_COLORS if c != last.color)
            assert not geneval_rules(p.meta, dets[:-1] + [det(last.label, 0.95, last.box, wrong)]).passed, p.text


# --- the eyes, on tiny models -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_judge_folders(tmp_path_factory):
    from noiseopt.testing import save_tiny_clip, save_tiny_mask2former

    root = tmp_path_factory.mktemp("geneval")
    return save_tiny_mask2former(root / "m2f"), save_tiny_clip(root / "clip")


def test_the_detector_gives_instances_with_masks_the_images_size_and_their_boxes(tiny_judge_folders):
    m2f, _ = tiny_judge_folders
    detector = GenEvalDetector.from_pretrained(m2f, device="cpu", floor=0.0)
    assert detector.classnames == geneval_classnames() and len(detector.classnames) == 80
    assert detector.classnames[:3] == ["person", "bicycle", "car"] and "teddy bear" in detector.classnames
    image = torch.rand(3, 48, 80)  # not square, not the model's size: masks come back at the image's
    dets = detector.detect(image)
    assert 0 < len(dets) <= 10  # at most the tiny model's 10 queries
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    for d in dets:
        assert d.label in detector.classnames and d.mask.shape == (48, 80) and d.mask.dtype == bool
        assert d.box == mask_box(d.mask) if d.mask.any() else True
    assert detector.detect(image)[0].score == dets[0].score  # deterministic
    assert GenEvalDetector.from_pretrained(m2f, device="cpu").floor == 0.05


def test_mask_box_spans_the_masks_pixels():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 7:12] = True
    assert mask_box(mask) == (7.0, 2.0, 12.0, 5.0)  # as mmdetection boxes masks: one past the last pixel
    assert mask_box(np.zeros((4, 4), bool)) == (0.0, 0.0, 0.0, 0.0)


class _ColourEncoder:
    "A stand-in CLIP that sees one thing, the mean colour of what is not grey, and reads the colour word of a text."
    RGB = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}

    def __init__(self):
        self.texts, self.crops = [], []

    def embed_images(self, images):
        out = []
        for im in images:
            self.crops.append(im)
            a = np.asarray(im.convert("RGB"), dtype=float) / 255
            keep = np.abs(a - 0.6).sum(-1) > 0.05  # not the grey (153/255) that the mask pastes around the object
            mean = a[keep].mean(0) if keep.any() else np.zeros(3)
            out.append([float(np.dot(mean, self.RGB.get(c, (0, 0, 0))) - 0.5 * sum(self.RGB.get(c, (0, 0, 0))))
                        for c in GENEVAL_COLORS])
        return torch.nn.functional.normalize(torch.tensor(out) + 1e-6, dim=-1)

    def embed_texts(self, texts):
        self.texts += list(texts)
        return torch.stack([torch.eye(len(GENEVAL_COLORS))[next(i for i, c in enumerate(GENEVAL_COLORS)
                                                                 if f" {c} " in f" {t.replace('-colored', ' ')} ")]
                            for t in texts])


def test_colours_are_read_on_the_object_pasted_over_grey_and_cropped_to_its_box():
    image = torch.zeros(3, 40, 40)
    image[0, 5:15, 5:15] = 1  # a red square
    image[2, 25:35, 25:35] = 1  # a blue square
    image[1, 0:40, 0:4] = 1  # a green bar, inside the first box but outside its mask
    masks = []
    for sl in ((slice(5, 15), slice(5, 15)), (slice(25, 35), slice(25, 35))):
        m = np.zeros((40, 40), bool)
        m[sl] = True
        masks.append(m)
    dets = [det("cup", 0.9, (0, 0, 20, 20), mask=masks[0]), det("cup", 0.9, (20, 20, 40, 40), mask=masks[1])]
    enc = _ColourEncoder()
    clf = CLIPColorClassifier(enc)
    assert clf.classify(image, dets, "cup") == ["red", "blue"]
    crop = np.asarray(enc.crops[0])
    assert crop.shape == (20, 20, 3) and tuple(crop[0, 0]) == (153, 153, 153)  # the green bar is masked out
    assert enc.texts[:3] == ["a photo of a red cup", "a photo of a red-colored cup", "a photo of a red object"]
    assert len(enc.texts) == 3 * len(GENEVAL_COLORS)
    clf.classify(image, dets, "cup")
    assert len(enc.texts) == 3 * len(GENEVAL_COLORS)  # one head a class, made once


def test_the_judge_checks_scores_and_refuses_prompts_it_cannot_judge(tiny_judge_folders):
    from noiseopt.verifiers.core import load_verifier

    m2f, clip = tiny_judge_folders
    judge = load_verifier(f"geneval:detector={m2f},colors={clip},counting_threshold=0.5", device="cpu")
    assert isinstance(judge, GenEvalJudge) and judge.thresholds.counting == 0.5
    with pytest.raises(ConfigError, match="GenEval's 553 prompts.*'a red car'"):
        GenEvalJudge.accepts(["a photo of a bench", "a red car"])
    images = torch.rand(2, 3, 64, 64)
    prompts = ["a photo of a blue fire hydrant", "a photo of two clocks"]
    scores = judge.score(images, prompts)
    assert scores.shape == (2,) and set(scores.tolist()) <= {0.0, 1.0} and len(judge.last_details) == 2
    v = judge.check(images[0], prompts[0])
    assert v.tag == "colors" and v.passed == bool(scores[0])
    with pytest.raises(ConfigError, match="not among them"):
        judge.check(images[0], "a red car")
    # the judge colours exactly the detections a colour clause reads (above the tag's threshold, of its class)
    detector, colors = judge.parts
    detector.floor = 0.0
    seen = []
    real = colors.classify
    colors.classify = lambda im, ds, cls: seen.append((cls, len(ds))) or real(im, ds, cls)
    fake = [det("fire hydrant", 0.95, (0, 0, 10, 10)), det("fire hydrant", 0.2, (0, 0, 10, 10)), det("cup", 0.9, (0, 0, 5, 5))]
    detector.detect = lambda im: [Detection(d.label, d.score, d.box) for d in fake]
    v = judge.check(images[0], prompts[0])
    assert seen == [("fire hydrant", 1)] and v.found["fire hydrant"][0].color in GENEVAL_COLORS
