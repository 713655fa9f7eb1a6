"""The on-device augmentation stage (data_pipeline/augment.py) against Pillow and timm's rules.

Every op is compared with the Pillow call timm makes at a fixed magnitude; the batched engine is
compared with the same ops applied one sample at a time; erasing and mixing are checked by
counting pixels on images built so that every pixel's origin is known.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO
from data_pipeline.augment import (
    AUTOAUG_IMAGENET,
    IMAGENET_FILL,
    OPS,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    AutoAugment,
    DeviceAugment,
    HostPlan,
    MixupCutmix,
    RandAugment,
    RandomErasing,
    apply_op,
    build_auto_augment,
)
from trainer.losses import SoftTargetCrossEntropy

H, W = 20, 24  # not square, so a swapped height/width shows


def textured(n: int, seed: int = 0, h: int = H, w: int = W) -> torch.Tensor:
    """Smooth random uint8 images (upsampled noise): geometric ops then move real structure."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 5, 6), generator=g).float()
    return F.interpolate(base, size=(h, w), mode="bilinear").round().to(torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def affine(m, resample=Image.BICUBIC):
    return lambda i: i.transform(i.size, Image.AFFINE, m, resample=resample, fillcolor=IMAGENET_FILL)


# (op, magnitude, sign, the Pillow call timm makes for it); timm's level rules worked out by hand
PIL_CASES = [
    ("AutoContrast", 0, 1, ImageOps.autocontrast),
    ("Equalize", 0, 1, ImageOps.equalize),
    ("Invert", 0, 1, ImageOps.invert),
    ("Posterize", 6, 1, lambda i: ImageOps.posterize(i, 2)),                # int(0.6 * 4)
    ("PosterizeIncreasing", 6, 1, lambda i: ImageOps.posterize(i, 2)),      # 4 - int(0.6 * 4)
    ("PosterizeIncreasing", 3, 1, lambda i: ImageOps.posterize(i, 3)),
    ("PosterizeOriginal", 8, 1, lambda i: ImageOps.posterize(i, 7)),        # int(0.8 * 4) + 4
    ("Solarize", 5, 1, lambda i: ImageOps.solarize(i, 128)),                # int(0.5 * 256)
    ("SolarizeIncreasing", 3, 1, lambda i: ImageOps.solarize(i, 180)),      # 256 - int(0.3 * 256)
    ("SolarizeAdd", 6, 1, lambda i: i.point([min(255, v + 66) if v < 128 else v for v in range(256)] * 3)),
    ("Color", 3, 1, lambda i: ImageEnhance.Color(i).enhance(0.64)),         # 0.3 * 1.8 + 0.1
    ("ColorIncreasing", 7, 1, lambda i: ImageEnhance.Color(i).enhance(1.63)),  # 1 + 0.7 * 0.9
    ("ColorIncreasing", 7, -1, lambda i: ImageEnhance.Color(i).enhance(0.37)),
    ("Contrast", 8, 1, lambda i: ImageEnhance.Contrast(i).enhance(1.54)),
    ("ContrastIncreasing", 7, 1, lambda i: ImageEnhance.Contrast(i).enhance(1.63)),
    ("ContrastIncreasing", 7, -1, lambda i: ImageEnhance.Contrast(i).enhance(0.37)),
    ("Brightness", 2, 1, lambda i: ImageEnhance.Brightness(i).enhance(0.46)),
    ("BrightnessIncreasing", 9, 1, lambda i: ImageEnhance.Brightness(i).enhance(1.81)),
    ("BrightnessIncreasing", 9, -1, lambda i: ImageEnhance.Brightness(i).enhance(0.19)),
    ("Sharpness", 7, 1, lambda i: ImageEnhance.Sharpness(i).enhance(1.36)),
    ("SharpnessIncreasing", 9, 1, lambda i: ImageEnhance.Sharpness(i).enhance(1.81)),
    ("SharpnessIncreasing", 9, -1, lambda i: ImageEnhance.Sharpness(i).enhance(0.19)),
    ("Rotate", 7, 1, lambda i: i.rotate(21.0, resample=Image.BICUBIC, fillcolor=IMAGENET_FILL)),
    ("Rotate", 10, -1, lambda i: i.rotate(-30.0, resample=Image.BICUBIC, fillcolor=IMAGENET_FILL)),
    ("ShearX", 7, 1, affine((1, 0.21, 0, 0, 1, 0))),
    ("ShearX", 10, -1, affine((1, -0.3, 0, 0, 1, 0))),
    ("ShearY", 7, 1, affine((1, 0, 0, 0.21, 1, 0))),
    ("TranslateXRel", 7, 1, affine((1, 0, 0.315 * W, 0, 1, 0))),
    ("TranslateXRel", 4, -1, affine((1, 0, -0.18 * W, 0, 1, 0))),
    ("TranslateYRel", 7, 1, affine((1, 0, 0, 0, 1, 0.315 * H))),
]
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.mark.parametrize("name,magnitude,sign,reference", PIL_CASES,
                         ids=[f"{c[0]}-m{c[1]}{'-neg' if c[2] < 0 else ''}" for c in PIL_CASES])
def test_op_matches_pillow(name, magnitude, sign, reference):
    x = textured(4, seed=1)
    x[0, :, :4] = 255  # saturated and flat areas too
    x[1, 1] = 7        # a flat channel: autocontrast / equalize keep it
    out = apply_op(x, name, magnitude, sign)
    expected = torch.stack([from_pil(reference(to_pil(img))) for img in x])
    diff = (out.int() - expected.int()).abs()
    assert out.dtype == torch.uint8 and out.shape == x.shape
    if name in GEOMETRIC:  # bicubic in float32 vs Pillow's double: measured <= 3.8 % of pixels off by 1
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05, diff.max()
    else:
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, diff.max()


BILINEAR_CASES = [
    ("Rotate", 7, 1, lambda i: i.rotate(21.0, resample=Image.BILINEAR, fillcolor=IMAGENET_FILL)),
    ("ShearX", 7, 1, affine((1, 0.21, 0, 0, 1, 0), Image.BILINEAR)),
    ("TranslateYRel", 7, 1, affine((1, 0, 0, 0, 1, 0.315 * H), Image.BILINEAR)),
]


@pytest.mark.parametrize("name,magnitude,sign,reference", BILINEAR_CASES, ids=[c[0] for c in BILINEAR_CASES])
def test_geometric_op_bilinear_matches_pillow(name, magnitude, sign, reference):
    """data.interpolation=bilinear: the geometric ops resample as Pillow's BILINEAR."""
    x = textured(4, seed=1)
    out = apply_op(x, name, magnitude, sign, resample="bilinear")
    expected = torch.stack([from_pil(reference(to_pil(img))) for img in x])
    diff = (out.int() - expected.int()).abs()
    assert (diff > 0).float().mean() < 0.06 and (diff > 1).float().mean() < 0.005, diff.max()
    bicubic = apply_op(x, name, magnitude, sign)
    assert (bicubic.int() - expected.int()).abs().max() > 1  # the two resamplings do differ


def test_every_rand_op_has_a_pillow_case():
    covered = {c[0] for c in PIL_CASES}
    assert set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS) <= covered
    assert {op for sub in AUTOAUG_IMAGENET for op, _, _ in sub} <= covered <= set(OPS)


