"""High-resolution perception (the V* / HRBench situation), generated procedurally.

A large image holds an N x N grid. Each cell has a coloured square ("frame", several view pixels
wide, visible at any resolution) with a tiny square of another colour at its centre. The question
names a cell in words and asks for the centre square's colour. The model's processor shrinks the
image to ~224x224 (`view_max_pixels`), where the centre square is about one pixel and blends into
its frame: unreadable. `image_zoom_in` on an ~8-view-pixel box around the cell centre returns it
at ~28 pixels, a solid patch a tiny model can read. A box the size of the whole cell magnifies only
N-fold and is not enough, so the box has to be right.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from axpo.tasks.base import ANSWER_INSTRUCTION, Sample, TaskSpec, format_choices
from axpo.tools.base import ToolResult
from axpo.tools.image_zoom import smart_resize

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "cyan": (40, 195, 205),
}
BACKGROUND = (255, 255, 255)
GRID_LINE = (190, 190, 190)


@dataclass
class PerceptionConfig:
    image_size_min: int = 1120         # width and height drawn independently from [min, max]
    image_size_max: int = 1344
    grid: int = 4                      # N x N cells
    view_max_pixels: int = 224 * 224   # what the model's processor shows (TinyModelConfig.max_pixels)
    centre_view_px: float = 1.0        # side of the decisive centre square, in view pixels
    frame_view_px: float = 4.0         # side of the coloured frame square, in view pixels
    box_view_px: float = 8.0           # side of the oracle zoom box, in view pixels
    jitter: float = 0.0                # max target offset from the cell centre, fraction of a cell
    # With no jitter the oracle box depends only on the cell: centred on it, `box_view_px` of the
    # nominal view wide. Then a cell has one right call (16 on a 4x4 grid) instead of one per image
    # size, which a tiny model can learn; the box still covers 8 +- 1 view pixels at every size.
    canonical_box: bool = True
    num_choices: int = 4               # 0 = free-form colour answer
    colours: list[str] = field(default_factory=lambda: list(PALETTE))
    tools: list[str] = field(default_factory=lambda: ["image_zoom_in"])


def view_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) the processor resizes an image to (multiples of 32 within the pixel budget)."""
    h, w = smart_resize(height, width, 32, 32 * 32, max_pixels)
    return w, h


