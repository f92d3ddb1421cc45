"""The built-in engine against full forwards of the same model (tiny Qwen3-VL, fp32, CPU).

Every check compares what the engine computed through its paged cache (chunked prefill, cascade
decode, forks, tool images) with one plain `model(...)` forward over the whole token sequence.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from axpo.rollout import Engine, SamplingParams
from axpo.rollout import block_manager as bmod
from axpo.rollout import engine as engine_mod

ATOL = 2e-4  # fp32: paged/cascade attention vs SDPA over the full sequence


@pytest.fixture(params=["cpp", "python"])
def backend(request, monkeypatch):
    """Run the test with each block-manager backend."""
    if request.param == "cpp":
        if not bmod.HAS_C:
            pytest.skip("axpo._C not built")
        monkeypatch.setattr(engine_mod, "make_block_manager", bmod._C.BlockManager)
    else:
        monkeypatch.setattr(engine_mod, "make_block_manager", bmod.PyBlockManager)
    return request.param


# Decode workspace layouts (kv_cache.DecodeBatch): dense per-row buffers with no cascade at these
# short prefixes (the default), dense with every shared prefix cascaded, and paged (keys read from
# the pool in chunks of a few keys each step).
LAYOUTS = {"dense": {}, "cascade": {"cascade_min_tokens": 1},
           "paged": {"workspace_mode": "paged", "workspace_bytes": 20_000}}


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
    return LAYOUTS[request.param]


def make_engine(model, **kw):
    kw.setdefault("block_size", 4)         # small blocks: every test crosses many block boundaries
    kw.setdefault("max_kv_tokens", 4096)
    return Engine(model, **kw)


def rand_ids(n, seed, vocab=700):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def full_logits(model, ids, pixel_values=None, grids=None):
    ids_t = torch.tensor([ids])
    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=pixel_values, image_grid_thw=grids,
                  mm_token_type_ids=(ids_t == model.config.image_token_id).long())
    return model(input_ids=ids_t, **kw).logits[0].float()


def check_logprobs(model, eng, seq, start, out, temperature=1.0, **mm):
    """Sampled tokens' log-probs / entropies vs log_softmax(full forward / T) at their positions."""
    ids = eng.tokens(seq)
    assert ids[start:start + len(out.token_ids)] == out.token_ids
    z = full_logits(model, ids, **mm)[start - 1: start - 1 + len(out.token_ids)] / temperature
    logp = torch.log_softmax(z, -1)
    want_lp = logp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    want_h = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs), want_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.tensor(out.entropies), want_h, atol=ATOL, rtol=0)