@pytest.mark.parametrize("name", ["ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing", "Rotate", "ShearX", "ShearY", "TranslateXRel",
                                  "TranslateYRel", "SolarizeIncreasing", "SolarizeAdd"])
def test_magnitude_zero_is_identity(name):
    x = textured(3, seed=2)
    for sign in (1, -1):
        diff = (apply_op(x, name, 0.0, sign).int() - x.int()).abs()
        assert diff.max() <= 1, name
    # the non-increasing blends are the identity at factor 1.0: magnitude 5 (0.5 * 1.8 + 0.1)
    if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert (apply_op(x, name[:-10], 5.0).int() - x.int()).abs().max() <= 1


def test_posterize_zero_bits_is_black_and_extremes():
    x = textured(2)
    assert apply_op(x, "PosterizeIncreasing", 10).eq(0).all()       # 4 - int(4) = 0 bits
    assert torch.equal(apply_op(x, "SolarizeIncreasing", 0), x)      # threshold 256: nothing inverted
    assert torch.equal(apply_op(x, "SolarizeIncreasing", 10), 255 - x)


def plan_applied_one_by_one(aug, x, plan):
    """Reference for the batched engine: each sample alone, op by op, with its own draws."""
    out = []
    for i in range(x.shape[0]):
        img = x[i:i + 1]
        for layer in plan:
            if layer.apply[i]:
                img = apply_op(img, aug.names[int(layer.op[i])], layer.magnitude[i], layer.sign[i], aug.fill)
        out.append(img)
    return torch.cat(out)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101", "rand-m9-mstd0.5",
                                  "autoaug-imagenet", "rand-m9-n3-w0"])
