"""The agent loop on real rollouts of the tiny Qwen3-VL with the real engine and tools: trajectory
invariants (aligned per-token lists, image pads == grid sizes, masks, cut indices), malformed calls
turned into tool errors the model reads, and the turn limit flagged."""

import copy
import json

import pytest

from axpo.agent.format import AgentFormat
from axpo.agent.loop import AgentLoop
from axpo.config import RolloutConfig
from axpo.rollout.engine import Engine
from axpo.rollout_stats import RolloutCounts
from axpo.tasks import generate_task
from axpo.tools import build_tools


@pytest.fixture()
def make_loop(tiny_model, tiny_processor):
    def make(**kw):
        fmt = AgentFormat(tiny_processor)
        engine = Engine(copy.deepcopy(tiny_model), max_kv_tokens=65536)
        cfg = RolloutConfig(**{"group_size": 3, "max_turn_tokens": 16, "max_turns": 3,
                               "max_total_tokens": 2048, **kw})
        return AgentLoop(engine, fmt, build_tools(["image_zoom_in", "python", "search"]), cfg, seed=1), fmt
    return make


def _samples():
    small = {"image_size_min": 320, "image_size_max": 320}
    return (generate_task("perception", 1, 5, small) + generate_task("calculation", 1, 5)
            + generate_task("search", 1, 5))


def _forced(fmt, call_json: str) -> list[int]:
    return fmt.tokenizer("Use the tool.\n</think>\n\n<tool_call>\n" + call_json + "\n</tool_call>",
                         add_special_tokens=False)["input_ids"]


def test_free_rollouts_keep_invariants(make_loop):
    loop, fmt = make_loop()
    samples = _samples()
    trajs = loop.rollout(samples, 3, step=0)
    assert len(trajs) == 9 and len({t.uid for t in trajs}) == 9
    for t in trajs:
        t.check(fmt.image_pad, fmt.merge_size)
        assert t.finished or t.truncated
        assert t.tokens[:t.prompt_len] == trajs[3 * t.group].tokens[:t.prompt_len]  # shared prompt
        # Sampled tokens carry behaviour log-probs and entropies; the rest are zeros.
        for m, lp, en in zip(t.loss_mask, t.logprobs, t.entropies):
            assert (lp <= 0.0 and en >= 0.0) if m else (lp == 0.0 and en == 0.0)
        # What the engine holds is exactly the trajectory's tokens.
        assert loop.engine.tokens(t.seq_id)[:len(t.tokens)] == t.tokens
    loop.release(trajs)
    assert loop.engine.stats["blocks_used"] == 0


