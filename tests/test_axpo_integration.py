"""AXPO on real rollouts of the tiny Qwen3-VL with the real engine and tools.

Each rollout's response is prefilled with a wrong `image_zoom_in` call (the situation AXPO targets:
the policy acts, and the call fails), then the untrained policy continues on its own. The group is
therefore all-wrong among tool users, AXPO triggers, and its branches must: share the failed
rollout's tokens up to the cut, start with the forced `<tool_call>`, then diverge; cost no prefill of
the prefix (engine counters); and respect the extra-rollout budget.

With 12-token turns the untrained continuations hit the token limit, so every rollout is truncated.
Masked truncations are out of AXPO's trigger (rollout.mask_truncated, the default), so the mechanics
tests score them as ordinary failures (`mask_truncated=False`); one test checks the default.
"""

import copy
import json
import math
import random

import pytest

from axpo.agent.format import AgentFormat
from axpo.agent.loop import AgentLoop
from axpo.algo.groups import group_rollouts
from axpo.algo.resample import expand
from axpo.config import AlgoConfig, RolloutConfig
from axpo.rollout.engine import Engine
from axpo.tasks import TASKS, generate_task, verify
from axpo.tools import build_tools

G = 4


@pytest.fixture()
def setup(tiny_model, tiny_processor):
    fmt = AgentFormat(tiny_processor)
    engine = Engine(copy.deepcopy(tiny_model), block_size=16, max_kv_tokens=32768)
    cfg = RolloutConfig(group_size=G, max_turn_tokens=12, max_turns=2, max_total_tokens=1024)
    loop = AgentLoop(engine, fmt, build_tools(["image_zoom_in"]), cfg, seed=0)
    sample = generate_task("perception", 1, seed=3, options={"image_size_min": 448, "image_size_max": 448})[0]
    call = TASKS["perception"].wrong_call(sample, random.Random(0))
    text = "Let me zoom in.\n</think>\n\n<tool_call>\n" + json.dumps(call) + "\n</tool_call>"
    forced = fmt.tokenizer(text, add_special_tokens=False)["input_ids"]

    def reward(t):
        return float(verify(sample, t.final_text)) if t.finished else 0.0

    base = loop.rollout([sample], G, step=0, response_prefix={sample.uid: forced})
    for t in base:
        t.reward = reward(t)
    return loop, engine, fmt, sample, base, reward


def test_branches_share_prefix_then_diverge_without_prefill(setup):
    loop, engine, fmt, sample, base, reward = setup
    for t in base:
        t.check(fmt.image_pad, fmt.merge_size)
        assert t.used_tool and t.tool_calls[0].error is None      # a real, valid (but wrong) zoom
        assert t.image_spans[-1].from_tool                         # the crop came back as an image
    group = group_rollouts(base, mask_truncated=False)[0]
    assert group.triggered

    cfg = AlgoConfig(axpo=True, prefixes_per_group=2, branches_per_prefix=3, max_extra_fraction=1.0)
    before = dict(engine.stats)
    trajs, diag = expand(loop, base, {0: sample}, reward, cfg, step=0, mask_truncated=False)
    after = engine.stats
    branches = [t for t in trajs if t.parent_uid is not None]

    # Budget: at most max_extra_fraction * G extra rollouts, in whole branch sets of K.
    assert len(branches) <= int(cfg.max_extra_fraction * G) and len(branches) % 3 == 0
    # The G rollouts share one prefix, so the duplicate candidates collapse to one set of K=3.
    assert diag["prefixes_selected"] == 1 and len(branches) == 3 and diag["trigger_rate"] == 1.0
    parent = next(t for t in base if t.uid == branches[0].parent_uid)
    cut = branches[0].cut
    assert cut == parent.tool_calls[0].start and parent.tokens[cut] == fmt.tool_call
    for b in branches:
        b.check(fmt.image_pad, fmt.merge_size)
        assert b.tokens[:cut] == parent.tokens[:cut]               # token-for-token up to the cut
        assert b.tokens[cut] == fmt.tool_call                      # forced opening
        assert b.loss_mask[cut] == 0                               # not sampled: no loss by default
    tails = {tuple(b.tokens[cut + 1:]) for b in branches} | {tuple(parent.tokens[cut + 1:])}
    assert len(tails) > 1                                          # they diverge after the cut

    # No re-prefill of the prefix: prefill grows only by what the branches appended themselves
    # (the forced <tool_call> and any tool-response chunks), and the shared logits at the cut took
    # one single-token forward.
    appended = sum(1 + sum(1 for m in b.loss_mask[cut + 1:] if m == 0) for b in branches)
    assert after["prefill_tokens"] - before["prefill_tokens"] == appended
    assert appended < cut
    assert after["logit_forwards"] - before["logit_forwards"] <= 1
    loop.release(trajs)


def test_axpo_off_adds_nothing_and_brute_force_matches_budget(setup):
    loop, engine, fmt, sample, base, reward = setup
    trajs, diag = expand(loop, base, {0: sample}, reward, AlgoConfig(axpo=False), step=0)
    assert trajs == base and diag["extra_rollouts"] == 0
    bf = AlgoConfig(axpo=False, brute_force=True, branches_per_prefix=2, prefixes_per_group=2,
                    max_extra_fraction=1.0)
    trajs, diag = expand(loop, base, {0: sample}, reward, bf, step=0, mask_truncated=False)
    extra = trajs[len(base):]
    # Brute force spends what AXPO would: the G rollouts share one prefix, so AXPO selects one
    # prefix (K=2 branches), and brute force adds K=2 fresh full rollouts of that question.
    ax = AlgoConfig(axpo=True, branches_per_prefix=2, prefixes_per_group=2, max_extra_fraction=1.0)
    assert len(extra) == 2 and all(t.parent_uid is None and t.cut is None for t in extra)
    assert len({t.uid for t in trajs}) == len(trajs)
    loop.release(extra)
    # The older round-robin plan deals out both slots (4 extra), ignoring the duplicate prefixes.
    rr = AlgoConfig(**{**bf.__dict__, "brute_force_plan": "round_robin"})
    trajs_rr, _ = expand(loop, base, {0: sample}, reward, rr, step=0, mask_truncated=False)
    assert len(trajs_rr) - len(base) == 4
    loop.release(trajs_rr[len(base):])
    trajs_ax, diag_ax = expand(loop, base, {0: sample}, reward, ax, step=0, mask_truncated=False)
    assert diag_ax["extra_rollouts"] == diag["extra_rollouts"] == 2
    loop.release(trajs_ax)

def test_masked_truncations_do_not_trigger(setup):
    loop, engine, fmt, sample, base, reward = setup
    assert all(t.truncated and t.used_tool for t in base)
    # Every tool user was cut off by the token limit: masked, so not evidence that acting failed.
    assert not group_rollouts(base)[0].triggered
    cfg = AlgoConfig(axpo=True, prefixes_per_group=2, branches_per_prefix=3, max_extra_fraction=1.0)
    trajs, diag = expand(loop, base, {0: sample}, reward, cfg, step=0)
    assert trajs == base and diag["trigger_rate"] == 0.0 and diag["extra_rollouts"] == 0
    assert math.isnan(diag["resample_success_rate"]) and diag["truncated_rate"] == 1.0
    loop.release(trajs)
