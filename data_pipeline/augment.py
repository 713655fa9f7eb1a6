"""On-device training augmentation shared by every backend (dali, ffcv, folder).

    aug = DeviceAugment(auto_augment="rand-m9-mstd0.5-inc1", mean=mean, std=std, num_classes=1000)
    images, targets = aug(images_uint8, labels, seed)  # normalised float (B,3,H,W), soft targets (B,C)

timm's RandAugment / AutoAugment / RandomErasing / Mixup semantics, but per batch on the device:
every random choice is drawn on the host from one CPU `torch.Generator` (deterministic, resumable,
no device->host sync) and each op runs once per batch on the samples that drew it (index_select /
index_copy_). Pixel ops follow Pillow bit for bit where cheap (blends, filters and bilinear warps
truncate to uint8, as Pillow does).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_FILL = (124, 116, 104)  # timm's img_mean fill: round(255 * IMAGENET_DEFAULT_MEAN)
_LEVEL_DENOM = 10.0


# ----------------------------------------------------------------------------- pixel ops
# Each op maps (x uint8 (b,3,H,W), arg (b,) float32, fill (1,3,1,1) float32) -> uint8 (b,3,H,W).

def _gray(x: Tensor) -> Tensor:
    """Pillow's RGB->L (ITU-R 601-2, fixed point with rounding), int32 (b,1,H,W)."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1)


def _blend(degenerate: Tensor | float, x: Tensor, factor: Tensor) -> Tensor:
    """Pillow's Image.blend(degenerate, x, factor): float32 math, clip, truncate."""
    d = degenerate.float() if isinstance(degenerate, Tensor) else degenerate
    return (d + factor.view(-1, 1, 1, 1) * (x.float() - d)).clamp_(0, 255).floor_().to(torch.uint8)


def _apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    """Per-(sample, channel) 256-entry lookup tables (b,3,256) applied with one gather."""
    b, c, h, w = x.shape
    return lut.clamp(0, 255).to(torch.uint8).gather(2, x.reshape(b, c, h * w).long()).view(b, c, h, w)


def _auto_contrast(x: Tensor, _v: Tensor, _fill: Tensor) -> Tensor:
    return _apply_lut(x, _auto_contrast_lut(x))


def _auto_contrast_lut(x: Tensor) -> Tensor:
    """ImageOps.autocontrast's lookup table per (sample, channel), float64 (b,3,256)."""
    lo = x.amin(dim=(2, 3)).double().unsqueeze(2)
    hi = x.amax(dim=(2, 3)).double().unsqueeze(2)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # not 255.0 / t: that is 255 * (1 / t)
    ramp = torch.arange(256, device=x.device, dtype=torch.float64)
    return torch.where(hi > lo, (ramp * scale - lo * scale).trunc(), ramp)


def _equalize(x: Tensor, _v: Tensor, _fill: Tensor) -> Tensor:
    return _apply_lut(x, _equalize_lut(x))


def _equalize_lut(x: Tensor) -> Tensor:
    """ImageOps.equalize's lookup table per (sample, channel): histograms by scatter_add, LUT by cumsum."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).long()
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    present, levels = hist > 0, torch.arange(256, device=x.device)
    last = (present * levels).amax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    before = hist.cumsum(1) - hist  # pixels strictly below each level
    lut = (step // 2 + before) // step.clamp(min=1)
    keep = (present.sum(1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(keep, levels, lut)
    return lut.view(b, c, 256)


def _invert(x: Tensor, _v: Tensor, _fill: Tensor) -> Tensor:
    return 255 - x


def _posterize(x: Tensor, bits: Tensor, _fill: Tensor) -> Tensor:
    # 0 bits gives black, as with the Pillow timm was written against (Pillow >= 10 refuses 0).
    mask = (256 - torch.pow(2.0, 8 - bits.clamp(0, 8))).to(torch.uint8)
    return x & mask.view(-1, 1, 1, 1)


def _solarize(x: Tensor, thresh: Tensor, _fill: Tensor) -> Tensor:
    return torch.where(x >= thresh.view(-1, 1, 1, 1), 255 - x, x)


def _solarize_add(x: Tensor, add: Tensor, _fill: Tensor) -> Tensor:
    added = (x.float() + add.view(-1, 1, 1, 1)).clamp_(max=255).to(torch.uint8)
    return torch.where(x < 128, added, x)


def _color(x: Tensor, f: Tensor, _fill: Tensor) -> Tensor:
    return _blend(_gray(x).expand_as(x), x, f)


def _contrast(x: Tensor, f: Tensor, _fill: Tensor) -> Tensor:
    gray = _gray(x)
    mean = (gray.sum(dim=(1, 2, 3)).double() / gray[0].numel() + 0.5).floor()
    return _blend(mean.view(-1, 1, 1, 1).expand_as(x), x, f)


def _brightness(x: Tensor, f: Tensor, _fill: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, f)


def _smooth_kernel(device: torch.device) -> Tensor:
    kernel = torch.ones(3, 1, 3, 3, device=device)
    kernel[:, :, 1, 1] = 5.0  # ImageFilter.SMOOTH: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13
    return kernel / 13


def _smooth(x: Tensor, kernel: Tensor) -> Tensor:
    """ImageFilter.SMOOTH, rounded, as float; the 1-pixel border is left unchanged, as in Pillow."""
    smooth = x.float()
    smooth[:, :, 1:-1, 1:-1] = (F.conv2d(smooth, kernel, groups=3) + 0.5).floor_().clamp_(0, 255)
    return smooth


def _sharpness(x: Tensor, f: Tensor, _fill: Tensor) -> Tensor:
    """Blend with ImageFilter.SMOOTH."""
    return _blend(_smooth(x, _smooth_kernel(x.device)), x, f)


def _affine(like: Tensor, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> Tensor:
    """(n,2,3) matrices [[a, b, c], [d, e, f]]; each entry a number or an (n,) tensor like `like`."""
    entries = [v if isinstance(v, Tensor) else torch.full_like(like, v) for v in (a, b, c, d, e, f)]
    return torch.stack(entries, -1).view(-1, 2, 3)


def warp_grid(h: int, w: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The constants of a bicubic warp of h x w images: output pixel centres and the 4 tap offsets (host
    tensors the stage moves with its per-batch plan; made on the device when a warp is called alone)."""
    return {"xs": (torch.arange(w, device=device, dtype=torch.float32) + 0.5).view(1, 1, 1, w),
            "ys": (torch.arange(h, device=device, dtype=torch.float32) + 0.5).view(1, 1, h, 1),
            "taps": torch.arange(-1, 3, device=device, dtype=torch.float32).view(4, 1, 1, 1, 1),
            "limits": torch.tensor([w, h], device=device, dtype=torch.float32).view(1, 2, 1, 1)}


