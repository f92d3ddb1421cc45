"""3-D M-RoPE positions (Qwen3-VL) for chunks that continue a sequence.

Qwen3-VL gives every token a (t, h, w) position. Text tokens have t = h = w; an image's pad tokens
get a grid starting at the running position, and the text after it continues from
`start + max(h, w) // merge` (not from the token index). A sequence's positions are therefore fully
described by its image spans; this module computes the positions of any token range from them,
which is `Qwen3VLModel.get_rope_index` on the whole sequence restricted to that range
(tests/test_engine.py checks the two agree across tool images). transformers keeps a
`rope_deltas` on the model between calls; we never use it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImagePositions:
    """Image pad tokens [start, end) of a sequence, their (t, h, w) patch grid and the position
    of the grid's first token: where an image sits in M-RoPE position space (the engine's view).
    Not `axpo.agent.trajectory.ImageSpan`, the trajectory's record of which tokens are an image
    and whether a tool returned it."""

    start: int
    end: int
    grid_thw: tuple[int, int, int]
    pos_start: int
    merge: int

    @property
    def next_pos(self) -> int:
        """Position of the first text token after the image (Qwen3-VL's get_rope_index)."""
        _, h, w = self.grid_thw
        return self.pos_start + max(h, w) // self.merge

    def positions(self) -> torch.Tensor:
        """[3, end - start] grid positions, as `Qwen3VLModel.get_vision_position_ids`."""
        t, h, w = self.grid_thw
        tt = torch.arange(t)
        hh = torch.arange(h // self.merge) + self.pos_start
        ww = torch.arange(w // self.merge) + self.pos_start
        grid = torch.stack(torch.meshgrid(tt, hh, ww, indexing="ij")).reshape(3, -1)
        grid[0] += self.pos_start
        return grid


def next_position(spans: tuple[ImagePositions, ...], index: int) -> int:
    """Position of a text token at `index` (equivalently, the next position after `index` tokens)."""
    for s in reversed(spans):
        if s.end <= index:
            return s.next_pos + (index - s.end)
    return index


def text_position_delta(spans: tuple[ImagePositions, ...]) -> int:
    """Position minus token index for text after the last image (transformers' rope delta)."""
    return spans[-1].next_pos - spans[-1].end if spans else 0


def span_containing(spans: tuple[ImagePositions, ...], index: int) -> ImagePositions | None:
    """The image span strictly containing the cut `index` (a cut inside an image), if any."""
    for s in spans:
        if s.start < index < s.end:
            return s
    return None


def spans_before(spans: tuple[ImagePositions, ...], index: int) -> tuple[ImagePositions, ...]:
    return tuple(s for s in spans if s.end <= index)


def add_chunk_spans(spans: tuple[ImagePositions, ...], start: int, token_ids: list[int], image_token_id: int | None,
                    grids: list[tuple[int, int, int]], merge: int) -> tuple[ImagePositions, ...]:
    """The spans of a sequence after appending `token_ids` at token index `start`. Each maximal run
    of image tokens is one image and takes the next grid, as in get_rope_index."""
    runs = []
    if image_token_id is not None:
        pos = 0
        for is_img, group in itertools.groupby(token_ids, lambda t: t == image_token_id):
            n = len(list(group))
            if is_img:
                runs.append((pos, pos + n))
            pos += n
    if len(runs) != len(grids):
        raise ValueError(f"chunk has {len(runs)} image token runs but {len(grids)} image grids were given")
    out = list(spans)
    for (s, e), grid in zip(runs, grids):
        t, h, w = (int(x) for x in grid)
        want = t * h * w // (merge * merge)
        if e - s != want:
            raise ValueError(f"Image features and image tokens do not match: image at tokens [{start + s}, "
                             f"{start + e}) has {e - s} pad tokens, its grid {(t, h, w)} gives {want}")
        out.append(ImagePositions(start + s, start + e, (t, h, w), next_position(tuple(out), start + s), merge))
    return tuple(out)


def positions(spans: tuple[ImagePositions, ...], start: int, end: int) -> torch.Tensor:
    """[3, end - start] M-RoPE positions of tokens [start, end) of a sequence with these spans."""
    parts, i = [], start
    for s in spans:
        if s.end <= i:
            continue
        if s.start >= end:
            break
        if s.start > i:                                   # text before the image
            base = next_position(spans, i)
            parts.append((torch.arange(s.start - i) + base).expand(3, -1))
            i = s.start
        grid = s.positions()
        hi = min(end, s.end)
        parts.append(grid[:, i - s.start: hi - s.start])
        i = hi
    if i < end:
        base = next_position(spans, i)
        parts.append((torch.arange(end - i) + base).expand(3, -1))
    if not parts:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(parts, dim=1)