def test_batched_plan_equals_per_sample_application(spec):
    aug = build_auto_augment(spec, gen(3))
    x = textured(48, seed=3)
    plan = aug.sample(48)
    assert torch.equal(aug.apply(x, plan), plan_applied_one_by_one(aug, x, plan))


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "autoaug-imagenet"])
def test_choices_are_per_sample(spec):
    aug = build_auto_augment(spec, gen(4))
    x = textured(1, seed=4).expand(64, -1, -1, -1).contiguous()  # 64 identical images
    plan = aug.sample(64)
    chosen = {tuple(int(layer.op[i]) if layer.apply[i] else -1 for layer in plan) for i in range(64)}
    assert len(chosen) > 20
    out = aug.apply(x, plan)
    distinct = {bytes(img.numpy()) for img in out}
    assert len(distinct) > (40 if spec.startswith("rand") else 15)
    assert len({bytes(img.numpy()) for img in aug(x)}) > 15  # __call__ draws per sample too


def test_rand_augment_draws_follow_timm():
    aug = RandAugment.from_spec("rand-m9-mstd0.5-inc1", gen(5))
    assert aug.names == RAND_INCREASING_TRANSFORMS and aug.num_ops == 2
    plan = aug.sample(20000)
    for layer in plan:
        assert abs(layer.apply.double().mean() - 0.5) < 0.02                 # per-op prob 0.5
        counts = torch.bincount(layer.op, minlength=15).double() / 20000
        assert counts.min() > 1 / 15 - 0.01 and counts.max() < 1 / 15 + 0.01  # uniform over 15 ops
        m = layer.magnitude
        assert m.min() >= 0 and m.max() <= 10 and abs(m.mean() - 9) < 0.05 and abs(m.std() - 0.5) < 0.05
        assert abs((layer.sign > 0).double().mean() - 0.5) < 0.02
    uniform = RandAugment.from_spec("rand-m7-mstd101", gen(5)).sample(5000)[0].magnitude
    assert uniform.min() >= 0 and uniform.max() <= 7 and abs(uniform.mean() - 3.5) < 0.2


def test_autoaugment_draws_follow_the_policy():
    aug = AutoAugment(gen(6))
    assert len(AUTOAUG_IMAGENET) == 25 and all(len(s) == 2 for s in AUTOAUG_IMAGENET)
    plan = aug.sample(30000)
    first = [aug.names[i] for i in plan[0].op.tolist()]
    # slot 0 is 'PosterizeOriginal' in sub-policies 0 (p 0.4, m 8), 3 (p 0.6, m 7), 7 (p 0.8, m 5)
    posterize = torch.tensor([n == "PosterizeOriginal" for n in first])
    assert abs(posterize.double().mean() - 3 / 25) < 0.01
    assert abs(plan[0].apply[posterize].double().mean() - (0.4 + 0.6 + 0.8) / 3) < 0.03
    assert set(plan[0].magnitude[posterize].tolist()) == {8.0, 7.0, 5.0}


def test_parse_specs():
    g = gen()
    ra = build_auto_augment("rand-m9-mstd0.5-inc1", g)
    assert (ra.magnitude, ra.num_ops, ra.mstd, ra.names) == (9.0, 2, 0.5, RAND_INCREASING_TRANSFORMS)
    ra = build_auto_augment("rand-m7-n3", g)
    assert (ra.magnitude, ra.num_ops, ra.mstd, ra.names) == (7.0, 3, 0.0, RAND_TRANSFORMS)
    assert build_auto_augment("rand-m9-mstd0.5", g).names == RAND_TRANSFORMS
    assert build_auto_augment("rand-m9-inc0", g).names == RAND_TRANSFORMS
    assert math.isinf(build_auto_augment("rand-m9-mstd101", g).mstd)
    assert build_auto_augment("rand-m15-mmax15", g).mmax == 15.0
    assert build_auto_augment("none", g) is None
    assert isinstance(build_auto_augment("autoaug-imagenet", g), AutoAugment)
    for bad in ("rand-x9", "rand-m9-mstd", "randaug", "autoaug-cifar", "rand-m9-w1"):
        with pytest.raises(ValueError, match=bad):
            build_auto_augment(bad, g)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "autoaug-imagenet"])