def _warp(x: Tensor, m: Tensor, fill: Tensor, resample: str = "bicubic", grid: dict[str, Tensor] | None = None) -> Tensor:
    """Pillow's Image.transform(AFFINE, resample, fillcolor=fill): `m` (b,2,3) maps output pixel
    coordinates to input ones (pixel centres at i + 0.5); a sample outside the input -> fill.
    bicubic: Pillow's kernel (cubic convolution with a = -1) over the 4x4 neighbours, clamped at the border,
    truncated to uint8 as Pillow does, summed in Pillow's order (each row's 4 taps, then the 4 rows); x and y
    are computed together and the 16 taps read in one gather. bilinear: grid_sample, truncated likewise."""
    b, _, h, w = x.shape
    if resample == "bilinear":
        (a, bb, c), (d, e, f) = (row.unbind(-1) for row in m.unbind(1))
        r = h / w  # the same map in affine_grid's normalised coordinates (u = 2 x / w - 1)
        theta = _affine(a, a, bb * r, a + bb * r + 2 * c / w - 1, d / r, e, d / r + e + 2 * f / h - 1)
        grid_ = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
        out = F.grid_sample(x.float(), grid_, mode="bilinear", padding_mode="border", align_corners=False)
        inside = ((grid_ >= -1) & (grid_ < 1)).all(-1).unsqueeze(1)
        return torch.where(inside, out, fill).floor_().to(torch.uint8)
    g = grid if grid is not None else warp_grid(h, w, x.device)
    coef = m.view(b, 2, 3, 1, 1)  # rows (a, b, c) for the source x, (d, e, f) for the source y
    p = coef[:, :, 0] * g["xs"].view(1, 1, 1, w) + coef[:, :, 1] * g["ys"].view(1, 1, h, 1) + coef[:, :, 2]
    inside = ((p >= 0) & (p < g["limits"])).all(1, keepdim=True)  # (b,1,h,w): source x and y inside
    q = p - 0.5
    p0 = q.floor()
    t = q - p0
    u = 1 - t  # Pillow's BICUBIC macro (Geometry.c) as 4 tap weights, for x and y at once
    weights = torch.stack([-t * u * u, 1 - t * t * (1 + u), t * (1 + t * u), -t * t * u])  # (4,b,2,h,w)
    taps = p0 + g["taps"]  # (4,b,2,h,w) source coordinates of the taps
    cols = taps[:, :, 0].clamp(0, w - 1).long()
    rows = taps[:, :, 1].clamp(0, h - 1).long() * w
    index = (rows.unsqueeze(1) + cols.unsqueeze(0)).permute(2, 0, 1, 3, 4).reshape(b, 1, 16 * h * w)
    taps_read = x.reshape(b, 3, h * w).float().gather(2, index.expand(b, 3, 16 * h * w)).view(b, 3, 4, 4, h * w)
    wx = weights[:, :, 0].permute(1, 0, 2, 3).reshape(b, 1, 1, 4, h * w)
    wy = weights[:, :, 1].permute(1, 0, 2, 3).reshape(b, 1, 4, h * w)
    prod = taps_read * wx  # (b,3,4 rows,4 cols,hw)
    row = ((prod[:, :, :, 0] + prod[:, :, :, 1]) + prod[:, :, :, 2]) + prod[:, :, :, 3]
    prod = row * wy
    out = ((prod[:, :, 0] + prod[:, :, 1]) + prod[:, :, 2]) + prod[:, :, 3]
    out = out.view(b, 3, h, w).clamp_(0, 255)
    return torch.where(inside, out, fill).floor_().to(torch.uint8)


# Each geometric op's affine matrix (output -> input coordinates), (n,2,3) float32 from its argument (n,):
# computed on the host for the batched plan, on the argument's device when an op is applied alone.
def _shear_x_matrix(v: Tensor, h: int, w: int) -> Tensor:
    return _affine(v, b=v)


def _shear_y_matrix(v: Tensor, h: int, w: int) -> Tensor:
    return _affine(v, d=v)


def _translate_x_matrix(pct: Tensor, h: int, w: int) -> Tensor:
    return _affine(pct, c=pct * w)


def _translate_y_matrix(pct: Tensor, h: int, w: int) -> Tensor:
    return _affine(pct, f=pct * h)