def image(w, h, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def encode(processor, text, images):
    out = processor(text=[text], images=images or None, return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    if not images:
        return ids, None, None
    return ids, out["pixel_values"], out["image_grid_thw"]


# -- decoding equals a full forward ----------------------------------------------------------------

def test_greedy_equals_argmax_of_full_forward(tiny_model, backend, layout):
    eng = make_engine(tiny_model, **layout)
    prompts = [rand_ids(n, seed=n) for n in (5, 17, 30)]
    seqs = [eng.add(p) for p in prompts]
    outs = eng.generate(seqs, SamplingParams(temperature=0, max_tokens=10))
    for seq, p, out in zip(seqs, prompts, outs):
        assert out.finish_reason == "length" and len(out.token_ids) == 10
        logits = full_logits(tiny_model, eng.tokens(seq))
        assert logits[len(p) - 1:-1].argmax(-1).tolist() == out.token_ids
        check_logprobs(tiny_model, eng, seq, len(p), out)     # greedy: log-probs at T = 1


def test_sampled_logprobs_equal_log_softmax_of_full_forward(tiny_model, backend, layout):
    eng = make_engine(tiny_model, **layout)
    p1, p2 = rand_ids(22, seed=1), rand_ids(9, seed=2)
    a, b = eng.add(p1), eng.add(p2)
    kids = eng.fork(a, 3)                                   # a cascade group + a singleton row
    params = [SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_tokens=12, seed=i) for i in range(4)]
    outs = eng.generate(kids + [b], params)
    for seq, start, out in zip(kids + [b], [22, 22, 22, 9], outs):
        check_logprobs(tiny_model, eng, seq, start, out, temperature=0.7)
    # A second call continues from the pending last token, mixed with a fresh fork.
    more = eng.fork_at(a, 15, 1)[0]
    n0 = len(eng.tokens(kids[0]))
    outs = eng.generate([kids[0], more], SamplingParams(temperature=1.0, max_tokens=6, seed=5))
    check_logprobs(tiny_model, eng, kids[0], n0, outs[0])
    check_logprobs(tiny_model, eng, more, 15, outs[1])


def test_stop_tokens_and_max_tokens(tiny_model):
    eng = make_engine(tiny_model)
    p = rand_ids(12, seed=3)
    ref = eng.generate([eng.add(p)], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    stop = ref[3]
    first = ref.index(stop)
    out = eng.generate([eng.add(p)], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(stop,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[:first + 1]
    out = eng.generate([eng.add(p)], SamplingParams(temperature=0, max_tokens=2))[0]
    assert out.finish_reason == "length" and out.token_ids == ref[:2]


def test_seeded_sampling_is_independent_of_batch(tiny_model):
    eng = make_engine(tiny_model)
    p = rand_ids(10, seed=4)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=123)
    alone = eng.generate([eng.add(p)], params)[0].token_ids
    others = [eng.add(rand_ids(7, seed=s)) for s in (5, 6)]
    batched = eng.generate([others[0], eng.add(p), others[1]],
                           [SamplingParams(seed=1), params, SamplingParams(seed=2)])[1].token_ids
    assert alone == batched


# -- tool images -----------------------------------------------------------------------------------

def test_tool_image_continuation_equals_full_forward(tiny_model, tiny_processor, backend, layout):
    proc = tiny_processor
    model = tiny_model
    ids1, pv1, g1 = encode(proc, "<|im_start|>user\nlook <|vision_start|><|image_pad|><|vision_end|> what is "
                           "the colour?<|im_end|>\n<|im_start|>assistant\n", [image(64, 96, 0)])
    eng = make_engine(model, **layout)
    seq = eng.add(ids1, pixel_values=pv1, image_grid_thw=g1)
    torch.testing.assert_close(eng.next_token_logits(seq), full_logits(model, ids1, pv1, g1)[-1], atol=ATOL, rtol=0)
    out = eng.generate([seq], SamplingParams(temperature=1.0, max_tokens=5, seed=0))[0]
    check_logprobs(model, eng, seq, len(ids1), out, pixel_values=pv1, grids=g1)

    # The tool answers with a new image (a different grid), prefilled as one chunk.
    ids2, pv2, g2 = encode(proc, "<|im_end|>\n<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|>"
                           "<|vision_end|>\n</tool_response><|im_end|>\n<|im_start|>assistant\n", [image(160, 96, 1)])
    eng.extend(seq, ids2, pixel_values=pv2, image_grid_thw=g2)
    full = eng.tokens(seq)
    pv, grids = torch.cat([pv1, pv2]), torch.cat([g1, g2])
    ref = full_logits(model, full, pv, grids)
    torch.testing.assert_close(eng.next_token_logits(seq), ref[-1], atol=ATOL, rtol=0)

    # Positions continue the sequence: identical to get_rope_index over the concatenation.
    ids_t = torch.tensor([full])
    want, _ = model.model.get_rope_index(ids_t, (ids_t == model.config.image_token_id).long(), grids)
    assert torch.equal(eng.positions(seq), want[:, 0])
    assert eng.positions(seq)[0, -1] < len(full) - 1    # images make positions lag the token index

    n = len(full)
    out = eng.generate([seq], SamplingParams(temperature=0, max_tokens=6))[0]
    assert full_logits(model, eng.tokens(seq), pv, grids)[n - 1:-1].argmax(-1).tolist() == out.token_ids
    check_logprobs(model, eng, seq, n, out, pixel_values=pv, grids=grids)

    # Branches after the image decode with the right positions too.
    kids = eng.fork_at(seq, n + 2, 2)
    outs = eng.generate(kids, SamplingParams(temperature=1.0, max_tokens=4, seed=9))
    for k, o in zip(kids, outs):
        check_logprobs(model, eng, k, n + 2, o, pixel_values=pv, grids=grids)


def test_batched_prefill_equals_one_by_one(tiny_model, tiny_processor, backend, monkeypatch):
    """add_many / extend_many (packed forwards) leave the same tokens, positions, KV and logits as
    add / extend of each sequence: prompts with and without images, tool responses after a pending
    sampled token, chunks into forked (copy-on-write) sequences, and packs split by the score
    bound. Then both engines decode alike."""
    proc, model = tiny_processor, tiny_model
    img_p = encode(proc, "<|im_start|>user\nlook <|vision_start|><|image_pad|><|vision_end|> colour?<|im_end|>\n"
                   "<|im_start|>assistant\n", [image(64, 96, 0)])
    img_t = encode(proc, "<|im_end|>\n<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|>"
                   "<|vision_end|>\n</tool_response><|im_end|>\n<|im_start|>assistant\n", [image(96, 64, 1)])
    mm = lambda e: {} if e[1] is None else {"pixel_values": e[1], "image_grid_thw": e[2]}  # noqa: E731
    prompts = [(rand_ids(23, 1), None, None), img_p, (rand_ids(5, 2), None, None), (rand_ids(40, 3), None, None)]
    tools = [(rand_ids(9, 4), None, None), img_t, (rand_ids(17, 5), None, None), (rand_ids(1, 6), None, None)]
    for bound in (1 << 27, 20_000):                     # one pack; packs of one or two sequences
        monkeypatch.setattr(engine_mod, "PREFILL_BATCH_SCORES", bound)
        one, many = make_engine(model), make_engine(model)
        packs, packed = [], many.runner.prefill_many
        many.runner.prefill_many = lambda *a, **k: (packs.append(len(a[4])), packed(*a, **k))[1]
        a = [one.add(e[0], **mm(e)) for e in prompts]
        b = many.add_many([e[0] for e in prompts], [mm(e) for e in prompts])
        # Forks: the chunk lands in blocks shared with a sibling (copy-on-write in the pack).
        a += one.fork(a[0], 1)
        b += many.fork(b[0], 1)
        params = [SamplingParams(temperature=1.0, max_tokens=4, seed=i, stop_token_ids=[]) for i in range(5)]
        oa, ob = one.generate(a, params), many.generate(b, params)
        assert [o.token_ids for o in oa] == [o.token_ids for o in ob]
        chunks = tools + [(rand_ids(12, 7), None, None)]
        for s, e in zip(a, chunks):
            one.extend(s, e[0], **mm(e))
        many.extend_many(b, [e[0] for e in chunks], [mm(e) for e in chunks])
        if bound == 1 << 27:
            assert packs == [4, 5]                      # every prompt in one pack, every tool response in one
        else:
            assert len(packs) > 2 and sum(packs) < 9    # split into several packs, some rows alone
        assert many.stats["prefill_tokens"] == one.stats["prefill_tokens"]
        for sa, sb in zip(a, b):
            assert one.tokens(sa) == many.tokens(sb)
            assert torch.equal(one.positions(sa), many.positions(sb))
            torch.testing.assert_close(many.next_token_logits(sb), one.next_token_logits(sa), atol=ATOL, rtol=0)
            sl_a = torch.tensor(one.bm.slots(sa, 0, one.bm.num_tokens(sa)))
            sl_b = torch.tensor(many.bm.slots(sb, 0, many.bm.num_tokens(sb)))
            for layer in range(len(one.cache.k)):
                torch.testing.assert_close(many.cache.k[layer][sl_b], one.cache.k[layer][sl_a], atol=ATOL, rtol=0)
                torch.testing.assert_close(many.cache.v[layer][sl_b], one.cache.v[layer][sl_a], atol=ATOL, rtol=0)
        # Against the model itself: the image prompt + its image tool response.
        full = many.tokens(b[1])
        pv, grids = torch.cat([img_p[1], img_t[1]]), torch.cat([img_p[2], img_t[2]])
        torch.testing.assert_close(many.next_token_logits(b[1]), full_logits(model, full, pv, grids)[-1],
                                   atol=ATOL, rtol=0)
        oa = one.generate(a, SamplingParams(temperature=0, max_tokens=5))
        ob = many.generate(b, SamplingParams(temperature=0, max_tokens=5))
        assert [o.token_ids for o in oa] == [o.token_ids for o in ob]


def test_batched_prefill_checks_everything_before_writing(tiny_model, tiny_processor):
    eng = make_engine(tiny_model, max_kv_tokens=256)
    ids, pv, g = encode(tiny_processor, "a <|vision_start|><|image_pad|><|vision_end|> b", [image(64, 64, 2)])
    with pytest.raises(ValueError, match="image token runs"):
        eng.add_many([rand_ids(8, 1), ids], [{}, {}])
    with pytest.raises(ValueError, match="empty token list"):
        eng.add_many([rand_ids(8, 1), []])
    with pytest.raises(RuntimeError, match="pool exhausted"):
        eng.add_many([rand_ids(200, 1), rand_ids(100, 2)])
    assert eng.stats["sequences"] == 0 and eng.stats["blocks_used"] == 0
    s = eng.add_many([rand_ids(8, 1), rand_ids(9, 2)])
    before = [eng.tokens(x) for x in s]
    with pytest.raises(ValueError, match="patches"):
        eng.extend_many(s, [rand_ids(3, 3), ids], [{}, {"pixel_values": pv[:-4], "image_grid_thw": g}])
    with pytest.raises(ValueError, match="listed twice"):
        eng.extend_many([s[0], s[0]], [rand_ids(3, 3), rand_ids(3, 4)])
    assert [eng.tokens(x) for x in s] == before           # nothing was written
    eng.extend_many(s, [rand_ids(3, 3), ids], [{}, {"pixel_values": pv, "image_grid_thw": g}])
    assert eng.tokens(s[1]) == before[1] + ids


def test_image_pad_mismatch_raises(tiny_model, tiny_processor):
    ids, pv, g = encode(tiny_processor, "a <|vision_start|><|image_pad|><|vision_end|> b", [image(64, 64, 2)])
    eng = make_engine(tiny_model)
    bad = [t for t in ids if t != tiny_model.config.image_token_id] + [tiny_model.config.image_token_id]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        eng.add(bad, pixel_values=pv, image_grid_thw=g)
    assert eng.stats["sequences"] == 0 and eng.stats["blocks_used"] == 0
    seq = eng.add(ids, pixel_values=pv, image_grid_thw=g)
    start = ids.index(tiny_model.config.image_token_id)
    with pytest.raises(ValueError, match="inside the image"):
        eng.fork_at(seq, start + 1, 2)


# -- forking ---------------------------------------------------------------------------------------

def test_fork_at_logits_equal_fresh_prefill(tiny_model, backend):
    eng = make_engine(tiny_model)
    p = rand_ids(14, seed=7)
    seq = eng.add(p)
    eng.generate([seq], SamplingParams(temperature=1.0, max_tokens=20, seed=0))
    toks = eng.tokens(seq)
    before = eng.stats
    for t in (len(toks), 25, 14, 9):                        # end (pending token), mid-response, prompt
        kids = eng.fork_at(seq, t, 3)
        fresh = eng.add(toks[:t])
        want = full_logits(tiny_model, toks[:t])[-1]
        for k in kids:
            assert eng.tokens(k) == toks[:t]
            torch.testing.assert_close(eng.next_token_logits(k), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(eng.next_token_logits(fresh), want, atol=ATOL, rtol=0)
        a = eng.generate([kids[0], fresh], SamplingParams(temperature=0, max_tokens=6))
        assert a[0].token_ids == a[1].token_ids
        eng.free(fresh)
    s = eng.stats
    fresh_prefill = len(toks) + 25 + 14 + 9
    assert s["prefill_tokens"] - before["prefill_tokens"] == fresh_prefill    # forks prefilled nothing
    assert s["logit_forwards"] - before["logit_forwards"] == 3                # one per cut (end: materialised)
    assert s["forks"] - before["forks"] == 12


def test_fork_at_children_share_first_logits_then_diverge(tiny_model, layout):
    eng = make_engine(tiny_model, **layout)
    seq = eng.add(rand_ids(30, seed=8))
    kids = eng.fork_at(seq, 21, 8)
    outs = eng.generate(kids, [SamplingParams(temperature=1.5, max_tokens=5, seed=i) for i in range(8)])
    assert len({tuple(o.token_ids) for o in outs}) > 1
    # Same logits for the first token: same entropy in every branch.
    assert len({round(o.entropies[0], 5) for o in outs}) == 1
    for k, o in zip(kids, outs):
        check_logprobs(tiny_model, eng, k, 21, o, temperature=1.5)


def test_pinned_prefix_survives_free(tiny_model, backend):
    eng = make_engine(tiny_model)
    seq = eng.add(rand_ids(18, seed=10))
    eng.generate([seq], SamplingParams(temperature=1.0, max_tokens=7, seed=1))
    toks = eng.tokens(seq)
    with eng.pinned(seq, 22) as prefix:
        eng.free(seq)                                       # the rollout is released ...
        with pytest.raises(ValueError, match="pinned"):
            eng.generate([prefix], SamplingParams())
        kids = eng.fork_at(prefix, 20, 2)                   # ... and resampled from later
        torch.testing.assert_close(eng.next_token_logits(kids[0]), full_logits(tiny_model, toks[:20])[-1],
                                   atol=ATOL, rtol=0)
        outs = eng.generate(kids, SamplingParams(temperature=1.0, max_tokens=5, seed=2))
        check_logprobs(tiny_model, eng, kids[1], 20, outs[1])
        eng.free_many(kids)
    assert eng.stats["blocks_used"] == 0 and eng.stats["pinned"] == 0


def test_branch_memory_within_prefix_plus_continuations(tiny_model):
    bs, p_len, k, d = 4, 37, 8, 11
    eng = make_engine(tiny_model, block_size=bs)
    parent = eng.add(rand_ids(p_len, seed=11))
    kids = eng.fork(parent, k)
    eng.free(parent)
    eng.generate(kids, SamplingParams(temperature=1.0, max_tokens=d, seed=0))
    s = eng.stats
    bound = p_len // bs + k * -(-(p_len % bs + d) // bs)     # full prefix blocks + K own tails
    assert s["blocks_used"] <= bound
    assert s["cow_copies"] == k - 1                          # the last holder writes in place


def test_unwritten_cache_slots_are_never_read(tiny_model, layout):
    """The KV cache is allocated uninitialised: poison it, then run every path."""
    eng = make_engine(tiny_model, **layout)
    for t in eng.cache.k + eng.cache.v:
        t.fill_(float("nan"))
    a, b = eng.add(rand_ids(13, seed=20)), eng.add(rand_ids(6, seed=21))
    kids = eng.fork_at(a, 11, 3)
    outs = eng.generate(kids + [b], SamplingParams(max_tokens=9, seed=0))
    eng.extend(kids[0], rand_ids(7, seed=22))
    more = eng.generate([kids[0], kids[1]], SamplingParams(max_tokens=5, seed=1))
    for seq, start, out in [(kids[2], 11, outs[2]), (b, 6, outs[3]), (kids[1], 20, more[1])]:
        check_logprobs(tiny_model, eng, seq, start, out)
    assert torch.isfinite(eng.next_token_logits(kids[0])).all()


# -- other models, weights, misuse ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_text_causal_lm(arch, layout):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if arch == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    eng = make_engine(model, **layout)
    p = rand_ids(13, seed=12, vocab=300)
    seq = eng.add(p)
    kids = eng.fork_at(seq, 13, 2)
    outs = eng.generate([seq] + kids, [SamplingParams(temperature=0, max_tokens=7),
                                       SamplingParams(seed=1, max_tokens=7), SamplingParams(seed=2, max_tokens=7)])
    assert full_logits(model, eng.tokens(seq))[12:-1].argmax(-1).tolist() == outs[0].token_ids
    for s, o in zip(kids, outs[1:]):
        check_logprobs(model, eng, s, 13, o)


def test_load_weights_resets_state(tiny_model, tiny_processor):
    from axpo.models import build_tiny_model

    import copy

    eng = make_engine(copy.deepcopy(tiny_model))
    old = eng.add(rand_ids(10, seed=13))
    other = build_tiny_model(seed=1, processor=tiny_processor).eval()
    eng.load_weights(other.state_dict())
    with pytest.raises(ValueError, match="older weights"):
        eng.generate([old], SamplingParams())
    with pytest.raises(ValueError, match="older weights"):
        eng.fork_at(old, 5, 2)
    eng.free(old)
    p = rand_ids(10, seed=13)
    seq = eng.add(p)
    torch.testing.assert_close(eng.next_token_logits(seq), full_logits(other, p)[-1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="unexpected keys"):
        eng.load_weights({"nope": torch.zeros(1)})
    assert eng.stats["weights_version"] == 1


def test_misuse_raises_clear_errors(tiny_model, backend):
    eng = make_engine(tiny_model, max_kv_tokens=64)         # 16 blocks of 4
    seq = eng.add(rand_ids(10, seed=14))
    with pytest.raises(ValueError, match="unknown sequence 99"):
        eng.generate([99], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        eng.fork_at(seq, 11, 2)
    with pytest.raises(ValueError, match="listed twice"):
        eng.generate([seq, seq], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RuntimeError, match="pool exhausted"):
        eng.add(rand_ids(100, seed=15))
    kids = eng.fork(seq, 3)
    with pytest.raises(RuntimeError, match="pool exhausted"):
        eng.generate(kids, SamplingParams(max_tokens=40, seed=0))
    eng.free_many(kids)                                     # still consistent and usable
    eng.free(seq)
    with pytest.raises(ValueError, match="already freed"):
        eng.free(seq)
    assert eng.stats["blocks_used"] == 0
    seq = eng.add(rand_ids(6, seed=16))
    assert len(eng.generate([seq], SamplingParams(max_tokens=3, seed=0))[0].token_ids) == 3


# -- sampling ----------------------------------------------------------------------------------------

def test_truncate_matches_naive_top_k_top_p():
    from axpo.rollout.sampling import truncate

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g) * 2
    ks, ps = [0, 1, 5, 0, 7, 50], [1.0, 1.0, 0.8, 0.3, 0.5, 0.99]
    got = truncate(z, torch.tensor(ks), torch.tensor(ps))
    for r in range(6):
        order = torch.argsort(z[r], descending=True).tolist()
        keep = order[: ks[r] or 50]
        p = torch.softmax(z[r, keep], -1)
        n = next(i + 1 for i in range(len(keep)) if p[: i + 1].sum() >= ps[r] - 1e-6)
        want = set(keep[:n])
        assert {i for i in range(50) if got[r, i] > float("-inf")} == want


def test_sampling_distribution_and_reported_logprobs():
    from axpo.rollout.sampling import sample

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(20000, 1)
    torch.manual_seed(0)
    toks, lps, _ = sample(logits, [SamplingParams(temperature=0.8)] * 20000, [None] * 20000)
    freq = torch.bincount(torch.tensor(toks), minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.8, -1), atol=0.015, rtol=0)
    # top-k: drawn from the truncated distribution, log-prob reported untruncated (see sampling.py)
    toks, lps, ents = sample(logits[:4], [SamplingParams(top_k=2, seed=s) for s in range(4)], [None] * 4)
    assert set(toks) <= {0, 1}
    ref = torch.log_softmax(logits[0], -1)
    torch.testing.assert_close(torch.tensor(lps), ref[toks], atol=1e-6, rtol=0)
    toks, _, _ = sample(logits[:3], [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert toks == [0, 0, 0]


def test_banned_tokens_are_never_sampled_and_logprobs_stay_full(tiny_model):
    """Vision placeholders are banned from sampling; the returned log-probs are still those of
    the full distribution (what the trainer recomputes)."""
    import copy

    import torch

    from axpo.rollout.engine import Engine, SamplingParams

    eng = Engine(copy.deepcopy(tiny_model), max_kv_tokens=4096)
    seq = eng.add(list(range(5, 25)))
    logits = eng.next_token_logits(seq)
    top = int(logits.argmax())
    banned = tuple(int(i) for i in logits.topk(50).indices)   # the 50 likeliest tokens, top included
    kids = eng.fork(seq, 8)
    outs = eng.generate(kids, [SamplingParams(max_tokens=6, seed=i, banned_token_ids=banned) for i in range(8)])
    assert all(t not in banned for o in outs for t in o.token_ids)
    first = outs[0].token_ids[0]
    ref = torch.log_softmax(logits.double(), -1)[first].item()
    assert abs(outs[0].logprobs[0] - ref) < 1e-4
    greedy = eng.generate(eng.fork(seq, 1), SamplingParams(temperature=0, max_tokens=1, banned_token_ids=(top,)))
    assert greedy[0].token_ids[0] != top


# -- decode workspace: layouts, bound, dropping finished rows -----------------------------------------

def test_layouts_take_their_paths(tiny_model, layout):
    eng = make_engine(tiny_model, **layout)
    a = eng.add(rand_ids(21, seed=40))
    kids = eng.fork(a, 3)
    eng.generate(kids + [eng.add(rand_ids(5, seed=41))], SamplingParams(max_tokens=5, seed=0))
    s = eng.stats
    assert s["paged_decode_calls"] == (1 if layout.get("workspace_mode") == "paged" else 0)
    if "workspace_bytes" in layout:
        assert s["workspace_bytes"] <= s["workspace_limit_bytes"] == layout["workspace_bytes"]


def test_workspace_is_paged_when_dense_exceeds_the_bound(tiny_model):
    """The dense layout needs rows x (rest + max_tokens) x bytes per token; over the plan's
    workspace bound the call decodes paged and holds no more than the bound."""
    eng = make_engine(tiny_model, workspace_bytes=64 * 1024)
    per_tok = eng.kv_plan.bytes_per_token                                  # 2 KiB for the tiny model
    prompts = [rand_ids(10, seed=50 + i) for i in range(2)]
    seqs = [eng.add(p) for p in prompts]
    first = eng.generate(seqs, SamplingParams(max_tokens=2, seed=0))      # 2 x (10 + 2) tokens: dense
    assert eng.stats["paged_decode_calls"] == 0 and eng.stats["workspace_bytes"] == 2 * 12 * per_tok
    outs = eng.generate(seqs, SamplingParams(max_tokens=12, seed=1))      # 2 x (11 + 12) > 32 tokens
    assert eng.stats["paged_decode_calls"] == 1 and eng.stats["workspace_bytes"] <= 64 * 1024
    for s, p, a, b in zip(seqs, prompts, first, outs):
        check_logprobs(tiny_model, eng, s, len(p), a)
        check_logprobs(tiny_model, eng, s, len(p) + 2, b)


def test_finishing_rows_moves_only_the_rows_that_fill_their_places(tiny_model, monkeypatch):
    """Rows that finish early are dropped without reallocating or copying the workspace: the last
    live rows move into their positions (two rows here), the buffers stay where they are."""
    seen = []

    class Spy(engine_mod.DecodeBatch):
        def keep(self, rows):
            ptrs = [t.data_ptr() for t in self.rest_k + self.rest_v]
            order = super().keep(rows)
            assert [t.data_ptr() for t in self.rest_k + self.rest_v] == ptrs
            seen.append(self)
            return order

    monkeypatch.setattr(engine_mod, "DecodeBatch", Spy)
    eng = make_engine(tiny_model)
    prompts = [rand_ids(9 + i, seed=60 + i) for i in range(6)]
    seqs = [eng.add(p) for p in prompts]
    params = [SamplingParams(max_tokens=2 if i in (0, 2) else 9, seed=i) for i in range(6)]
    outs = eng.generate(seqs, params)
    batch = seen[0]
    assert batch.mode == "dense"
    row_bytes = sum(t[0].numel() * t.element_size() for t in batch.rest_k + batch.rest_v)
    assert batch.bytes_moved == 2 * row_bytes                     # rows 4, 5 into positions 0, 2
    assert eng.stats["workspace_bytes_moved"] == 2 * row_bytes < eng.stats["workspace_bytes"] / 2
    for s, p, o, sp in zip(seqs, prompts, outs, params):
        assert len(o.token_ids) == sp.max_tokens
        check_logprobs(tiny_model, eng, s, len(p), o)


# -- counter-based sampling ---------------------------------------------------------------------------

def _splitmix_uniform(seed: int, k: int) -> float:
    """Reference: splitmix64 in Python integers, the top 24 bits as a fraction."""
    m = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    key = mix((seed + 0x9E3779B97F4A7C15) & m)
    z = mix((key + (k + 1) * 0x9E3779B97F4A7C15) & m)
    return (z >> 40) / 2**24


def test_counter_uniform_is_splitmix64_and_uniform():
    from axpo.rollout.sampling import counter_uniform, mix_seed

    seeds = [0, 1, 2, 123, 2**62 + 7, (1 << 63) - 1]
    keys = torch.tensor([mix_seed(s) for s in seeds for _ in range(5)])
    ks = torch.tensor([k for _ in seeds for k in range(5)])
    got = counter_uniform(keys, ks).tolist()
    want = [_splitmix_uniform(s, k) for s in seeds for k in range(5)]
    assert got == pytest.approx(want, abs=0)
    u = counter_uniform(torch.full((20000,), mix_seed(7)), torch.arange(20000))
    assert abs(u.mean().item() - 0.5) < 0.01 and 0 <= u.min().item() and u.max().item() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / 20000
    torch.testing.assert_close(hist, torch.full((10,), 0.1), atol=0.01, rtol=0)


def test_sampler_rows_do_not_depend_on_their_batch():
    """A seeded row draws the same tokens in any batch, at any position, whatever rows finish
    around it; unseeded and greedy rows can share the batch."""
    from axpo.rollout.sampling import Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 40, generator=g) * 3          # [steps, rows, V]
    params = [SamplingParams(seed=11, banned_token_ids=(3,)), SamplingParams(seed=12, top_p=0.9),
              SamplingParams(temperature=0), SamplingParams(), SamplingParams(seed=13, temperature=0.7),
              SamplingParams(seed=14, top_k=5, banned_token_ids=(1, 2))]
    alone = {}
    for r in (0, 1, 4, 5):
        s = Sampler([params[r]], "cpu")
        alone[r] = [s.sample(logits[t, r:r + 1])[0][0] for t in range(4)]
    full = Sampler(params, "cpu")
    got = {r: [] for r in range(6)}
    live = [5, 3, 0, 2, 4, 1]                                  # any order
    for t in range(4):
        toks, _, _ = full.sample(logits[t, live], torch.tensor(live))
        for r, tok in zip(live, toks):
            got[r].append(tok)
        live = live[:-1] if t == 1 else live                  # a row finishes
    for r in (0, 4, 5):
        assert got[r] == alone[r]
    assert got[1] == alone[1][:2]
    assert 3 not in got[0] and not {1, 2} & set(got[5])
    assert got[2] == logits[:, 2].argmax(-1).tolist()


def test_partial_attention_merges_to_full_attention(monkeypatch):
    """Two partial attentions over disjoint key sets, merged by log-sum-exp, equal attention over
    all keys; the fused CPU kernel and the matmul path used on other devices agree."""
    from axpo.rollout import attention as att

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 4, 16, generator=g)
    k, v = torch.randn(3, 2, 7, 16, generator=g), torch.randn(3, 2, 7, 16, generator=g)
    k2, v2 = torch.randn(3, 2, 9, 16, generator=g), torch.randn(3, 2, 9, 16, generator=g)
    valid = torch.arange(9)[None, :] < torch.tensor([9, 5, 1])[:, None]
    mask = att.float_mask(valid[:, None, None, :], torch.float32)
    full_k, full_v = torch.cat([k, k2], 2), torch.cat([v, v2], 2)
    full_mask = torch.cat([torch.zeros(3, 1, 1, 7), mask], -1)
    want = att.decode_attention(q, full_k, full_v, full_mask, 0.25)
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(att, "_flash_cpu", lambda: None)
        o1, l1 = att.partial_attention(q, k, v, None, 0.25)
        o2, l2 = att.partial_attention(q, k2, v2, mask, 0.25)
        torch.testing.assert_close(att.merge_lse(o1, l1, o2, l2), want, atol=1e-6, rtol=0)


def test_cascade_decode_without_the_fused_kernel(tiny_model, monkeypatch):
    """The cascade path as it runs off CPU (matmul partials instead of the fused kernel)."""
    from axpo.rollout import attention as att

    monkeypatch.setattr(att, "_flash_cpu", lambda: None)
    eng = make_engine(tiny_model, cascade_min_tokens=1)
    a = eng.add(rand_ids(19, seed=70))
    kids = eng.fork(a, 3) + eng.fork_at(a, 11, 2)
    outs = eng.generate(kids, SamplingParams(max_tokens=6, seed=3))
    for s, start, o in zip(kids, [19, 19, 19, 11, 11], outs):
        check_logprobs(tiny_model, eng, s, start, o)
