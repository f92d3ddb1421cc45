"""Shared-prefix training (`axpo.policy.shared_prefix`, `axpo.update.shared_layout`) with images
and SFT demonstrations, single-process and activation-checkpointed; the FSDP case (two ranks, one
with images and one without, gloo) is `tests/scripts/shared_prefix_fsdp.py`."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from axpo.agent.format import AgentFormat
from axpo.agent.trajectory import ImageSpan, Trajectory
from axpo.distributed import Dist, shard
from axpo.models import build_tiny_model
from axpo.policy import PolicyModel, pack, shared_prefix
from axpo.rows import TrainingRow
from axpo.sft import encode_demo
from axpo.update import _rows, kept_positions, shared_layout

ROOT = Path(__file__).resolve().parents[1]
TOOLS = [{"type": "function", "function": {"name": "zoom", "description": "Zoom in on part of the image.",
                                           "parameters": {"type": "object", "properties": {
                                               "box": {"type": "array", "items": {"type": "number"}}}}}}]


def _image(seed: int, h: int = 28, w: int = 42) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def image_groups(fmt: AgentFormat, n_groups: int = 2, per_group: int = 3, seed: int = 0) -> list[Trajectory]:
    """RL-shaped groups: a system turn with tools, an image question, then completions of mixed
    length; some hold a tool response with a second image (a zoom), as perception rollouts do."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for q in range(n_groups):
        # Images of several merged tokens, so M-RoPE positions after them differ from token indices.
        ch = fmt.prompt(f"what colour is cell {q}?", [_image(seed * 10 + q, 56 + 28 * q, 84)], TOOLS)
        P = len(ch.ids)
        for k in range(per_group):
            toks, mask = list(ch.ids), [0] * P
            pv, grids = list(ch.pixel_values), list(ch.grids)
            spans = [ImageSpan(ch.pad_spans[0][0], ch.pad_spans[0][1], tuple(ch.grids[0]), False)]
            n = int(torch.randint(2, 12, (1,), generator=g))
            toks += torch.randint(10, 500, (n,), generator=g).tolist()
            mask += [1] * n
            if k % 2 == 1:   # a tool response with an image, then more completion
                tr = fmt.tool_response("zoomed", [_image(100 + q * 7 + k, 56, 56)])
                s0 = len(toks)
                spans.append(ImageSpan(s0 + tr.pad_spans[0][0], s0 + tr.pad_spans[0][1], tuple(tr.grids[0]), True))
                toks += tr.ids
                mask += [0] * len(tr.ids)
                pv += tr.pixel_values
                grids += tr.grids
                m = int(torch.randint(2, 9, (1,), generator=g))
                toks += torch.randint(10, 500, (m,), generator=g).tolist()
                mask += [1] * m
            out.append(Trajectory(uid=f"t{q}_{k}", sample_uid=f"q{q}", group=q, prompt_len=P, tokens=toks,
                                  loss_mask=mask, logprobs=[0.0] * len(toks), entropies=[0.0] * len(toks),
                                  image_spans=spans, pixel_values=pv))
    return out