def _rotate_matrix(degrees: Tensor, h: int, w: int) -> Tensor:
    """Image.rotate(degrees): counter-clockwise about the centre (w/2, h/2)."""
    cx, cy = w / 2, h / 2
    t = torch.deg2rad(-degrees)
    cos, sin = torch.cos(t), torch.sin(t)
    return _affine(t, cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


GEOMETRY: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "Rotate": _rotate_matrix, "ShearX": _shear_x_matrix, "ShearY": _shear_y_matrix,
    "TranslateXRel": _translate_x_matrix, "TranslateYRel": _translate_y_matrix}


def _geometric(name: str):
    def op(x: Tensor, v: Tensor, fill: Tensor, resample: str = "bicubic") -> Tensor:
        return _warp(x, GEOMETRY[name](v, x.shape[2], x.shape[3]), fill, resample)
    return op


_rotate, _shear_x, _shear_y = _geometric("Rotate"), _geometric("ShearX"), _geometric("ShearY")
_translate_x, _translate_y = _geometric("TranslateXRel"), _geometric("TranslateYRel")


# ----------------------------------------------------------------------------- magnitudes
# timm's level -> argument rules, on the host in float64: (magnitude (b,), sign (b,) of +-1) -> arg (b,).

def _frac(m: Tensor) -> Tensor:
    return m / _LEVEL_DENOM


_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rotate": lambda m, s: _frac(m) * 30.0 * s,
    "enhance": lambda m, s: _frac(m) * 1.8 + 0.1,
    "enhance_inc": lambda m, s: (1.0 + _frac(m) * 0.9 * s).clamp(min=0.1),
    "shear": lambda m, s: _frac(m) * 0.3 * s,
    "translate": lambda m, s: _frac(m) * 0.45 * s,
    "posterize": lambda m, s: (_frac(m) * 4).floor(),
    "posterize_inc": lambda m, s: 4 - (_frac(m) * 4).floor(),
    "posterize_orig": lambda m, s: (_frac(m) * 4).floor() + 4,
    "solarize": lambda m, s: (_frac(m) * 256).floor(),
    "solarize_inc": lambda m, s: 256 - (_frac(m) * 256).floor(),
    "solarize_add": lambda m, s: (_frac(m) * 110).floor(),
    "none": lambda m, s: torch.zeros_like(m),
}

OPS: dict[str, tuple[Callable[[Tensor, Tensor, Tensor], Tensor], str]] = {
    "AutoContrast": (_auto_contrast, "none"), "Equalize": (_equalize, "none"), "Invert": (_invert, "none"),
    "Rotate": (_rotate, "rotate"),
    "Posterize": (_posterize, "posterize"), "PosterizeIncreasing": (_posterize, "posterize_inc"),
    "PosterizeOriginal": (_posterize, "posterize_orig"),
    "Solarize": (_solarize, "solarize"), "SolarizeIncreasing": (_solarize, "solarize_inc"),
    "SolarizeAdd": (_solarize_add, "solarize_add"),
    "Color": (_color, "enhance"), "ColorIncreasing": (_color, "enhance_inc"),
    "Contrast": (_contrast, "enhance"), "ContrastIncreasing": (_contrast, "enhance_inc"),
    "Brightness": (_brightness, "enhance"), "BrightnessIncreasing": (_brightness, "enhance_inc"),
    "Sharpness": (_sharpness, "enhance"), "SharpnessIncreasing": (_sharpness, "enhance_inc"),
    "ShearX": (_shear_x, "shear"), "ShearY": (_shear_y, "shear"),
    "TranslateXRel": (_translate_x, "translate"), "TranslateYRel": (_translate_y, "translate"),
}

GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                   "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                              "TranslateXRel", "TranslateYRel")
# timm's _RAND_CHOICE_WEIGHTS_0 ('w0'), by position in the op list as timm applies them.
_RAND_WEIGHTS_0 = (0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1, 0.1)

# timm's auto_augment_policy_original (the AutoAugment paper's ImageNet policy): (op, prob, magnitude).
AUTOAUG_IMAGENET = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)), (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)), (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)), (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)), (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)


