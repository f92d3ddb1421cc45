import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from axpo.tools import ImageZoomTool, ToolContext, ZoomConfig, build_tools, smart_resize
from axpo.tools.image_zoom import bbox_to_pixels


def _image(w=1000, h=800):
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).rectangle([500, 400, 509, 407], fill=(255, 0, 0))  # a 10x8 red dot
    return img


def _call(reg, args, images):
    return reg.execute(json.dumps({"name": "image_zoom_in", "arguments": args}), ToolContext(images=images))


def test_crop_is_enlarged_to_the_grid_and_shows_the_detail():
    reg = build_tools(["image_zoom_in"])
    call, r = _call(reg, {"bbox_2d": [490, 490, 520, 520], "label": "dot"}, [_image()])
    assert r.error is None and call.arguments["img_idx"] == 0
    (crop,) = r.images
    w, h = crop.size
    assert w % 32 == 0 and h % 32 == 0 and w * h <= 224 * 224
    assert w * h >= 0.7 * 224 * 224  # filled the budget: a real magnification
    px = np.asarray(crop)
    red = int(((px[..., 0] > 200) & (px[..., 1] < 80)).sum())
    assert red > 0.05 * w * h  # 80 px in the source, thousands in the crop
    assert "image 1" in r.text  # the new image's index in the trajectory


def test_tiny_box_is_grown_to_min_size_and_kept_inside():
    left, top, right, bottom = bbox_to_pixels([999, 999, 1000, 1000], 1000, 800, 32)
    assert right == 1000 and bottom == 800 and right - left >= 32 and bottom - top >= 32
    left, top, right, bottom = bbox_to_pixels([0, 0, 1, 1], 1000, 800, 32)
    assert (left, top) == (0, 0) and right - left >= 32


def test_smart_resize_matches_qwen_rule():
    assert smart_resize(224, 224, 32, 1024, 224 * 224) == (224, 224)
    h, w = smart_resize(1000, 3000, 32, 1024, 224 * 224)
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 224 * 224 and w > 2.5 * h


def test_img_idx_selects_later_images():
    reg = build_tools(["image_zoom_in"])
    blue = Image.new("RGB", (300, 300), (0, 0, 255))
    _, r = _call(reg, {"bbox_2d": [0, 0, 500, 500], "img_idx": 1}, [_image(), blue])
    assert r.error is None and r.images[0].getpixel((10, 10)) == (0, 0, 255)


@pytest.mark.parametrize("args, kind, mentions", [
    ({"bbox_2d": [1, 2, 3]}, "bad_arguments", "bbox_2d"),
    ({"bbox_2d": [1, 2, 3, 4, 5]}, "bad_arguments", "bbox_2d"),
    ({"bbox_2d": ["a", 2, 3, 4]}, "bad_arguments", "bbox_2d[0]"),
    ({"bbox_2d": "0 0 10 10"}, "bad_arguments", "bbox_2d"),
    ({"bbox_2d": [True, 0, 10, 10]}, "bad_arguments", "bbox_2d[0]"),
    ({"label": "x"}, "bad_arguments", "bbox_2d"),
    ({"bbox_2d": [500, 100, 400, 200]}, "empty_box", "bbox_2d"),
    ({"bbox_2d": [100, 100, 200, 100]}, "empty_box", "bbox_2d"),
    ({"bbox_2d": [-5, 0, 100, 100]}, "out_of_range", "bbox_2d"),
    ({"bbox_2d": [0, 0, 1001, 100]}, "out_of_range", "bbox_2d"),
    ({"bbox_2d": [0, 0, 10, 10], "img_idx": 3}, "bad_image_index", "img_idx"),
    ({"bbox_2d": [0, 0, 10, 10], "img_idx": -1}, "bad_image_index", "img_idx"),
    ({"bbox_2d": [0, 0, 10, 10], "img_idx": "0"}, "bad_arguments", "img_idx"),
    ({"bbox_2d": [0, 0, 10, 10], "zoom": 2}, "bad_arguments", "zoom"),
])
def test_malformed_zoom_calls(args, kind, mentions):
    reg = build_tools(["image_zoom_in"])
    call, r = _call(reg, args, [_image()])
    assert r.error == kind and r.images == []
    assert mentions in r.text
    assert reg.error_counts[kind] == 1


def test_no_images_at_all():
    r = ImageZoomTool()({"bbox_2d": [0, 0, 10, 10], "img_idx": 0}, ToolContext(images=[]))
    assert r.error == "bad_image_index"


def test_non_rgb_images_and_config_budget():
    tool = ImageZoomTool(ZoomConfig(max_pixels=64 * 64))
    img = Image.new("L", (500, 500), 128)
    r = tool({"bbox_2d": [0, 0, 1000, 1000], "img_idx": 0}, ToolContext(images=[img]))
    assert r.images[0].mode == "RGB" and r.images[0].size == (64, 64)


def test_huge_coordinates_are_errors_not_crashes():
    """An integer beyond float range (`1` and 400 zeros) passed the range check's comparison and
    then crashed the error message (OverflowError in float formatting)."""
    huge = 10**400
    r = ImageZoomTool()({"bbox_2d": [huge, 0, 5, 5], "img_idx": 0}, ToolContext(images=[_image()]))
    assert r.error == "out_of_range" and "too large" in r.text
    reg = build_tools(["image_zoom_in"])
    call, r = reg.execute('{"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 5, 1%s]}}' % ("0" * 400),
                          ToolContext(images=[_image()]))
    assert r.error == "bad_arguments" and "'bbox_2d[3]' is too large" in r.text