def test_deterministic_given_the_generator(spec):
    x = textured(16, seed=7)
    a, b, c = (build_auto_augment(spec, gen(s))(x) for s in (11, 11, 12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == x.shape and a.device == x.device
    assert torch.equal(x, textured(16, seed=7))  # the input is not modified


def test_random_erasing_boxes():
    x = torch.ones(64, 3, 40, 48)
    out = RandomErasing(1.0, mode="const", generator=gen(8))(x)
    areas = []
    for img in out:
        erased = img.eq(0).all(0)
        assert torch.equal(erased, img.eq(0).any(0))  # all channels erased together
        if erased.any():
            rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert int(erased.sum()) == h * w  # one solid box
            areas.append(h * w / (40 * 48))
    assert len(areas) >= 60  # a box that fits is almost always found in 10 attempts
    assert 0.02 * 0.7 <= min(areas) and max(areas) <= (1 / 3) * 1.3  # area 0.02..1/3, up to rounding
    assert abs(np.mean(areas) - (0.02 + 1 / 3) / 2) < 0.04
    assert torch.equal(RandomErasing(0.0, generator=gen(8))(x), x)


def test_random_erasing_fill_modes():
    x = torch.full((32, 3, 32, 32), 10.0)
    px = RandomErasing(1.0, mode="pixel", generator=gen(9))(x)
    noise = px[px != 10.0]
    assert noise.numel() > 1000 and abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    rnd = RandomErasing(1.0, mode="rand", generator=gen(9))(x)
    for img in rnd:
        for ch in img:
            assert len(ch[ch != 10.0].unique()) <= 1  # one colour per channel
    quarter = RandomErasing(0.25, generator=gen(9))(torch.full((400, 3, 8, 8), 10.0))
    assert abs((quarter != 10.0).flatten(1).any(1).double().mean() - 0.25) < 0.07
    boxes, active = RandomErasing(1.0, max_count=3, generator=gen(9)).sample(2000, 32, 32)
    counts = active.sum(1)
    assert counts.min() >= 1 and counts.max() == 3  # count ~ randint(1, 3)


def constant_batch(b: int) -> torch.Tensor:
    return torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 16, 20).contiguous()


def test_cutmix_pixels_match_lambda():
    b = 8
    mix = MixupCutmix(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=b, generator=gen(10))
    labels = torch.arange(b)
    seen_mixed = 0
    for _ in range(30):
        out, target = mix(constant_batch(b), labels)
        assert torch.allclose(target.sum(1), torch.ones(b))
        for i in range(b):
            lam = float(target[i, i])
            from_flip = out[i].eq(b - 1 - i).double().mean().item()
            assert out[i].eq(i).logical_or(out[i].eq(b - 1 - i)).all()
            assert from_flip == pytest.approx(1 - lam, abs=1e-6)
            assert target[i, b - 1 - i].item() == pytest.approx(1 - lam, abs=1e-6)
        seen_mixed += 0 < float(target[0, 0]) < 1
    assert seen_mixed > 20


def test_mixup_pixels_and_targets():
    b, c = 6, 5
    mix = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=c, generator=gen(11))
    x = torch.randn(b, 3, 8, 8, generator=gen(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    lams = []
    for _ in range(200):
        out, target = mix(x, labels)
        lam = float(target[1, 1])  # sample 1 (class 1) is paired with sample 4 (class 4)
        assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
        assert torch.allclose(target.sum(1), torch.ones(b))
        lams.append(lam)
    assert abs(np.mean(lams) - 0.5) < 0.05 and np.std(lams) > 0.25  # Beta(0.8, 0.8)


def test_mixup_cutmix_switch_and_smoothing():
    b, c, s = 4, 10, 0.1
    labels = torch.tensor([1, 2, 3, 4])
    mix = MixupCutmix(0.8, 1.0, prob=1.0, switch_prob=0.5, label_smoothing=s, num_classes=c, generator=gen(12))
    kinds = [mix.sample(16, 16)[1] is not None for _ in range(400)]
    assert 150 < sum(kinds) < 250  # CutMix about half of the time
    out, target = mix(constant_batch(b), labels)
    assert torch.allclose(target.sum(1), torch.ones(b)) and target.min() >= s / c - 1e-7
    off = MixupCutmix(0.8, 1.0, prob=0.0, label_smoothing=s, num_classes=c, generator=gen(12))
    x = torch.randn(b, 3, 8, 8)
    out, target = off(x, labels)
    assert torch.equal(out, x)
    assert torch.allclose(target.max(1).values, torch.full((b,), 1 - s + s / c))
    assert torch.allclose(target, F.one_hot(labels, c) * (1 - s) + s / c)
    mix.set_enabled(False)
    out, target = mix(x, labels)
    assert torch.equal(out, x) and torch.allclose(target, F.one_hot(labels, c) * (1 - s) + s / c)
    with pytest.raises(ValueError, match="Mixup/CutMix need an even per-rank batch, got 5"):
        mix(torch.randn(5, 3, 8, 8), torch.arange(5))


def test_soft_target_cross_entropy_equals_label_smoothing():
    logits = torch.randn(12, 7, generator=gen(13))
    labels = torch.randint(0, 7, (12,), generator=gen(13))
    for s in (0.0, 0.1, 0.3):
        target = MixupCutmix(0.0, 0.0, label_smoothing=s, num_classes=7)(torch.zeros(12, 3, 4, 4), labels)[1]
        expected = torch.nn.CrossEntropyLoss(label_smoothing=s)(logits, labels)
        assert torch.allclose(SoftTargetCrossEntropy()(logits, target), expected, atol=1e-6)


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def stage(**kw) -> DeviceAugment:
    args = dict(auto_augment="rand-m9-mstd0.5-inc1", mean=MEAN, std=STD, num_classes=10, seed=14)
    return DeviceAugment(**{**args, **kw})


def test_stage_normalises_and_composes():
    x, labels = textured(8, seed=15), torch.arange(8)
    plain = stage(auto_augment="none", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0)
    out, target = plain(x, labels)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-5) and torch.equal(target, F.one_hot(labels, 10).float())
    assert stage().auto_augment.fill == IMAGENET_FILL  # timm's img_mean fill from the mean
    out, target = stage()(x, labels)
    assert out.dtype == torch.float32 and out.shape == x.shape and target.shape == (8, 10)
    assert torch.allclose(target.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="uint8"):
        stage()(x.float(), labels)


def test_stage_state_dict_resumes_the_stream():
    x, labels = textured(8, seed=16), torch.arange(8)
    aug = stage(auto_augment="autoaug-imagenet")
    aug(x, labels)
    state = aug.state_dict()
    first = [aug(x, labels) for _ in range(3)]
    resumed = stage(auto_augment="autoaug-imagenet", seed=999)
    resumed.load_state_dict(state)
    for (a, ta), (b, tb) in zip(first, (resumed(x, labels) for _ in range(3))):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(first[0][0], stage(auto_augment="autoaug-imagenet", seed=15)(x, labels)[0])


def test_stage_per_batch_seed_and_prenormalised_input():
    """The Loader passes batch_seed(seed, rank, epoch, step): a batch's draws depend on it alone."""
    x, labels = textured(8, seed=18), torch.arange(8)
    aug, fresh = stage(), stage(seed=1)
    aug(x, labels, 5)
    a, ta = aug(x, labels, 77)
    b, tb = fresh(x, labels, 77)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, aug(x, labels, 78)[0])
    # DALI hands over normalised floats: only erasing and mixing run
    normed = torch.randn(8, 3, H, W, generator=gen(2))
    dali = stage(auto_augment="none", normalize=False, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0)
    out, target = dali(normed, labels, 3)
    assert torch.equal(out, normed) and torch.equal(target, F.one_hot(labels, 10).float())
    out, target = stage(auto_augment="none", normalize=False, mixup=0.0, reprob=1.0, remode="const")(normed, labels)
    assert (out == 0).flatten(1).any(1).sum() >= 6 and torch.allclose(target.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="normalize=False"):
        stage(normalize=False)