def _to(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without a sync (a blocking copy would wait for all queued GPU work)."""
    return t.to(device, non_blocking=True)


def _fill(fill: Sequence[int]) -> Tensor:
    return torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1)


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")


class HostPlan:
    """The batch's host-side draws, packed into one byte buffer and moved to the device in one copy (pinned,
    non-blocking on CUDA; none on the CPU), then read there as views of their own dtype and shape: one
    host-to-device transfer per batch instead of one per op group."""

    def __init__(self) -> None:
        self.parts: dict[str, tuple[int, Tensor]] = {}
        self.size = 0

    def add(self, name: str, t: Tensor) -> None:
        t = t.contiguous()
        self.size = -(-self.size // 8) * 8  # every part 8-byte aligned: any dtype can be viewed in place
        self.parts[name] = (self.size, t)
        self.size += t.numel() * t.element_size()

    def to(self, device: torch.device) -> dict[str, Tensor]:
        buf = torch.empty(max(8, self.size), dtype=torch.uint8, pin_memory=device.type == "cuda")
        for offset, t in self.parts.values():
            if t.numel():
                buf[offset:offset + t.numel() * t.element_size()] = t.view(-1).view(torch.uint8)
        if buf.device != device:
            buf = buf.to(device, non_blocking=True)
        return {name: buf[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for name, (offset, t) in self.parts.items()}


LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
           "Solarize", "SolarizeIncreasing", "SolarizeAdd")  # per-(sample, channel) 256-entry lookup tables
IMAGE_LUTS = {"AutoContrast": _auto_contrast_lut, "Equalize": _equalize_lut}  # tables that need the image
BLEND_KINDS = {"Brightness": 0, "BrightnessIncreasing": 0, "Color": 1, "ColorIncreasing": 1, "Contrast": 2,
               "ContrastIncreasing": 2, "Sharpness": 3, "SharpnessIncreasing": 3}  # by their degenerate image


def apply_op(images: Tensor, name: str, magnitude: float | Tensor, sign: float | Tensor = 1.0,
             fill: Sequence[int] = IMAGENET_FILL, resample: str = "bicubic") -> Tensor:
    """One op at a fixed magnitude (0..10, timm scale) on every sample: for tests and inspection."""
    _check_uint8(images)
    fn, level = OPS[name]
    b = images.shape[0]
    arg = _LEVELS[level](torch.as_tensor(magnitude, dtype=torch.float64).expand(b),
                         torch.as_tensor(sign, dtype=torch.float64).expand(b))
    return fn(images, _to(arg.float(), images.device), _to(_fill(fill), images.device),
              **({"resample": resample} if name in GEOMETRIC_OPS else {}))


# ----------------------------------------------------------------------------- draw statistics

class DrawRecorder:
    """The stage's own draws, counted as they are made (launch/preview_augment.py, parity tests):
    ops applied per image, which ops at which magnitudes, erasing and Mixup/CutMix."""

    def __init__(self) -> None:
        self.images = 0
        self.ops_per_image: list[int] = []
        self.op_counts: dict[str, int] = {}
        self.op_magnitudes: dict[str, float] = {}
        self.erased_images = self.erased_boxes = self.erasing_images = 0
        self.mixing: dict[str, int] = {"mixup": 0, "cutmix": 0, "none": 0}
        self.mixing_images, self.lam_sum = 0, 0.0

    def auto_augment(self, names: Sequence[str], plan: list[OpLayer]) -> None:
        applied = torch.stack([layer.apply for layer in plan], 1)  # (B, layers)
        self.ops_per_image += applied.sum(1).tolist()
        for layer in plan:
            for op, mag in zip(layer.op[layer.apply].tolist(), layer.magnitude[layer.apply].tolist()):
                self.op_counts[names[op]] = self.op_counts.get(names[op], 0) + 1
                self.op_magnitudes[names[op]] = self.op_magnitudes.get(names[op], 0.0) + mag

    def erasing(self, active: Tensor) -> None:
        boxes = active.sum(1)
        self.erasing_images += len(boxes)
        self.erased_images += int((boxes > 0).sum())
        self.erased_boxes += int(boxes.sum())

    def mix(self, lam: float, box, batch: int) -> None:
        mode = "none" if lam == 1.0 else "mixup" if box is None else "cutmix"
        self.mixing[mode] += batch
        self.mixing_images += batch
        self.lam_sum += lam * batch

    def summary(self) -> dict:
        """The statistics as plain JSON values; op_frequency is each op's share of all applied ops."""
        n, counts = len(self.ops_per_image), self.ops_per_image
        applied = sum(self.op_counts.values())
        out: dict = dict(images=self.images)
        if n:
            hist = {str(k): round(counts.count(k) / n, 4) for k in range(max(counts) + 1)}
            out.update(
                ops_per_image_mean=round(sum(counts) / n, 4), ops_per_image_histogram=hist,
                untouched_fraction=round(counts.count(0) / n, 4),
                op_frequency={k: round(v / applied, 4) for k, v in sorted(self.op_counts.items())},
                op_magnitude_mean={k: round(self.op_magnitudes[k] / v, 3) for k, v in sorted(self.op_counts.items())},
                magnitude_mean=round(sum(self.op_magnitudes.values()) / applied, 3) if applied else None)
        else:  # no auto-augment: every image leaves it untouched
            out.update(ops_per_image_mean=0.0, ops_per_image_histogram={"0": 1.0}, untouched_fraction=1.0,
                       op_frequency={}, op_magnitude_mean={}, magnitude_mean=None)
        if self.erasing_images:
            out["erasing"] = dict(erased_fraction=round(self.erased_images / self.erasing_images, 4),
                                  boxes_per_erased_image=round(self.erased_boxes / max(1, self.erased_images), 3))
        if self.mixing_images:
            out["mixing"] = {f"{k}_fraction": round(v / self.mixing_images, 4) for k, v in self.mixing.items()}
            out["mixing"]["lam_mean"] = round(self.lam_sum / self.mixing_images, 4)
        return out


# ----------------------------------------------------------------------------- policies

@dataclass
class OpLayer:
    """One op slot for every sample of a batch, drawn on the host."""
    op: Tensor         # (B,) int64: index into the policy's op names
    apply: Tensor      # (B,) bool
    magnitude: Tensor  # (B,) float64, after noise and clipping
    sign: Tensor       # (B,) float64, +-1: timm's random negation of signed arguments