def test_tool_round_trip_and_cut_index(make_loop):
    loop, fmt = make_loop()
    perception = _samples()[0]
    call = json.dumps({"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "q"}})
    trajs = loop.rollout([perception], 2, step=0, response_prefix={perception.uid: _forced(fmt, call)})
    for t in trajs:
        t.check(fmt.image_pad, fmt.merge_size)
        c = t.tool_calls[0]
        assert c.error is None and c.name == "image_zoom_in"
        assert t.tokens[c.start] == fmt.tool_call and t.tokens[c.end - 1] == fmt.tool_call_end
        assert len(t.images) == 2 and t.image_spans[1].from_tool      # the crop came back
        # The tool response is masked out of the loss, the sampled turn after it is not.
        resp_start = c.end
        assert t.loss_mask[resp_start] == 0 and t.tokens[resp_start] == fmt.im_end
    loop.release(trajs)


@pytest.mark.parametrize("call_text, kind", [
    ('{"name": "image_zoom_in", "arguments": {"bbox_2d": [10, 10, 5, 5]}}', "empty_box"),
    ('{"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 10, 10], "img_idx": 7}}', "bad_image_index"),
    ('{"name": "teleport", "arguments": {}}', "unknown_tool"),
    ('{"name": "python", "arguments": {"code": 5}}', "bad_arguments"),
    ('{"name": "search", "arguments": ', "bad_json"),
])
def test_malformed_call_becomes_tool_error_and_loop_continues(make_loop, call_text, kind):
    import dataclasses

    loop, fmt = make_loop()
    sample = dataclasses.replace(_samples()[0], tools=None)   # offered every tool of the run
    trajs = loop.rollout([sample], 1, step=0, response_prefix={sample.uid: _forced(fmt, call_text)})
    t = trajs[0]
    t.check(fmt.image_pad, fmt.merge_size)
    assert t.tool_calls[0].error == kind
    assert RolloutCounts.of(trajs).tool_errors == 1
    # The error text went back to the model as a tool response, and sampling went on after it.
    text = fmt.decode(t.tokens[t.tool_calls[0].end:])
    assert "<tool_response>\nError:" in text and t.turns >= 2
    loop.release(trajs)


@pytest.mark.parametrize("tools, kind", [(["image_zoom_in"], "unknown_tool"), ([], "unknown_tool"),
                                         (None, None)])
def test_a_row_offers_exactly_its_tools(make_loop, tools, kind):
    """`tools: [...]` offers just those (prompt and execution), `[]` none, None every tool."""
    import dataclasses

    loop, fmt = make_loop()
    sample = dataclasses.replace(_samples()[0], tools=tools)
    call = json.dumps({"name": "python", "arguments": {"code": "print(1)"}})
    trajs = loop.rollout([sample], 1, step=0, response_prefix={sample.uid: _forced(fmt, call)})
    t = trajs[0]
    prompt = fmt.decode(t.tokens[:t.prompt_len])
    assert ('"name": "python"' in prompt) == (tools is None)
    assert ("# Tools" in prompt) == (tools != [])
    assert t.tool_calls[0].error == kind
    loop.release(trajs)


def test_turn_limit_is_flagged(make_loop):
    loop, fmt = make_loop(max_turns=1)
    sample = _samples()[1]
    call = json.dumps({"name": "python", "arguments": {"code": "print(1)"}})
    trajs = loop.rollout([sample], 1, step=0, response_prefix={sample.uid: _forced(fmt, call)})
    assert trajs[0].truncated and not trajs[0].finished and trajs[0].turns == 1
    loop.release(trajs)


class _ForkOnlyEngine:
    """Just what AgentLoop.branch touches: fork a sequence at a cut, extend it."""

    def __init__(self):
        self.extended = {}

    def fork_at(self, seq, cut, k):
        return [100 + i for i in range(k)]

    def extend(self, seq, ids, **kw):
        self.extended.setdefault(seq, []).extend(ids)


@pytest.mark.parametrize("train_forced", [False, True])
def test_forced_tool_call_is_not_trained_unless_asked(tiny_processor, train_forced):
    from axpo.agent.trajectory import Trajectory
    from axpo.algo.resample import new_tokens

    fmt = AgentFormat(tiny_processor)
    engine = _ForkOnlyEngine()
    loop = AgentLoop(engine, fmt, build_tools(["python"]), RolloutConfig(), seed=0)
    P, cut = 4, 7
    parent = Trajectory(uid="p", sample_uid="q", group=0, prompt_len=P, seq_id=1)
    parent.append([1] * P, sampled=False)
    parent.append([2, 3, 4, fmt.tool_call, 5], sampled=True, logprobs=[-0.1] * 5, entropies=[0.3] * 5)
    branches = loop.branch(parent, cut, 2, force_tool_call=True, branch_set=0, train_forced=train_forced)
    for b in branches:
        assert b.tokens[cut] == fmt.tool_call and engine.extended[b.seq_id] == [fmt.tool_call]
        # The policy did not sample the forced opening: no loss on it unless algo.train_forced_call.
        assert b.loss_mask[cut] == int(train_forced)
        assert b.loss_mask[:cut] == parent.loss_mask[:cut]
        assert new_tokens(b) == int(train_forced)        # nothing sampled yet but (maybe) the forced token


def test_evaluate_counts_every_rollout_it_scores(make_loop):
    """axpo.eval.evaluate over real rollouts: its numbers are those of the rollout-statistics record
    of the same rollouts (scored with the same reward)."""
    from axpo.eval import evaluate

    loop, _ = make_loop()
    samples = generate_task("calculation", 3, 7)
    scored = []

    def reward(t):
        scored.append(t)
        return float(len(t.tokens) % 2)     # any deterministic score with both outcomes

    out = evaluate(loop, samples, reward, n=2, ks=(1, 2))
    c = RolloutCounts.of(scored, [float(len(t.tokens) % 2) for t in scored])
    assert out["questions"] == 3 and c.rollouts == 6
    assert out["tool_use_rate"] == c.rates(undefined=0.0)["tool_use_rate"]
    assert out["truncated_rate"] == c.rates(undefined=0.0)["truncated_rate"]
    assert 0 <= out["pass@1"] <= out["pass@2"] <= 1 and "calculation/pass@1" in out
    assert loop.engine.stats["blocks_used"] == 0       # every rollout released
