"""The built-in engine's leaner decode step (issue #14): fewer dispatched ops per step, fused
q/k/v and gate/up weights that follow every weight change, rotary tables past their first size,
and ragged rows whose mask advances in place. Real tiny models, compared with full forwards."""

import collections
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from axpo.rollout import Engine, SamplingParams

ATOL = 2e-4


def rand_ids(n, seed, vocab=700):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def full_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def check(model, eng, seq, start, out):
    ids = eng.tokens(seq)
    assert ids[start:start + len(out.token_ids)] == out.token_ids
    logp = torch.log_softmax(full_logits(model, ids)[start - 1: start - 1 + len(out.token_ids)], -1)
    want = logp.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=ATOL, rtol=0)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_decode_step_dispatches_few_ops(tiny_model):
    """16 rows (4 groups of 4 forks, ragged lengths), 11 decode steps (the pending token's, then
    one per sampled token but the last) of the 4-layer tiny model: the step before this change
    dispatched ~496 aten ops (3 projection GEMMs and 2 for the MLP per layer, the model's rotary
    module and rotate_half, masks rebuilt every step); now it is under 400."""
    eng = Engine(copy.deepcopy(tiny_model), max_kv_tokens=8192)
    seqs = []
    for i in range(4):
        a = eng.add(list(range(10 + i, 30 + 2 * i)))
        seqs += eng.fork(a, 4)
        eng.free(a)
    eng.generate(seqs, SamplingParams(max_tokens=2, seed=0))
    with _Count() as c:
        outs = eng.generate(seqs, SamplingParams(max_tokens=11, seed=1))
    assert all(len(o.token_ids) == 11 for o in outs)
    per_step = sum(c.ops.values()) / 11
    assert per_step < 400, (per_step, c.ops.most_common(12))
    mm = c.ops["aten.mm.default"] + c.ops["aten.addmm.default"]
    assert mm <= 11 * (4 * 4 + 1), c.ops             # per layer qkv, o, gate|up, down; + the head
    assert c.ops["aten.arange.default"] <= 22, c.ops  # step tensors advance in place, not rebuilt


def test_fused_weights_follow_in_place_updates_and_replacement(tiny_model):
    model = copy.deepcopy(tiny_model)
    eng = Engine(model, block_size=4, max_kv_tokens=4096)
    p = rand_ids(12, seed=3)
    # 1) new weights through load_weights (an in-place copy into the parameters)
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for prm in other.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    eng.load_weights(other.state_dict())
    s = eng.add(p)
    out = eng.generate([s], SamplingParams(temperature=0, max_tokens=6))[0]
    assert full_logits(other, eng.tokens(s))[11:-1].argmax(-1).tolist() == out.token_ids
    check(other, eng, s, 12, out)
    eng.free(s)
    # 2) an in-place change of one projection (an optimiser step would do the same)
    with torch.no_grad():
        model.model.language_model.layers[1].self_attn.k_proj.weight.mul_(1.5)
        model.model.language_model.layers[2].mlp.up_proj.weight.add_(0.1)
    eng.load_weights(model)
    s = eng.add(p)
    out = eng.generate([s], SamplingParams(temperature=0, max_tokens=6))[0]
    check(model, eng, s, 12, out)
    eng.free(s)
    # 3) a parameter replaced by a new tensor object (load_state_dict(assign=True))
    sd = {k: v.clone() * (1.1 if "v_proj" in k or "gate_proj" in k else 1.0) for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    eng.load_weights(model)
    s = eng.add(p)
    out = eng.generate([s], SamplingParams(temperature=0, max_tokens=6))[0]
    check(model, eng, s, 12, out)


def test_rotary_table_grows_and_ragged_rows_finish_apart(tiny_model):
    """Positions past the first rotary table (256) and rows of different lengths that stop at
    different steps (the mask advances in place, then is rebuilt when rows leave)."""
    eng = Engine(tiny_model, block_size=4, max_kv_tokens=8192)
    prompts = [rand_ids(250, seed=7), rand_ids(9, seed=8), rand_ids(31, seed=9)]
    seqs = [eng.add(q) for q in prompts]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (14, 5, 9)]
    outs = eng.generate(seqs, params)
    for s, q, o, n in zip(seqs, prompts, outs, (14, 5, 9)):
        assert len(o.token_ids) == n
        assert full_logits(tiny_model, eng.tokens(s))[len(q) - 1:-1].argmax(-1).tolist() == o.token_ids
        check(tiny_model, eng, s, len(q), o)
    kids = eng.fork(seqs[0], 3)
    outs = eng.generate(kids, [SamplingParams(seed=i, max_tokens=4 + 3 * i) for i in range(3)])
    for k, o in zip(kids, outs):
        check(tiny_model, eng, k, 250 + 14, o)