def _render(rng: random.Random, cfg: PerceptionConfig, width: int, height: int):
    n = cfg.grid
    vw, vh = view_size(width, height, cfg.view_max_pixels)
    scale = math.sqrt(width * height / (vw * vh))  # source pixels per view pixel
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    line = max(2, round(scale / 2))
    for i in range(1, n):
        draw.rectangle([round(i * width / n) - line // 2, 0, round(i * width / n) + line // 2, height], fill=GRID_LINE)
        draw.rectangle([0, round(i * height / n) - line // 2, width, round(i * height / n) + line // 2], fill=GRID_LINE)
    cells = {}
    frame = cfg.frame_view_px * scale
    centre = cfg.centre_view_px * scale
    for r in range(n):
        for c in range(n):
            cx = (c + 0.5) * width / n + rng.uniform(-cfg.jitter, cfg.jitter) * width / n
            cy = (r + 0.5) * height / n + rng.uniform(-cfg.jitter, cfg.jitter) * height / n
            inner, outer = rng.sample(cfg.colours, 2)
            draw.rectangle([cx - frame / 2, cy - frame / 2, cx + frame / 2 - 1, cy + frame / 2 - 1], fill=PALETTE[outer])
            draw.rectangle([cx - centre / 2, cy - centre / 2, cx + centre / 2 - 1, cy + centre / 2 - 1], fill=PALETTE[inner])
            cells[(r, c)] = (cx, cy, inner, outer)
    return img, cells, scale


def _box(cx: float, cy: float, side_px: float, width: int, height: int) -> list[int]:
    """Box of `side_px` source pixels around (cx, cy), on the 0-1000 scale, kept inside."""
    hw, hh = side_px / 2 / width * 1000, side_px / 2 / height * 1000
    x, y = cx / width * 1000, cy / height * 1000
    return [max(0, round(x - hw)), max(0, round(y - hh)), min(1000, round(x + hw)), min(1000, round(y + hh))]


def generate(n: int, seed: int, cfg: PerceptionConfig | None = None, start: int = 0) -> list[Sample]:
    cfg = cfg or PerceptionConfig()
    if cfg.num_choices and cfg.num_choices > len(cfg.colours):
        raise ValueError(f"num_choices={cfg.num_choices} exceeds the {len(cfg.colours)} colours")
    samples = []
    for i in range(start, start + n):  # sample i depends only on (seed, i)
        rng = random.Random(f"perception-{seed}-{i}")
        width = rng.randint(cfg.image_size_min, cfg.image_size_max)
        height = rng.randint(cfg.image_size_min, cfg.image_size_max)
        img, cells, scale = _render(rng, cfg, width, height)
        r, c = rng.randrange(cfg.grid), rng.randrange(cfg.grid)
        cx, cy, inner, outer = cells[(r, c)]
        where = f"row {r + 1}, column {c + 1}"
        question = (f"The image is a {cfg.grid}x{cfg.grid} grid; each cell has a coloured square with a "
                    f"tiny square at its centre. What colour is the tiny centre square in {where} "
                    f"(rows from the top, columns from the left)?")
        choices = None
        if cfg.num_choices:
            # The frame colour is always a distractor: it is what a blurred view suggests.
            others = [k for k in cfg.colours if k not in (inner, outer)]
            choices = [inner, outer] + rng.sample(others, cfg.num_choices - 2)
            rng.shuffle(choices)
            question += f" Options: {format_choices(choices)}."
        question += " " + ANSWER_INSTRUCTION
        box = _box(cx, cy, cfg.box_view_px * scale, width, height)
        if cfg.canonical_box and cfg.jitter == 0:
            half = round(cfg.box_view_px / math.sqrt(cfg.view_max_pixels) * 1000 / 2)
            x, y = round((c + 0.5) * 1000 / cfg.grid), round((r + 0.5) * 1000 / cfg.grid)
            box = [x - half, y - half, x + half, y + half]
        samples.append(Sample(
            uid=f"perception-{seed}-{i}", task="perception", question=question, images=[img],
            answer=inner, answer_type="choice" if choices else "exact", choices=choices,
            tools=list(cfg.tools),
            oracle_call={"name": "image_zoom_in", "arguments": {"bbox_2d": box, "label": where, "img_idx": 0}},
            meta={"row": r, "col": c, "grid": cfg.grid, "frame_colour": outer, "centre_xy": (cx, cy),
                  "view_scale": scale, "view_max_pixels": cfg.view_max_pixels,
                  "cell_box": [round(c * 1000 / cfg.grid), round(r * 1000 / cfg.grid),
                               round((c + 1) * 1000 / cfg.grid), round((r + 1) * 1000 / cfg.grid)]},
        ))
    return samples


# --------------------------------------------------------------------------------------------
# Programmatic reader (scripted policies, demonstrations, benchmark)

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[k] for k in _NAMES], dtype=np.float32)


def read_colours(image: Image.Image, max_dist: float = 60.0, min_share: float = 0.004) -> tuple[str | None, str | None]:
    """(centre colour, frame colour) of the target in `image`, or None where unreadable.

    Pixels are assigned to a palette colour only when close to it (blended edge pixels are
    ignored). The frame is the most common colour; the centre is the next colour with at least
    `min_share` of the pixels (about a 14x14 patch at 224x224), nearest the frame's centroid."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - _RGB[None, None], axis=-1)
    nearest = dist.argmin(-1)
    ok = dist.min(-1) < max_dist
    counts = np.bincount(nearest[ok], minlength=len(_NAMES))
    if counts.max() == 0:
        return None, None
    frame = int(counts.argmax())
    ys, xs = np.nonzero(ok & (nearest == frame))
    fy, fx = ys.mean(), xs.mean()
    best, best_d = None, math.inf
    for k in range(len(_NAMES)):
        if k == frame or counts[k] < min_share * nearest.size:
            continue
        ys, xs = np.nonzero(ok & (nearest == k))
        d = math.hypot(ys.mean() - fy, xs.mean() - fx)
        if d < best_d:
            best, best_d = k, d
    return (_NAMES[best] if best is not None else None), _NAMES[frame]


def _guess(sample: Sample, rng: random.Random, exclude: str | None) -> str:
    pool = sample.choices or [k for k in PALETTE]
    pool = [p for p in pool if p != exclude] or pool
    return rng.choice(pool)


def read_tool_output(sample: Sample, result: ToolResult) -> str | None:
    if result.error or not result.images:
        return None
    centre, _ = read_colours(result.images[-1])
    if centre is not None and sample.choices and centre not in sample.choices:
        return None
    return centre


def model_view(sample: Sample) -> Image.Image:
    """The question image as the model's processor shows it."""
    img = sample.images[0]
    return img.resize(view_size(img.width, img.height, sample.meta["view_max_pixels"]), Image.Resampling.BICUBIC)


def answer_without_tool(sample: Sample, rng: random.Random) -> str:
    """Best effort from the model's view alone: cut the target's neighbourhood out of the
    downsized image, enlarge it (no new information), read it like a zoom; else guess among the
    options, excluding the frame colour, which is visible and never the answer."""
    view = model_view(sample)
    x1, y1, x2, y2 = sample.oracle_call["arguments"]["bbox_2d"]
    crop = view.crop((x1 * view.width / 1000, y1 * view.height / 1000, x2 * view.width / 1000, y2 * view.height / 1000))
    crop = crop.resize((224, 224), Image.Resampling.BICUBIC)
    centre, frame = read_colours(crop)
    if centre is not None and (not sample.choices or centre in sample.choices):
        return centre
    return _guess(sample, rng, frame)


def wrong_call(sample: Sample, rng: random.Random) -> dict:
    """Mistakes a small policy makes: a neighbouring cell, rows and columns swapped, or a box
    as large as the whole cell (too little magnification)."""
    g, r, c = sample.meta["grid"], sample.meta["row"], sample.meta["col"]
    args = dict(sample.oracle_call["arguments"])
    kind = rng.choice(["neighbour", "swap", "whole_cell"])
    if kind == "swap" and r == c:
        kind = "neighbour"
    if kind == "whole_cell":
        args["bbox_2d"] = list(sample.meta["cell_box"])
        return {"name": "image_zoom_in", "arguments": args}
    if kind == "swap":
        r2, c2 = c, r
    else:
        r2, c2 = r, c
        while (r2, c2) == (r, c):
            r2 = min(g - 1, max(0, r + rng.choice([-1, 0, 1])))
            c2 = min(g - 1, max(0, c + rng.choice([-1, 0, 1])))
    dx, dy = (c2 - c) * 1000 / g, (r2 - r) * 1000 / g
    x1, y1, x2, y2 = args["bbox_2d"]
    args["bbox_2d"] = [round(x1 + dx), round(y1 + dy), round(x2 + dx), round(y2 + dy)]
    return {"name": "image_zoom_in", "arguments": args}


def random_call(sample: Sample, rng: random.Random) -> dict:
    side = rng.uniform(20, 400)
    x1, y1 = rng.uniform(0, 1000 - side), rng.uniform(0, 1000 - side)
    box = [round(x1), round(y1), round(x1 + side), round(y1 + side)]
    return {"name": "image_zoom_in", "arguments": {"bbox_2d": box, "label": "region", "img_idx": 0}}


def plan_text(sample: Sample) -> str:
    r, c = sample.meta["row"] + 1, sample.meta["col"] + 1
    return f"The centre square in row {r}, column {c} is too small to see. I will zoom in on it."


def direct_text(sample: Sample) -> str:
    return "The centre square is too small to see clearly. I will guess."


def after_text(sample: Sample, reading: str | None) -> str:
    if reading is None:
        return "The zoomed image does not show the centre square clearly. I will guess."
    return f"In the zoomed image the centre square is {reading}."


SPEC = TaskSpec("perception", PerceptionConfig, generate, read_tool_output, answer_without_tool,
                wrong_call, random_call, plan_text, direct_text, after_text)
