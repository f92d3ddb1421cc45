"""axpo/rows.py: the typed training row that pre-training, SFT and RL hand to `policy.pack` (#13:
batch rows were untyped dicts). It checks its image bookkeeping when built and still reads like
the old dict, so pack and the update code take either."""

import pytest
import torch

from axpo.agent.format import AgentFormat
from axpo.policy import pack
from axpo.rows import TrainingRow
from axpo.sft import encode_demo


def test_rows_pack_exactly_like_the_old_dicts(tiny_processor):
    import numpy as np
    from PIL import Image

    fmt = AgentFormat(tiny_processor)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    demo = encode_demo([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                        {"role": "assistant", "content": "Red."}], [img], fmt, None)
    rows = [TrainingRow.of_demo(demo), TrainingRow([5, 6, 7])]
    dicts = [{"tokens": demo.tokens, "pixel_values": demo.pixel_values, "grids": demo.grids},
             {"tokens": [5, 6, 7], "pixel_values": [], "grids": []}]
    a = pack(rows, fmt.pad, fmt.image_pad, [0, 1])
    b = pack(dicts, fmt.pad, fmt.image_pad, [0, 1])
    for f in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert len(rows[0]) == len(demo.tokens) and rows[1]["tokens"] == [5, 6, 7]
    with pytest.raises(KeyError):
        rows[1]["images"]


def test_image_bookkeeping_is_checked_when_built():
    with pytest.raises(ValueError, match="1 pixel tensors for 0 image grids"):
        TrainingRow([1, 2], [torch.zeros(4, 8)], [])
    with pytest.raises(ValueError, match=r"image 0 has 3 patches, its grid \(1, 2, 2\) needs 4"):
        TrainingRow([1, 2], [torch.zeros(3, 8)], [(1, 2, 2)])