class PerSampleOps:
    """Shared engine: `sample` draws a plan on the host, `apply` runs each op once per layer on
    the samples that drew it."""
    names: tuple[str, ...]

    def __init__(self, generator: torch.Generator, fill: Sequence[int]) -> None:
        self.generator, self.fill = generator, tuple(fill)
        self.resample = "bicubic"  # geometric ops: timm resamples as the train interpolation says
        self.recorder: DrawRecorder | None = None
        self._consts: tuple | None = None  # (device, fill, smoothing kernel) on the device of the last batch

    def sample(self, batch: int) -> list[OpLayer]:
        raise NotImplementedError

    def _sign(self, batch: int) -> Tensor:
        return torch.where(torch.rand(batch, generator=self.generator, dtype=torch.float64) > 0.5, -1.0, 1.0)

    def pack(self, plan: list[OpLayer], h: int, w: int, host: HostPlan, key: str = "aa") -> list[dict]:
        """The device work of a plan, prepared on the host: per layer, the samples of each op family and what
        their kernels need, image-independent lookup tables and warp matrices computed here. Within a layer
        each sample draws one op, so the three families touch disjoint samples and run one after another:
        one table lookup for every LUT op, one warp for every geometric op, one blend for every colour op."""
        layers = []
        ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256)
        fill = _fill(self.fill)
        if any(self.names[int(k)] in GEOMETRIC_OPS for layer in plan for k in layer.op[layer.apply].unique()):
            for name, t in warp_grid(h, w).items():
                host.add(f"{key}.grid.{name}", t)
        for i, layer in enumerate(plan):
            groups: dict[str, list[tuple[str, Tensor, Tensor]]] = {"lut": [], "geo": [], "blend": []}
            for k, name in enumerate(self.names):
                idx = torch.nonzero(layer.apply & (layer.op == k)).flatten()  # host tensor: no sync
                if idx.numel():
                    arg = _LEVELS[OPS[name][1]](layer.magnitude[idx], layer.sign[idx]).float()
                    family = "lut" if name in LUT_OPS else "geo" if name in GEOMETRIC_OPS else "blend"
                    groups[family].append((name, idx, arg))
            meta: dict = {}
            if groups["lut"]:
                n = sum(len(idx) for _, idx, _ in groups["lut"])
                tables, at, image_luts = ramp.expand(n, 3, 1, 256).clone(), 0, {}
                for name, idx, arg in groups["lut"]:
                    if name in IMAGE_LUTS:
                        image_luts.setdefault(name, []).append(torch.arange(at, at + len(idx)))
                    else:  # a pointwise op applied to the ramp 0..255 is its table
                        tables[at:at + len(idx)] = OPS[name][0](tables[at:at + len(idx)], arg, fill)
                    at += len(idx)
                host.add(f"{key}.{i}.lut.idx", torch.cat([idx for _, idx, _ in groups["lut"]]))
                host.add(f"{key}.{i}.lut.tables", tables.view(n, 3, 256))
                for name, positions in image_luts.items():
                    host.add(f"{key}.{i}.lut.{name}", torch.cat(positions))
                meta["lut"] = sorted(image_luts)
            if groups["geo"]:
                host.add(f"{key}.{i}.geo.idx", torch.cat([idx for _, idx, _ in groups["geo"]]))
                host.add(f"{key}.{i}.geo.m", torch.cat([GEOMETRY[name](arg, h, w) for name, _, arg in groups["geo"]]))
                meta["geo"] = True
            if groups["blend"]:
                host.add(f"{key}.{i}.blend.idx", torch.cat([idx for _, idx, _ in groups["blend"]]))
                host.add(f"{key}.{i}.blend.kind", torch.cat([torch.full((len(idx),), BLEND_KINDS[name])
                                                             for name, idx, _ in groups["blend"]]))
                host.add(f"{key}.{i}.blend.factor", torch.cat([arg for _, _, arg in groups["blend"]]))
                meta["blend"] = {BLEND_KINDS[name] for name, _, _ in groups["blend"]}
            layers.append(meta)
        return layers

    def run(self, images: Tensor, layers: list[dict], dev: dict[str, Tensor], key: str = "aa") -> Tensor:
        """The packed plan's device work: per layer at most one lookup, one warp and one blend pass."""
        x = images.clone()
        b, _, h, w = x.shape
        if self._consts is None or self._consts[0] != x.device:
            self._consts = (x.device, _to(_fill(self.fill), x.device), _smooth_kernel(x.device))
        _, fill, kernel = self._consts
        grid = {name: dev[f"{key}.grid.{name}"] for name in ("xs", "ys", "taps", "limits")} \
            if f"{key}.grid.xs" in dev else None
        for i, meta in enumerate(layers):
            if "lut" in meta:
                idx, tables = dev[f"{key}.{i}.lut.idx"], dev[f"{key}.{i}.lut.tables"]
                sel = x.index_select(0, idx)
                for name in meta["lut"]:
                    at = dev[f"{key}.{i}.lut.{name}"]
                    tables.index_copy_(0, at, IMAGE_LUTS[name](sel.index_select(0, at)).clamp(0, 255).to(torch.uint8))
                n = len(idx)
                x.index_copy_(0, idx, tables.gather(2, sel.reshape(n, 3, h * w).long()).view(n, 3, h, w))
            if "geo" in meta:
                idx = dev[f"{key}.{i}.geo.idx"]
                warped = _warp(x.index_select(0, idx), dev[f"{key}.{i}.geo.m"], fill, self.resample, grid)
                x.index_copy_(0, idx, warped)
            if "blend" in meta:
                idx, kinds = dev[f"{key}.{i}.blend.idx"], meta["blend"]
                sel = x.index_select(0, idx)
                kind = dev[f"{key}.{i}.blend.kind"].view(-1, 1, 1, 1)
                degenerate: Tensor | float = 0.0  # Brightness: black
                if kinds & {1, 2}:
                    gray = _gray(sel)
                    if 1 in kinds:  # Color: the grey image
                        degenerate = torch.where(kind == 1, gray.float(), degenerate)
                    if 2 in kinds:  # Contrast: the grey image's rounded mean
                        mean = (gray.sum(dim=(1, 2, 3)).double() / gray[0].numel() + 0.5).floor()
                        degenerate = torch.where(kind == 2, mean.float().view(-1, 1, 1, 1), degenerate)
                if 3 in kinds:  # Sharpness: the smoothed image
                    degenerate = torch.where(kind == 3, _smooth(sel, kernel), degenerate)
                x.index_copy_(0, idx, _blend(degenerate, sel, dev[f"{key}.{i}.blend.factor"]))
        return x

    def apply(self, images: Tensor, plan: list[OpLayer]) -> Tensor:
        _check_uint8(images)
        host = HostPlan()
        layers = self.pack(plan, images.shape[2], images.shape[3], host)
        return self.run(images, layers, host.to(images.device))

    def __call__(self, images: Tensor) -> Tensor:
        plan = self.sample(images.shape[0])
        if self.recorder is not None:
            self.recorder.auto_augment(self.names, plan)
        return self.apply(images, plan)


