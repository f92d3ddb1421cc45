"""`PolicyModel` with the lean text MLPs and norms (axpo/lean_activations.py, on by default): the
same log-probs and gradients as Hugging Face's forwards, fewer saved bytes, parameters untouched."""

import copy

import torch

from axpo.distributed import Dist, shard
from axpo.models import build_tiny_model
from axpo.policy import PolicyModel, pack


def _batch(vocab=600):
    g = torch.Generator().manual_seed(0)
    seqs = [{"tokens": torch.randint(0, vocab, (n,), generator=g).tolist(), "pixel_values": [], "grids": []}
            for n in (13, 21, 8)]
    return pack(seqs, pad_id=0, image_token_id=-1, rows=[0, 1, 2])


def _step(policy, batch):
    """Log-probs and every parameter gradient of one forward/backward; the activation bytes
    autograd saved."""
    saved = []
    policy.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lp, ent = policy(batch)
    (lp.sum() - 0.3 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    # Activations only: the weights are saved by reference in either forward.
    seen, nbytes = {p.untyped_storage().data_ptr() for p in policy.parameters()}, 0
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            nbytes += t.untyped_storage().nbytes()
    return lp.detach(), ent.detach(), grads, nbytes


def test_same_values_and_gradients_fewer_saved_bytes(tiny_processor):
    hf = build_tiny_model(seed=3, processor=tiny_processor)
    plain = PolicyModel(copy.deepcopy(hf), lean_activations=False)
    lean = PolicyModel(copy.deepcopy(hf))
    text = lean.hf.model.language_model
    layer = text.layers[0]
    for m in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm,
              layer.self_attn.k_norm, text.norm):
        assert "forward" in vars(m)                                   # instance forward, lean
    assert all("forward" not in vars(m) for m in lean.hf.model.visual.modules())   # vision left alone
    assert all("forward" not in vars(m) for m in plain.hf.modules())
    # Parameters and their names are the module's own: state dicts agree key for key.
    assert list(lean.state_dict()) == list(plain.state_dict())
    assert layer.mlp.down_proj.weight is dict(lean.named_parameters())[
        "hf.model.language_model.layers.0.mlp.down_proj.weight"]

    batch = _batch()
    lp0, e0, g0, saved0 = _step(plain, batch)
    lp1, e1, g1, saved1 = _step(lean, batch)
    torch.testing.assert_close(lp1, lp0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e1, e0, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g0.keys() and any("mlp.down_proj" in n for n in g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max()) + 1e-9, msg=n)
    assert saved1 < 0.75 * saved0, (saved1, saved0)

    # no_grad (rollout-side log-probs): HF's values exactly.
    with torch.no_grad():
        assert torch.equal(lean(batch)[0], plain(batch)[0])


def test_deepcopy_and_checkpointed_layers_keep_the_lean_forward(tiny_processor):
    hf = build_tiny_model(seed=4, processor=tiny_processor)
    lean = PolicyModel(hf)
    twin = copy.deepcopy(lean)
    mlp = twin.hf.model.language_model.layers[1].mlp
    assert mlp.forward.__self__ is mlp                                # rebound to the copy's module
    ref = shard(PolicyModel(copy.deepcopy(hf), lean_activations=False), Dist(), activation_checkpointing=False)
    ckpt = shard(twin, Dist(), activation_checkpointing=True)
    batch = _batch()
    lp0, _, g0, _ = _step(ref, batch)
    lp1, _, g1, _ = _step(ckpt, batch)
    torch.testing.assert_close(lp1, lp0, rtol=1e-6, atol=1e-6)
    names = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in g1.items()}
    assert names.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(names[n], g0[n], rtol=1e-4, atol=1e-5 * float(g0[n].abs().max()) + 1e-9, msg=n)