def _forwards(policy, rows, masks, fmt, sp_kwargs=None):
    idx = list(range(len(rows)))
    batch = pack(rows, fmt.pad, fmt.image_pad, idx)
    L = batch.input_ids.shape[1]
    keep = kept_positions(masks, idx, L, "cpu")
    sp = shared_prefix(rows, keep, L, fmt.pad, stop_ids=fmt.vision_ids, **(sp_kwargs or {}))
    m = torch.zeros(len(rows), L - 1).reshape(-1)
    m[keep] = 1.0
    m = m.reshape(len(rows), L - 1)
    out = []
    for s in (None, sp):
        policy.zero_grad()
        lp, ent = policy(batch, return_entropy=True, keep=keep, shared=s)
        ((lp * m).sum() - 0.3 * (ent * m).sum()).backward()
        out.append((lp, ent, [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
    return batch, sp, out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_with_images_equals_the_one_stage_forward(tiny_processor, checkpointing):
    """Groups whose prompts hold an image, completions with a zoomed image: the shared prefix ends
    before the first vision token (so every image is in a suffix), and the kept log-probs,
    entropies and every gradient (vision tower included) equal the one-stage forward's; also with
    activation-checkpointed layers, which re-run their forward (and the cache) in backward."""
    fmt = AgentFormat(tiny_processor)
    policy = PolicyModel(build_tiny_model(seed=12, processor=tiny_processor))
    if checkpointing:
        policy = shard(policy, Dist(), activation_checkpointing=True)
    trajs = image_groups(fmt)
    rows = _rows(trajs)
    masks = [torch.tensor(t.loss_mask, dtype=torch.float32) for t in trajs]
    batch, sp, ((lp0, e0, g0), (lp1, e1, g1)) = _forwards(policy, rows, masks, fmt)
    assert batch.pixel_values is not None and sp is not None and sp.prefix_ids.shape[0] == 2
    assert not set(sp.prefix_ids.flatten().tolist()) & fmt.vision_ids            # no image in a prefix
    first_vision = min(i for i, t in enumerate(trajs[0].tokens) if t in fmt.vision_ids)
    assert sp.prefix_ids.shape[1] == first_vision > 30                         # the system turn and tools
    assert sp.tokens < batch.input_ids.numel()
    pos, _ = policy.backbone.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                            image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask)
    assert not torch.equal(pos[:, 0, :len(trajs[0].tokens)], torch.arange(len(trajs[0].tokens)).expand(3, -1))
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    names = [n for n, p in policy.named_parameters() if p.grad is not None]
    assert len(g0) == len(g1) > 0 and any("visual" in n for n in names)
    for n, a, b in zip(names, g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-9, msg=n)


def _demo(question: str, answer: str, tools, image=None):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    return ([{"role": "user", "content": content},
             {"role": "assistant", "content": answer, "reasoning_content": "I look."}],
            [image] if image is not None else [])


def test_sft_demonstrations_share_their_system_turn(tiny_processor):
    """An encoded demonstration names its system turn (the tool block); demonstrations with the
    same tools form one group, the prefix stops before an image, and the supervised forward
    through the shared layout equals the plain one."""
    fmt = AgentFormat(tiny_processor)
    other = [{"type": "function", "function": {"name": "calc", "description": "Compute.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    demos = [(*_demo(f"cell {i}?", f"\\boxed{{{i}}}", TOOLS, _image(i)), TOOLS) for i in range(3)]
    demos += [(*_demo(f"{i} times 7?", f"\\boxed{{{7 * i}}}", other), other) for i in range(3)]
    enc = [encode_demo(m, im, fmt, t) for m, im, t in demos]
    rows = [TrainingRow.of_demo(e) for e in enc]
    for e, r in zip(enc, rows):
        assert r.prompt_len == e.system_len and e.tokens[e.system_len - 1] == fmt.im_end
        assert fmt.processor.tokenizer.decode(e.tokens[:e.system_len]).startswith("<|im_start|>system")
    no_tools = encode_demo(*_demo("hi", "hello", None), fmt, None)
    assert no_tools.system_len is None and TrainingRow.of_demo(no_tools).prompt_len is None
    policy = PolicyModel(build_tiny_model(seed=13, processor=tiny_processor))
    masks = [torch.tensor(e.loss_mask, dtype=torch.float32) for e in enc]
    batch, sp, ((lp0, e0, g0), (lp1, e1, g1)) = _forwards(policy, rows, masks, fmt)
    assert sp is not None and sp.prefix_ids.shape[0] == 2
    assert not set(sp.prefix_ids.flatten().tolist()) & fmt.vision_ids
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-9)
    # A row without a system turn in the micro-batch: no sharing (it belongs to no group).
    L = batch.input_ids.shape[1]
    keep = kept_positions(masks, list(range(len(rows))), L, "cpu")
    assert shared_layout(rows[:-1] + [TrainingRow.of_demo(no_tools)], list(range(len(rows))), keep, L, fmt,
                         Dist(), "cpu") is None
    assert shared_layout(rows, list(range(len(rows))), None, L, fmt, Dist(), "cpu") is None


def test_fsdp_update_with_shared_prefixes_equals_the_plain_update(tmp_path):
    """torchrun, 2 ranks (gloo), FSDP2: rank 0's groups hold images, rank 1's are text-only (its
    suffix stage runs the vision tower on a dummy image). An RL update and an SFT-shaped
    supervised step with shared prefixes leave the same weights as with sharing off, and a step
    in which one rank cannot share makes both ranks take the one-stage path (no hang)."""
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "scripts" / "shared_prefix_fsdp.py"), str(out)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["shared_calls"] == [[True, True], [True, True]]      # per rank: update, supervised step
    assert res["mixed_calls"] == [[False], [False]]                   # one rank cannot share: neither does
    assert res["max_diff_update"] < 1e-5 and res["max_diff_supervised"] < 1e-5
    assert res["changed_update"] and res["changed_supervised"]
