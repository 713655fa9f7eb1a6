"""Pillow's antialiased resize (bicubic or bilinear) in numba, for FFCV's compiled decoders.

FFCV's own decoders crop and resize with OpenCV's INTER_AREA (a box filter); the recipe resizes
with Pillow's antialiased bicubic, as the folder backend (Pillow) and DALI (antialias=True) do.
This is Pillow's Resample.c algorithm: separable passes (horizontal, then vertical), the filter's
support widened by the downscale factor, taps allowed outside the crop box where the image has
pixels, each pass rounded to uint8. Pillow uses fixed-point weights, this float64: results agree
within +-1 on a few pixels. The decoders' generate_code follows FFCV 1.0.2's
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


@numba.njit(nogil=True, cache=False)
def _coeffs(in0: float, in1: float, in_size: int, out_size: int, bicubic: bool):
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = (2.0 if bicubic else 1.0) * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.float64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        total = 0.0
        for x in range(xmax):
            w = _filter((x + xmin - center + 0.5) / filterscale, bicubic)
            weights[xx, x] = w
            total += w
        if total != 0.0:
            for x in range(xmax):
                weights[xx, x] /= total
        bounds[xx, 0], bounds[xx, 1] = xmin, xmax
    return bounds, weights


@numba.njit(nogil=True, cache=False)
def _clip8(v: float) -> np.uint8:
    v = np.floor(v + 0.5)
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
    tmp = np.empty((row1 - row0, out_w, 3), np.uint8)
    for y in range(row0, row1):  # horizontal pass over the rows the vertical pass reads
        for xx in range(out_w):
            xmin, n = xb[xx, 0], xb[xx, 1]
            for c in range(3):
                acc = 0.0
                for k in range(n):
                    acc += src[y, xmin + k, c] * xw[xx, k]
                tmp[y - row0, xx, c] = _clip8(acc)
    for yy in range(out_h):  # vertical pass
        ymin, n = yb[yy, 0], yb[yy, 1]
        for xx in range(out_w):
            for c in range(3):
                acc = 0.0
                for k in range(n):
                    acc += tmp[ymin + k - row0, xx, c] * yw[yy, k]
                dst[yy, xx, c] = _clip8(acc)


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
