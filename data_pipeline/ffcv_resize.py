"""Pillow's antialiased resize (bicubic or bilinear) in numba, for FFCV's compiled decoders.

FFCV's own decoders crop and resize with OpenCV's INTER_AREA (a box filter); the recipe resizes
with Pillow's antialiased bicubic, as the folder backend (Pillow) and DALI (antialias=True) do.
This is Pillow's Resample.c algorithm: separable passes (horizontal, then vertical), the filter's
support widened by the downscale factor, taps allowed outside the crop box where the image has
pixels, Pillow's 22-bit fixed-point weights, each pass rounded to uint8. The decoders' generate_code follows FFCV 1.0.2's
ResizedCropRGBImageDecoder, with this resize in place of its resize_crop.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=False)
def _filter(x: float, bicubic: bool) -> float:
    x = abs(x)
    if bicubic:  # Pillow's bicubic_filter, a = -0.5, support 2
        a = -0.5
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return 0.0
    return 1.0 - x if x < 1.0 else 0.0  # bilinear (triangle), support 1


PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images (Resample.c)


@numba.njit(nogil=True, cache=False)
def _coeffs(in0: float, in1: float, in_size: int, out_size: int, bicubic: bool):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel, its first input pixel,
    its tap count and its fixed-point weights."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = (2.0 if bicubic else 1.0) * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    taps = np.zeros(ksize, np.float64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for x in range(xmax):
            taps[x] = _filter((x + xmin - center + 0.5) / filterscale, bicubic)
            total += taps[x]
        for x in range(xmax):
            w = taps[x] / total if total != 0.0 else 0.0
            weights[xx, x] = int(w * (1 << PRECISION_BITS) + (0.5 if w >= 0 else -0.5))
        bounds[xx, 0], bounds[xx, 1] = xmin, xmax
    return bounds, weights


@numba.njit(nogil=True, cache=False)
def _clip8(v: int) -> np.uint8:
    v >>= PRECISION_BITS
    return np.uint8(0 if v < 0 else 255 if v > 255 else v)


def resize_box(src, top: int, bottom: int, left: int, right: int, dst, bicubic: bool = True) -> None:
    """dst (H, W, 3) uint8 <- src[top:bottom, left:right] (H', W', 3) resized as Pillow's
    Image.resize((W, H), BICUBIC, box=(left, top, right, bottom)). Plain Python: FFCV's Compiler
    compiles it inside its pipeline; `resize_box_compiled` is the same, compiled, for direct calls."""
    out_h, out_w = dst.shape[0], dst.shape[1]
    in_h, in_w = src.shape[0], src.shape[1]
    xb, xw = _coeffs(left, right, in_w, out_w, bicubic)
    yb, yw = _coeffs(top, bottom, in_h, out_h, bicubic)
    row0 = yb[0, 0]
    row1 = yb[out_h - 1, 0] + yb[out_h - 1, 1]
    col0 = xb[0, 0]
    col1 = xb[out_w - 1, 0] + xb[out_w - 1, 1]
    rows, width = row1 - row0, out_w * 3
    half = 1 << (PRECISION_BITS - 1)
    # horizontal pass on the transposed region: each output column is a weighted sum of whole
    # (contiguous) input columns, which vectorises
    cols = np.empty((col1 - col0, rows * 3), np.int32)
    for y in range(rows):
        for x in range(col1 - col0):
            for c in range(3):
                cols[x, 3 * y + c] = src[row0 + y, col0 + x, c]
    acc = np.empty(rows * 3, np.int32)
    tmp = np.empty((rows, width), np.int32)
    for xx in range(out_w):
        xmin, n = xb[xx, 0] - col0, xb[xx, 1]
        acc[:] = half
        for k in range(n):
            w = xw[xx, k]
            col = cols[xmin + k]
            for i in range(rows * 3):
                acc[i] += col[i] * w
        for y in range(rows):
            for c in range(3):
                tmp[y, 3 * xx + c] = _clip8(acc[3 * y + c])
    flat = dst.reshape(out_h, width)
    acc = np.empty(width, np.int32)
    for yy in range(out_h):  # vertical pass: whole rows at a time (vectorised)
        ymin, n = yb[yy, 0] - row0, yb[yy, 1]
        acc[:] = half
        for k in range(n):
            w = yw[yy, k]
            t = tmp[ymin + k]
            for i in range(width):
                acc[i] += t[i] * w
        for i in range(width):
            flat[yy, i] = _clip8(acc[i])


resize_box_compiled = numba.njit(nogil=True)(resize_box)


def pillow_resize_decoders():
    """(RandomResizedCrop, CenterCrop) FFCV decoders that resize with resize_box (bicubic; an
    instance's `bicubic = False` makes it bilinear)."""
    from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder, imdecode
    from ffcv.pipeline.compiler import Compiler

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read, my_range = self.memory_read, Compiler.get_iterator()
        imdecode_c, resize_c = Compiler.compile(imdecode), Compiler.compile(resize_box)
        get_crop_c = Compiler.compile(self.get_crop_generator)
        scale = np.array(self.scale) if isinstance(self.scale, tuple) else self.scale
        ratio = np.array(self.ratio) if isinstance(self.ratio, tuple) else self.ratio
        bicubic = getattr(self, "bicubic", True)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix], bicubic)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

    train = type("PillowRandomResizedCropDecoder", (RandomResizedCropRGBImageDecoder,), {"generate_code": generate_code})
    val = type("PillowCenterCropDecoder", (CenterCropRGBImageDecoder,), {"generate_code": generate_code})
    return train, val
