"""`image_zoom_in`: crop a region of one trajectory image and return it as a new, larger image.

Coordinates follow Qwen3-VL's grounding convention: [x1, y1, x2, y2] relative to the image on a
0-1000 scale. The crop is grown to a minimum size (a 3-pixel box says nothing) and then resized so
that it fills the pixel budget with both sides multiples of patch x merge (16 x 2 = 32 for Qwen3-VL):
the processor then keeps it as is, so the zoom really adds resolution instead of being shrunk back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from axpo.tools.base import ToolContext, ToolResult, error_result, function_schema

COORD_SCALE = 1000  # Qwen3-VL relative coordinates


@dataclass
class ZoomConfig:
    # Keep max_pixels equal to the processor's max_pixels (TinyModelConfig.max_pixels for the
    # built-in model): a larger crop would only be shrunk again, a smaller one wastes the zoom.
    max_pixels: int = 224 * 224
    min_pixels: int = 32 * 32
    factor: int = 32                 # patch_size (16) x spatial merge (2)
    min_box_px: int = 32             # the crop is grown (about its centre) to at least this, in source px
    upscale: bool = True             # enlarge small crops to fill max_pixels (the point of zooming)
    resample: int = Image.Resampling.BICUBIC


def smart_resize(height: float, width: float, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest (h, w), multiples of `factor`, with min_pixels <= h*w <= max_pixels, aspect kept.

    Same rule as transformers' Qwen2-VL `smart_resize` (kept here because that module needs
    torchvision, which the CPU build lacks); without its aspect-ratio error, as callers bound it."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fit_to_grid(image: Image.Image, cfg: ZoomConfig, upscale: bool | None = None) -> Image.Image:
    """Resize to the processor's grid (multiples of cfg.factor) within cfg's pixel budget."""
    w, h = image.size
    if upscale if upscale is not None else cfg.upscale:
        s = math.sqrt(cfg.max_pixels / (w * h))  # fill the budget; smart_resize floors into it
        h, w = h * s, w * s
    new_h, new_w = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (new_w, new_h) == image.size:
        return image
    return image.resize((new_w, new_h), cfg.resample)


def bbox_to_pixels(bbox: list[float], width: int, height: int, min_box_px: int) -> tuple[int, int, int, int]:
    """0-1000 relative box -> integer pixel box, grown about its centre to min_box_px, kept inside."""
    x1, y1, x2, y2 = (v / COORD_SCALE for v in bbox)
    boxes = []
    for lo, hi, size in ((x1 * width, x2 * width, width), (y1 * height, y2 * height, height)):
        need = min(min_box_px, size)
        if hi - lo < need:
            c = (lo + hi) / 2
            lo, hi = c - need / 2, c + need / 2
        # Shift (not shrink) a grown box back inside the image.
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > size:
            lo, hi = lo - (hi - size), size
        lo_i, hi_i = max(0, math.floor(lo)), min(size, math.ceil(hi))
        boxes.append((lo_i, max(hi_i, lo_i + 1)))
    (left, right), (top, bottom) = boxes
    return left, top, right, bottom


class ImageZoomTool:
    name = "image_zoom_in"

    def __init__(self, cfg: ZoomConfig | None = None):
        self.cfg = cfg or ZoomConfig()

    def schema(self) -> dict:
        return function_schema(
            self.name,
            "Zoom in on a region of an image: returns the region as a new, larger image. Use it when a "
            "detail is too small to read.",
            {
                "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                            "description": "[x1, y1, x2, y2], coordinates relative to the image on a "
                                           "0-1000 scale (0,0 = top left; 1000,1000 = bottom right)."},
                "label": {"type": "string", "description": "What the region contains."},
                "img_idx": {"type": "integer", "default": 0,
                            "description": "Index of the image to zoom in on (0 = the first image)."},
            },
            ["bbox_2d"],
        )

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        bbox = arguments["bbox_2d"]
        idx = arguments.get("img_idx", 0)
        label = arguments.get("label", "")
        if not ctx.images:
            return error_result("bad_image_index", "there is no image to zoom in on.")
        if not 0 <= idx < len(ctx.images):
            return error_result("bad_image_index", f"'img_idx' {idx} does not exist; valid image "
                                f"indices are 0..{len(ctx.images) - 1}.")
        if any(not 0 <= v <= COORD_SCALE for v in bbox):
            return error_result("out_of_range", f"'bbox_2d' {_fmt(bbox)} must have every coordinate "
                                f"in [0, {COORD_SCALE}].")
        x1, y1, x2, y2 = bbox
        if x2 <= x1 or y2 <= y1:
            return error_result("empty_box", f"'bbox_2d' {_fmt(bbox)} is empty: it needs x1 < x2 and y1 < y2.")
        image = ctx.images[idx]
        crop = image.crop(bbox_to_pixels(bbox, image.width, image.height, self.cfg.min_box_px))
        if crop.mode != "RGB":
            crop = crop.convert("RGB")
        crop = fit_to_grid(crop, self.cfg)
        what = f' "{label[:60]}"' if label else ""
        return ToolResult(text=f"Zoomed in on{what} {_fmt(bbox)} of image {idx}; the crop is image "
                               f"{len(ctx.images)}.", images=[crop])


def _fmt(bbox: list[float]) -> str:
    """The box for a message; never raises (an integer beyond float range reads "too large")."""
    def one(v) -> str:
        try:
            return f"{v:g}"
        except (OverflowError, TypeError, ValueError):
            return "too large" if isinstance(v, int) else "?"
    return "[" + ", ".join(one(v) for v in bbox) + "]"
