"""Parts of the vLLM backend that need no vLLM, run in the main environment: the clear error when
vLLM is missing, the exact rebuild of 8-bit images from the trainer's pixel values (what the
backend hands vLLM), and `fill_entropies` (the policy's pass that supplies the entropies vLLM does
not return) against the built-in engine's own entropies and log-probs."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from axpo.rollout import vllm_engine
from axpo.rollout.vllm_engine import _image_processor_params, _images_from_pixel_values, fill_entropies


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_names_what_to_install(tmp_path):
    with pytest.raises(ImportError) as e:
        vllm_engine.VLLMEngine(str(tmp_path))
    msg = str(e.value)
    assert "pip install -e .[vllm]" in msg and ".ci/vllm_env.sh" in msg and "not importable" in msg


def _image(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(150, 100), (320, 320), (64, 200)])
def test_images_rebuilt_from_pixel_values_reproduce_them_exactly(tiny_processor, size):
    ip = tiny_processor.image_processor
    out = ip(images=[_image(0, *size), _image(1, 90, 90)], return_tensors="pt")
    grids = [tuple(g) for g in out["image_grid_thw"].tolist()]
    imgs = _images_from_pixel_values(out["pixel_values"], grids, _image_processor_params(tiny_processor, ""), "t")
    for img, (t, h, w) in zip(imgs, grids):
        assert img.size == (w * ip.patch_size, h * ip.patch_size)     # the resized size: resizing again is a no-op
    again = ip(images=imgs, return_tensors="pt")
    assert again["image_grid_thw"].tolist() == out["image_grid_thw"].tolist()
    assert torch.equal(again["pixel_values"], out["pixel_values"])


def test_pixel_values_not_from_8bit_images_are_refused(tiny_processor):
    out = tiny_processor.image_processor(images=[_image(0, 64, 64)], return_tensors="pt")
    grids = [tuple(g) for g in out["image_grid_thw"].tolist()]
    with pytest.raises(ValueError, match="8-bit"):
        _images_from_pixel_values(out["pixel_values"] + 1e-3, grids,
                                  _image_processor_params(tiny_processor, ""), "extend")


def test_fill_entropies_matches_the_builtin_engine(tiny_model, tiny_processor):
    """The built-in engine records entropies and log-probs while sampling; the policy's no-grad pass
    over the finished trajectories (what a vLLM rollout gets instead) gives the same numbers."""
    from axpo.agent.format import AgentFormat
    from axpo.agent.loop import AgentLoop
    from axpo.config import RolloutConfig
    from axpo.policy import PolicyModel
    from axpo.rollout.engine import Engine
    from axpo.tasks import generate_task
    from axpo.tools import build_tools

    fmt = AgentFormat(tiny_processor)
    cfg = RolloutConfig(group_size=2, max_turn_tokens=8, max_turns=2, max_total_tokens=2048)
    loop = AgentLoop(Engine(copy.deepcopy(tiny_model)), fmt, build_tools(["image_zoom_in"]), cfg, seed=3)
    samples = generate_task("perception", 1, 5, {"image_size_min": 64, "image_size_max": 64})
    trajs = loop.rollout(samples, 2, step=0)
    want = [(list(t.entropies), list(t.logprobs)) for t in trajs]
    logps = fill_entropies(PolicyModel(copy.deepcopy(tiny_model)).eval(), trajs, pad_id=fmt.pad,
                           image_token_id=fmt.image_pad)
    for t, (ent, lp), got in zip(trajs, want, logps):
        idx = [i for i in range(t.prompt_len, len(t.tokens)) if t.loss_mask[i]]
        assert idx
        assert max(abs(t.entropies[i] - ent[i]) for i in idx) < 1e-4
        assert max(abs(got[i] - lp[i]) for i in idx) < 1e-4