class BlockingCopies(TorchDispatchMode):
    """Records host->device copies made without non_blocking: on CUDA each waits for the GPU queue."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "device" in kwargs and not kwargs.get("non_blocking"):
            if torch.device(kwargs["device"]) != args[0].device:
                self.seen.append(f"{args[0].device} -> {kwargs['device']}")
        if func is torch.ops.aten.copy_.default and args[0].device != args[1].device and not args[2:3] == (True,):
            self.seen.append(f"{args[1].device} -> {args[0].device}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "autoaug-imagenet"])
def test_stage_needs_no_device_values_on_the_host(spec):
    """On the meta device a tensor has no values: any .item() / bool() / nonzero on the batch
    would raise. So the whole stage runs without a device->host sync, and its host->device
    copies are all non_blocking."""
    images = torch.empty(64, 3, 32, 32, dtype=torch.uint8, device="meta")
    labels = torch.empty(64, dtype=torch.long, device="meta")
    aug = stage(auto_augment=spec, reprob=1.0, remode="rand", recount=2)
    with BlockingCopies() as watch:
        for _ in range(3):
            out, target = aug(images, labels)
    assert out.device.type == "meta" and out.shape == images.shape and target.shape == (64, 10)
    assert watch.seen == []
    with BlockingCopies() as watch:
        torch.ones(2).to("meta")
    assert watch.seen == ["cpu -> meta"]  # the watcher itself works


@pytest.mark.gpu
def test_gpu_stage_matches_cpu_without_syncs():
    x, labels = textured(32, seed=17, h=64, w=64), torch.arange(32) % 10
    for spec in ("rand-m9-mstd0.5-inc1", "autoaug-imagenet"):
        kw = dict(auto_augment=spec, remode="const", reprob=0.5)
        cpu_out, cpu_t = stage(**kw)(x, labels)
        gpu = stage(**kw)
        xd, ld = x.cuda(), labels.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, target = gpu(xd, ld)
            stage(auto_augment=spec, remode="pixel")(xd, ld)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.is_cuda and target.is_cuda
        assert torch.allclose(target.cpu(), cpu_t, atol=1e-6)
        close = (out.cpu() - cpu_out).abs() <= 1.5 / 255 / min(STD)  # a grey level or so
        assert close.float().mean() > 0.99


@pytest.mark.parametrize("box, size, bicubic", [((10, 5, 190, 140), (32, 32), True), ((0, 0, 200, 150), (224, 224), True),
                                                ((33, 20, 120, 77), (16, 16), False), ((0, 0, 200, 150), (64, 48), True)])
def test_ffcv_resize_is_pillows(box, size, bicubic):
    """data_pipeline/ffcv_resize.py (FFCV's decoders) against Pillow's resize with a box: down and up,
    bicubic and bilinear; measured max 1 level off, on < 0.1 % of the values."""
    from data_pipeline.ffcv_resize import resize_box_compiled

    base = torch.randint(0, 256, (1, 3, 75, 100), generator=gen(3), dtype=torch.uint8)
    src = np.asarray(to_pil(base[0]).resize((200, 150), Image.BILINEAR))
    out = np.zeros((size[1], size[0], 3), np.uint8)
    left, top, right, bottom = box
    resize_box_compiled(src, top, bottom, left, right, out, bicubic)
    ref = np.asarray(Image.fromarray(src).resize(size, Image.BICUBIC if bicubic else Image.BILINEAR, box=box))
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())



def test_stage_moves_its_plan_in_one_copy_and_launches_few_ops():
    """The recipe's stage at batch 128, 224 px, counted on the meta device (launch/bench_data.py --stage): the
    whole batch's host draws reach the device in one copy (was ~65: one per op group and argument) and the
    device work is one lookup, one warp and one blend pass per layer (~300 kernels, was ~2,200)."""
    sys.path.insert(0, str(REPO / "launch"))
    from bench_data import stage_figures

    figures = stage_figures(batches=2)
    print(figures)
    assert figures["stage_h2d_copies_per_batch"] == 1.0
    assert figures["stage_ops_per_batch"] <= 300


# ----------------------------------------------------------------------------- timm as the oracle
# timm's own transforms on the same images, with timm's draws forced to ours: its `random` / numpy.random calls
# answered from our recorded plan (op, applied, magnitude, sign; erasing boxes and fills; Mixup coins, lambda and
# CutMix centre). Any difference is then a difference in what the ops do, not in what was drawn.

class Scripted:
    """A stand-in for the `random` module (or numpy.random) that answers each call from a queue per function."""

    def __init__(self, **queues) -> None:
        self.queues = {k: list(v) for k, v in queues.items()}

    def __getattr__(self, name):
        if name not in self.queues:
            raise AttributeError(f"timm drew {name}(), which the test did not script")
        return lambda *args, **kwargs: self.queues[name].pop(0)


def timm_ops_forced(monkeypatch, plan, names, i):
    """Sample i's ops as timm AugmentOp calls with our draws: each op reads its prob check, magnitude and sign."""
    import timm.data.auto_augment as taa

    def forced(op, layer):
        def run(img):
            apply, sign = bool(layer.apply[i]), float(layer.sign[i])
            draws = ([0.0 if apply else 1.0] if op.prob < 1.0 else []) + [1.0 if sign < 0 else 0.0]
            m = float(layer.magnitude[i])
            monkeypatch.setattr(taa, "random", Scripted(random=draws, gauss=[m], uniform=[m]))
            return op(img)
        return run
    return forced


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd101", "rand-m9-mstd0.5", "autoaug-imagenet"])
def test_auto_augment_equals_timms_transform_on_forced_draws(monkeypatch, spec):
    """Images whose ops are all photometric match timm exactly; a geometric op may be 1 off on a few pixels
    (bicubic in float32 here, in double in Pillow: see test_op_matches_pillow), which a later LUT op (equalize,
    posterize, ...) can widen. timm's Posterize of 0 bits (magnitude < 2.5) raises in Pillow >= 11; ours gives
    black, as Pillow did before: those images are counted and left out."""
    import timm.data.auto_augment as taa

    hparams = dict(img_mean=IMAGENET_FILL, interpolation=Image.BICUBIC, translate_pct=0.45)
    theirs = taa.auto_augment_transform("original", hparams) if spec.startswith("autoaug") else \
        taa.rand_augment_transform(spec, hparams)
    ours = build_auto_augment(spec, gen(21))
    n = 96
    x = textured(n, seed=21)
    plan = ours.sample(n)
    out = ours.apply(x, plan)
    if spec.startswith("autoaug"):
        assert [[(op.name, op.prob, op.magnitude) for op in sub] for sub in theirs.policy] == \
            [list(sub) for sub in AUTOAUG_IMAGENET]  # the same policy table
    worst_photometric = worst = off = total = raised = 0
    for i in range(n):
        forced = timm_ops_forced(monkeypatch, plan, ours.names, i)
        chosen = [ours.names[int(layer.op[i])] for layer in plan]
        try:
            if spec.startswith("autoaug"):  # timm: random.choice(policy), then each op of the sub-policy
                mags = [float(layer.magnitude[i]) for layer in plan]
                sub = next(s for s in theirs.policy if [op.name for op in s] == chosen and
                           [float(op.magnitude) for op in s] == mags)
                img = to_pil(x[i])
                for op, layer in zip(sub, plan):
                    img = forced(op, layer)(img)
            else:  # timm: np.random.choice(ops, num_layers), then each op
                by_name = {op.name: op for op in theirs.ops}
                monkeypatch.setattr(np.random, "choice", Scripted(
                    choice=[[forced(by_name[c], layer) for c, layer in zip(chosen, plan)]]).choice)
                img = theirs(to_pil(x[i]))
        except ValueError as e:
            assert "bits must be" in str(e) and any(c.startswith("Posterize") for c in chosen), e
            raised += 1
            continue
        diff = (from_pil(img).int() - out[i].int()).abs()
        applied = {c for c, layer in zip(chosen, plan) if layer.apply[i]}
        if applied & set(GEOMETRIC):
            worst, off, total = max(worst, int(diff.max())), off + int((diff > 0).sum()), total + diff.numel()
        else:
            worst_photometric = max(worst_photometric, int(diff.max()))
    print(f"{spec}: {n} images vs timm's transform: photometric-only max difference {worst_photometric}; with a "
          f"geometric op max {worst}, {off / max(total, 1):.2%} of pixels off; timm raised on {raised}")
    assert worst_photometric == 0 and worst <= 6 and off / max(total, 1) < 0.05 and raised <= n // 10


@pytest.mark.parametrize("mode, max_count", [("pixel", 1), ("rand", 3), ("const", 2)])
def test_random_erasing_equals_timms_on_forced_draws(monkeypatch, mode, max_count):
    import timm.data.random_erasing as tre

    b, c, h, w = 48, 3, H, W
    x = torch.randn(b, c, h, w)
    ours = RandomErasing(probability=0.5, mode=mode, max_count=max_count, generator=gen(22))
    state = ours.generator.get_state()
    host = HostPlan()
    meta = ours.pack(b, c, h, w, host)
    dev = host.to(torch.device("cpu"))
    out = ours.run(x, meta, dev)
    replay = torch.Generator()
    replay.set_state(state)
    torch.rand(b, generator=replay, dtype=torch.float64)
    count = torch.randint(1, max_count + 1, (b,), generator=replay)  # sample()'s second draw: boxes per image
    idx = dev["er.idx"].tolist()
    noise = torch.Generator().manual_seed(meta["seed"])
    noise = [torch.randn((len(idx), c, h, w), generator=noise) for _ in range(max_count)] if mode == "pixel" else []
    theirs = tre.RandomErasing(probability=0.5, mode=mode, min_count=1, max_count=max_count, device="cpu")
    expected = x.clone()
    for j in range(b):
        draws = dict(random=[1.0], randint=[], uniform=[])  # 1.0 > p: not erased
        fills = []
        if j in idx:
            s = idx.index(j)
            draws["random"] = [0.0]
            draws["randint"] += [int(count[j])] if max_count > 1 else []
            for k in range(int(count[j])):
                top, left, bh, bw = dev["er.boxes"][s, k].tolist()
                if not dev["er.active"][s, k]:  # no fit in 10 attempts: timm's 10 attempts fail too
                    draws["uniform"] += [10.0, 0.0] * 10
                    continue
                draws["uniform"] += [bh * bw * int(count[j]) / (h * w), math.log(bh / bw)]
                draws["randint"] += [top, left]
                fills.append(noise[k][s, :, top:top + bh, left:left + bw] if mode == "pixel" else
                             dev["er.colors"][s, k].view(c, 1, 1) if mode == "rand" else torch.zeros(c, 1, 1))
        monkeypatch.setattr(tre, "random", Scripted(**draws))
        monkeypatch.setattr(tre, "_get_pixels", Scripted(get=fills).get)
        theirs(expected[j])
    diff = (expected - out).abs().max().item()
    print(f"random erasing {mode} x{max_count}: {len(idx)} of {b} erased, max difference from timm {diff}")
    assert len(idx) > 10 and diff == 0.0


def test_mixup_and_cutmix_equal_timms_on_forced_draws(monkeypatch):
    from timm.data import Mixup

    b, h, w, classes = 8, 21, 24, 10  # an odd side: CutMix's box rounding shows
    ours = MixupCutmix(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1, num_classes=classes,
                       generator=gen(23))
    theirs = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                   label_smoothing=0.1, num_classes=classes)
    worst_x = worst_y = 0.0
    modes = set()
    for trial in range(40):
        x = torch.randn(b, 3, h, w)
        labels = torch.randint(0, classes, (b,), generator=gen(trial))
        replay = torch.Generator()
        replay.set_state(ours.generator.get_state())
        out_x, out_y = ours(x.clone(), labels)
        # our draws, in sample()'s order: two coins, a beta seed, then the CutMix centre
        coins = torch.rand(2, generator=replay, dtype=torch.float64).tolist()
        cut = coins[1] < 0.5
        seed = int(torch.randint(2**62, (), generator=replay))
        lam = float(np.random.default_rng(seed).beta(1.0 if cut else 0.8, 1.0 if cut else 0.8))
        centre = [int(torch.randint(h, (), generator=replay)), int(torch.randint(w, (), generator=replay))]
        monkeypatch.setattr(np.random, "rand", Scripted(rand=coins).rand)
        monkeypatch.setattr(np.random, "beta", Scripted(beta=[lam]).beta)
        monkeypatch.setattr(np.random, "randint", Scripted(randint=centre).randint)
        exp_x, exp_y = theirs(x.clone(), labels)
        modes.add("cutmix" if cut else "mixup")
        worst_x = max(worst_x, (exp_x - out_x).abs().max().item())
        worst_y = max(worst_y, (exp_y - out_y).abs().max().item())
    print(f"mixup/cutmix over 40 batches: max difference from timm: pixels {worst_x}, targets {worst_y}")
    assert modes == {"mixup", "cutmix"} and worst_x < 1e-6 and worst_y < 1e-6