class RandAugment(PerSampleOps):
    """timm RandAugment, per sample: `num_ops` ops drawn with replacement (without, weighted, for
    w0), each applied with prob 0.5 at magnitude ~ N(m, mstd) clipped to [0, mmax]."""

    def __init__(self, generator: torch.Generator, magnitude: float = 9.0, num_ops: int = 2, mstd: float = 0.5,
                 increasing: bool = True, mmax: float = _LEVEL_DENOM, prob: float = 0.5,
                 weights: Sequence[float] | None = None, fill: Sequence[int] = IMAGENET_FILL) -> None:
        super().__init__(generator, fill)
        self.names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        self.magnitude, self.num_ops, self.mstd, self.mmax, self.prob = magnitude, num_ops, mstd, mmax, prob
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)

    @classmethod
    def from_spec(cls, spec: str, generator: torch.Generator, fill: Sequence[int] = IMAGENET_FILL) -> RandAugment:
        """Parse timm's 'rand-m9-mstd0.5-inc1' (keys m, n, mstd, inc, mmax, w; defaults m10 n2)."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"auto_augment '{spec}' is not a RandAugment string like 'rand-m9-mstd0.5-inc1'")
        kw: dict = dict(magnitude=_LEVEL_DENOM, num_ops=2, mstd=0.0, increasing=False)
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|w)(\d+(?:\.\d+)?)", part)
            if not match:
                raise ValueError(f"auto_augment '{spec}': cannot parse '{part}'; "
                                 "expected rand-m<M>[-n<N>][-mstd<S>][-inc<0|1>][-mmax<X>][-w0]")
            key, val = match.groups()
            if key == "mstd":
                kw["mstd"] = math.inf if float(val) > 100 else float(val)  # > 100: uniform in [0, m]
            elif key == "inc":
                kw["increasing"] = val not in ("0", "0.0")
            elif key == "w":
                if float(val) != 0:
                    raise ValueError(f"auto_augment '{spec}': only the weight set w0 exists")
                kw["weights"] = _RAND_WEIGHTS_0
            else:
                name = {"m": "magnitude", "n": "num_ops", "mmax": "mmax"}[key]
                kw[name] = int(float(val)) if key == "n" else float(val)
        return cls(generator, fill=fill, **kw)

    def sample(self, batch: int) -> list[OpLayer]:
        g, n, k = self.generator, self.num_ops, len(self.names)
        if self.weights is None:
            ops = torch.randint(k, (batch, n), generator=g)
        else:  # timm draws weighted ops without replacement
            ops = torch.multinomial(self.weights.expand(batch, k), n, replacement=False, generator=g)
        plan = []
        for i in range(n):
            apply = torch.rand(batch, generator=g, dtype=torch.float64) < self.prob
            noise = torch.randn(batch, generator=g, dtype=torch.float64)
            uniform = torch.rand(batch, generator=g, dtype=torch.float64)
            mag = uniform * self.magnitude if math.isinf(self.mstd) else self.magnitude + self.mstd * noise
            plan.append(OpLayer(ops[:, i], apply, mag.clamp(0.0, self.mmax), self._sign(batch)))
        return plan


class AutoAugment(PerSampleOps):
    """The AutoAugment ImageNet policy, per sample: each image draws one of the 25 sub-policies,
    each of its two ops applied with its own probability at its fixed magnitude."""

    def __init__(self, generator: torch.Generator, policy=AUTOAUG_IMAGENET,
                 fill: Sequence[int] = IMAGENET_FILL) -> None:
        super().__init__(generator, fill)
        self.names = tuple(sorted({op for sub in policy for op, _, _ in sub}))
        self.op_table = torch.tensor([[self.names.index(op) for op, _, _ in sub] for sub in policy])
        self.prob_table = torch.tensor([[p for _, p, _ in sub] for sub in policy], dtype=torch.float64)
        self.mag_table = torch.tensor([[m for _, _, m in sub] for sub in policy], dtype=torch.float64)

    def sample(self, batch: int) -> list[OpLayer]:
        sub = torch.randint(len(self.op_table), (batch,), generator=self.generator)
        plan = []
        for slot in range(self.op_table.shape[1]):
            apply = torch.rand(batch, generator=self.generator, dtype=torch.float64) < self.prob_table[sub, slot]
            plan.append(OpLayer(self.op_table[sub, slot], apply, self.mag_table[sub, slot], self._sign(batch)))
        return plan


def build_auto_augment(spec: str, generator: torch.Generator, fill: Sequence[int] = IMAGENET_FILL,
                       resample: str = "bicubic") -> PerSampleOps | None:
    """'none' -> None, 'autoaug-imagenet' -> AutoAugment, 'rand-...' -> RandAugment; `resample`
    (bicubic or bilinear) for the geometric ops."""
    if resample not in ("bicubic", "bilinear"):
        raise ValueError(f"interpolation '{resample}': expected 'bicubic' or 'bilinear'")
    ops: PerSampleOps | None = None
    if spec in ("none", ""):
        return None
    if spec == "autoaug-imagenet":
        ops = AutoAugment(generator, fill=fill)
    elif spec == "rand" or spec.startswith("rand-"):
        ops = RandAugment.from_spec(spec, generator, fill=fill)
    if ops is not None:
        ops.resample = resample
        return ops
    raise ValueError(f"auto_augment '{spec}' is not understood: expected 'none', 'autoaug-imagenet' "
                     "or a RandAugment string like 'rand-m9-mstd0.5-inc1'")


# ----------------------------------------------------------------------------- erasing, mixing

class RandomErasing:
    """timm RandomErasing on the normalised float batch: per sample with prob p, `count` boxes
    (1..max_count) of area U(min_area, max_area)/count, log-uniform aspect, first of 10 attempts
    that fits. Fill: 'pixel' per-pixel N(0,1), 'rand' N(0,1) per channel, 'const' zeros."""

    def __init__(self, probability: float = 0.25, mode: str = "pixel", max_count: int = 1,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                 generator: torch.Generator | None = None) -> None:
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"random erasing mode '{mode}': expected 'pixel', 'rand' or 'const'")
        self.p, self.mode, self.max_count = probability, mode, max_count
        self.area = (min_area, max_area)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.generator = generator if generator is not None else torch.Generator()
        self.recorder: DrawRecorder | None = None

    def sample(self, batch: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Host plan: boxes (B, max_count, 4) as (top, left, height, width) and active (B, max_count)."""
        g, r, f64 = self.generator, self.max_count, torch.float64
        erase = torch.rand(batch, generator=g, dtype=f64) < self.p
        count = torch.randint(1, r + 1, (batch, 1), generator=g)
        u = torch.rand(4, batch, r, 10, generator=g, dtype=f64)
        target = (self.area[0] + (self.area[1] - self.area[0]) * u[0]) * (h * w) / count.unsqueeze(2)
        aspect = torch.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * u[1])
        bh, bw = (target * aspect).sqrt().round().long(), (target / aspect).sqrt().round().long()
        fits = (bw < w) & (bh < h)
        first = fits.long().argmax(2, keepdim=True)  # first attempt that fits
        pick = lambda t: t.gather(2, first).squeeze(2)
        bh, bw = pick(bh), pick(bw)
        top, left = (pick(u[2]) * (h - bh + 1)).long(), (pick(u[3]) * (w - bw + 1)).long()
        active = erase.unsqueeze(1) & fits.any(2) & (torch.arange(r) < count)
        return torch.stack([top, left, bh, bw], 2), active

    def pack(self, b: int, c: int, h: int, w: int, host: HostPlan, key: str = "er") -> dict | None:
        """Draw the batch's boxes, fill seed and colours (in that order, from the generator) and put what the
        device needs into `host`; None when no sample is erased."""
        boxes, active = self.sample(b, h, w)
        if self.recorder is not None:
            self.recorder.erasing(active)
        seed = int(torch.randint(2**62, (), generator=self.generator))
        colors = torch.randn(b, self.max_count, c, generator=self.generator)
        idx = torch.nonzero(active.any(1)).flatten()
        if idx.numel() == 0:
            return None
        for name, t in (("idx", idx), ("boxes", boxes[idx]), ("active", active[idx]), ("colors", colors[idx]),
                        ("ys", torch.arange(h).view(1, h, 1)), ("xs", torch.arange(w).view(1, 1, w))):
            host.add(f"{key}.{name}", t)
        return {"seed": seed}

    def run(self, x: Tensor, meta: dict | None, dev: dict[str, Tensor], key: str = "er") -> Tensor:
        if meta is None:
            return x
        c = x.shape[1]
        idx_d, box, act, colors = (dev[f"{key}.{n}"] for n in ("idx", "boxes", "active", "colors"))
        ys, xs = dev[f"{key}.ys"], dev[f"{key}.xs"]
        sel = x.index_select(0, idx_d)
        # per-pixel noise is drawn on the device, from a generator seeded by the host stream (the meta device,
        # where the stage's dispatch is measured, has no generator and no values)
        noise_gen = torch.Generator(device=x.device).manual_seed(meta["seed"]) \
            if self.mode == "pixel" and x.device.type != "meta" else None
        for i in range(self.max_count):
            top, left, bh, bw = (box[:, i, j].view(-1, 1, 1) for j in range(4))
            inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw) & act[:, i].view(-1, 1, 1)
            if self.mode == "pixel":
                fill = torch.randn(sel.shape, generator=noise_gen, device=x.device, dtype=x.dtype)
            elif self.mode == "rand":
                fill = colors[:, i].to(x.dtype).view(-1, c, 1, 1)
            else:
                fill = torch.zeros((), device=x.device, dtype=x.dtype)
            sel = torch.where(inside.unsqueeze(1), fill, sel)
        return x.index_copy(0, idx_d, sel)

    def __call__(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        host = HostPlan()
        meta = self.pack(b, c, h, w, host)
        return self.run(x, meta, host.to(x.device))


def smoothed_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """timm's one_hot(on=1 - smoothing + smoothing / C, off=smoothing / C), by scatter (no sync)."""
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return y.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class MixupCutmix:
    """timm Mixup in batch mode: one lambda per batch, mixed with the batch reversed (x.flip(0));
    targets are label-smoothed one-hots mixed the same way."""

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000,
                 generator: torch.Generator | None = None) -> None:
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob
        self.smoothing, self.num_classes = label_smoothing, num_classes
        self.generator = generator if generator is not None else torch.Generator()
        self.enabled = True  # the loader turns it off from epoch aug.mixup_off_epoch on
        self.recorder: DrawRecorder | None = None

    @property
    def active(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def _beta(self, alpha: float) -> float:
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return float(np.random.default_rng(seed).beta(alpha, alpha))

    def sample(self, h: int, w: int) -> tuple[float, tuple[int, int, int, int] | None]:
        """Host draw: (lambda, CutMix box (y0, y1, x0, x1) or None for Mixup/no mixing)."""
        g = self.generator
        coin_apply, coin_cut = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        if not (self.enabled and self.active and coin_apply < self.prob):
            return 1.0, None
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or coin_cut < self.switch_prob)
        lam = self._beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha)
        if not use_cutmix or lam == 1.0:
            return lam, None
        ratio = math.sqrt(1.0 - lam)  # timm rand_bbox: centre uniform, box clipped at the borders
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = (int(v) for v in (torch.randint(h, (), generator=g), torch.randint(w, (), generator=g)))
        # an odd cut keeps its full size, as timm >= 1.0.26 rounds it (older timm dropped a row/column)
        y0, y1 = min(max(cy - cut_h // 2, 0), h), min(max(cy + (cut_h + 1) // 2, 0), h)
        x0, x1 = min(max(cx - cut_w // 2, 0), w), min(max(cx + (cut_w + 1) // 2, 0), w)
        return 1.0 - (y1 - y0) * (x1 - x0) / (h * w), (y0, y1, x0, x1)

    def __call__(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.active and x.shape[0] % 2:
            raise ValueError(f"Mixup/CutMix need an even per-rank batch, got {x.shape[0]}")
        y = smoothed_one_hot(labels, self.num_classes, self.smoothing)
        lam, box = self.sample(x.shape[2], x.shape[3])
        if self.recorder is not None:
            self.recorder.mix(lam, box, x.shape[0])
        if lam == 1.0:
            return x, y
        if box is None:
            x = x * lam + x.flip(0) * (1.0 - lam)
        else:
            y0, y1, x0, x1 = box
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        return x, y * lam + y.flip(0) * (1.0 - lam)


# ----------------------------------------------------------------------------- the stage

class DeviceAugment:
    """The training stage on the device: uint8 batch -> auto-augment -> normalise -> random
    erasing -> Mixup/CutMix -> (float batch, soft targets (B, num_classes)). All stages draw from
    one CPU generator that this object owns: seeded once (`seed`; give each rank its own) and
    saved with state_dict(), or re-seeded per batch through __call__'s `seed` (the Loader's
    batch_seed(seed, rank, epoch, step)), so a resumed run re-draws exactly the same.
    normalize=False: the input is already a normalised float batch (FFCV's CPU fast path); only erasing and
    mixing run, and auto_augment must be 'none'."""

    def __init__(self, *, auto_augment: str, mean: Sequence[float], std: Sequence[float], num_classes: int,
                 reprob: float = 0.25, remode: str = "pixel", recount: int = 1, mixup: float = 0.8,
                 cutmix: float = 1.0, mixup_prob: float = 1.0, switch_prob: float = 0.5, smoothing: float = 0.1,
                 seed: int = 0, normalize: bool = True, device: torch.device | str | None = None,
                 interpolation: str = "bicubic") -> None:
        self.generator = torch.Generator().manual_seed(seed)
        fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's img_mean fill for geometric ops
        self.auto_augment = build_auto_augment(auto_augment, self.generator, fill=fill, resample=interpolation)
        if self.auto_augment is not None and not normalize:
            raise ValueError(f"auto_augment '{auto_augment}' needs the uint8 batch; with normalize=False "
                             "(already normalised input) use 'none'")
        self.normalize, self.recorder = normalize, None
        self.erasing = RandomErasing(reprob, remode, recount, generator=self.generator) if reprob > 0 else None
        self.mixup = MixupCutmix(mixup, cutmix, mixup_prob, switch_prob, smoothing, num_classes, self.generator)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.bias = -self.mean * self.inv_std  # normalise = one addcmul: x * inv_std + bias
        if device is not None:
            self._to_device(torch.device(device))

    def _to_device(self, device: torch.device) -> None:
        self.mean, self.inv_std, self.bias = (_to(t, device) for t in (self.mean, self.inv_std, self.bias))

    def record(self, recorder: DrawRecorder | None) -> None:
        """Count every draw from here on into `recorder` (None: stop counting)."""
        for part in (self.auto_augment, self.erasing, self.mixup):
            if part is not None:
                part.recorder = recorder
        self.recorder = recorder

    def set_mixup_enabled(self, enabled: bool) -> None:
        """Off from epoch `aug.mixup_off_epoch` on (timm's meaning): targets become smoothed one-hots."""
        self.mixup.set_enabled(enabled)

    def __call__(self, images: Tensor, labels: Tensor, seed: int | None = None) -> tuple[Tensor, Tensor]:
        if seed is not None:
            self.generator.manual_seed(seed)
        if self.recorder is not None:
            self.recorder.images += images.shape[0]
        if self.normalize:
            _check_uint8(images)
        b, c, h, w = images.shape
        # every host draw first, in the order the stages take them, then one host-to-device copy of them all
        host, layers = HostPlan(), None
        if self.auto_augment is not None:
            plan = self.auto_augment.sample(b)
            if self.recorder is not None:
                self.recorder.auto_augment(self.auto_augment.names, plan)
            layers = self.auto_augment.pack(plan, h, w, host)
        erasing = self.erasing.pack(b, c, h, w, host) if self.erasing is not None else None
        dev = host.to(images.device)
        x = images
        if self.normalize:
            if layers is not None:
                images = self.auto_augment.run(images, layers, dev)
            if self.mean.device != images.device:
                self._to_device(images.device)
            x = torch.addcmul(self.bias, images.float(), self.inv_std)  # one fused pass
        if self.erasing is not None:
            x = self.erasing.run(x, erasing, dev)
        return self.mixup(x, labels)

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])

