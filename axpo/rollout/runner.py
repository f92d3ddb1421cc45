"""Forward passes of a Hugging Face decoder over the paged KV cache.

We drive the model's own modules (token embedding, vision tower through `get_image_features`,
each decoder layer's norms / q,k,v,o projections / q_norm, k_norm / MLP, the rotary embedding,
DeepStack injection for image tokens, final norm, lm_head) and replace only attention, so results
match the model's own forward (tests/test_engine.py compares against it). Supported: Qwen3-VL
(3-D M-RoPE, DeepStack) and Llama-style causal LMs whose layers are
`x + attn(input_layernorm(x))`, `x + mlp(post_attention_layernorm(x))` (Llama, Qwen2, Qwen3, ...)
without sliding-window attention.

Decode of known layer types (standard RMSNorm, SiLU-gated MLP: Qwen3-VL, Qwen2/3, Llama, Mistral)
calls the layers' parameter tensors through functional ops (`F.rms_norm`, `F.linear`) instead of
the modules: the same math, without module dispatch, which at decode sizes costs as much as the
arithmetic. Any other layer type takes the module path. That path also runs q/k/v and gate/up as
one GEMM each (fused copies of the weights, re-derived when a parameter changes), q/k
normalisation and rotary on the q and k heads together, and reads cos/sin from a table the
model's own rotary module computed (text positions) instead of calling it every step: about 390
dispatched ops per decode step of the 4-layer tiny model instead of 546 (tests/test_decode_speed.py).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from axpo.rollout.attention import prefill_attention
from axpo.rollout.kv_cache import DecodeBatch, PagedKVCache


class ModelRunner:
    def __init__(self, model):
        self.model = model
        inner = model.model
        self.is_vl = hasattr(inner, "language_model") and hasattr(inner, "visual")
        self.text = inner.language_model if self.is_vl else inner
        self.lm_head = model.get_output_embeddings()
        cfg = self.text.config
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise NotImplementedError("sliding-window attention is not supported by the built-in engine")
        self.layers = list(self.text.layers)
        attn = self.layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise NotImplementedError(f"{type(attn).__name__} has no {name}: unsupported attention layout")
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            if not hasattr(self.layers[0], name):
                raise NotImplementedError(f"{type(self.layers[0]).__name__} has no {name}: unsupported layer layout")
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.scale = attn.scaling
        # The model's own rotary application (Qwen3-VL's interleaved M-RoPE is in the cos/sin).
        self.apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.image_token_id = getattr(model.config, "image_token_id", None) if self.is_vl else None
        self.merge = model.config.vision_config.spatial_merge_size if self.is_vl else 1
        self.fast = (_fast_layers(self.layers, self.num_heads, self.num_kv_heads, self.head_dim)
                     if type(self.text.norm).__name__ in _RMS_NORMS else None)
        self.fast_norm = _rms(self.text.norm) if self.fast is not None else None
        # Rotary tables for decode: rope types whose cos/sin depend on the position alone.
        rot = self.text.rotary_emb
        self._rope_static = getattr(rot, "rope_type", "default") in ("default", "linear", "llama3")
        self._rope_tab = None

    @property
    def param(self) -> torch.Tensor:
        return self.lm_head.weight

    # -- pieces ------------------------------------------------------------------------------

    def _rope(self, x: torch.Tensor, pos: torch.Tensor):
        """pos [3, B, L] M-RoPE positions (rows equal for text)."""
        return self.text.rotary_emb(x, pos if self.is_vl else pos[0])

    def _qkv(self, attn, h: torch.Tensor, cos, sin):
        """h [B, L, H] -> q [B, Hq, L, D], k/v [B, Hkv, L, D] with q/k norm and rotary applied."""
        shape = (*h.shape[:-1], -1, self.head_dim)
        q = attn.q_proj(h).view(shape)
        k = attn.k_proj(h).view(shape)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        return q, k, v

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.text.norm(x)).float()

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """(embeddings [N, H], DeepStack features per injected layer [N, H]) for all images."""
        out = self.model.model.get_image_features(pixel_values.to(self.param.device), grid_thw.to(self.param.device),
                                                  return_dict=True)
        embeds = torch.cat(out.pooler_output, 0)
        deep = [torch.cat(f, 0) for f in (out.deepstack_features or [])]
        return embeds, deep

    # -- forwards ----------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, cache: PagedKVCache, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, past: int,
                *, write: bool = True, images=None) -> torch.Tensor:
        """Forward a chunk of C tokens of one sequence at token indices past..past+C-1.

        ids [C]; pos [3, C]; slots [past + C]: the sequence's slots for tokens [0, past + C).
        write=False reads the chunk's own KV from the cache instead of writing it (the chunk was
        already prefilled: used for the logits at a fork point). images = (mask [C] bool,
        embeddings, DeepStack features). Returns the logits [V] of the last token (fp32)."""
        c = ids.shape[0]
        x = self.text.embed_tokens(ids)[None]
        if images is not None:
            mask, embeds, deep = images
            x[0, mask] = embeds.to(x.dtype)
        cos, sin = self._rope(x, pos[:, None, :])
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, cos, sin)
            if write:
                cache.write(i, slots[past:], k[0].transpose(0, 1), v[0].transpose(0, 1))
            if past == 0 and write:
                kk, vv = k, v
            else:
                kk, vv = cache.gather(i, slots)
                kk, vv = kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]
            o = prefill_attention(q, kk, vv, past, self.scale)
            x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, c, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if images is not None and i < len(deep):
                x[0, mask] = x[0, mask] + deep[i].to(x.dtype)
        return self._logits(x[0, -1])

    @torch.no_grad()
    def prefill_many(self, cache: PagedKVCache, ids: torch.Tensor, pos: torch.Tensor, new_slots: torch.Tensor,
                     rows: list[tuple[int, int, list[int]]], *, images=None) -> torch.Tensor:
        """Forward the chunks of several sequences at once, packed into one row of N tokens.

        ids [N]; pos [3, N]; new_slots [N]: where each chunk token's KV goes; rows: per sequence,
        in packing order, (past, C, slots of its tokens [0, past + C)). Every op but attention runs
        once over the N tokens (one GEMM per projection instead of one per sequence: at rollout
        sizes a sequence's prefill costs its op count, not its arithmetic). Attention: each
        chunk's queries against its own sequence's keys, causal from its `past`, padded to the
        longest chunk and sequence. images as in `prefill`, over the packed tokens. Returns the
        logits [R, V] of each chunk's last token (fp32)."""
        dev = ids.device
        x = self.text.embed_tokens(ids)[None]
        if images is not None:
            mask, embeds, deep = images
            x[0, mask] = embeds.to(x.dtype)
        cos, sin = self._rope(x, pos[:, None, :])
        r = len(rows)
        cmax = max(c for _, c, _ in rows)
        lmax = max(p + c for p, c, _ in rows)
        qidx, kv_slots, last, valid, start = [], [], [], [], 0
        for j, (past, c, slots) in enumerate(rows):
            qidx.append([start + min(i, c - 1) for i in range(cmax)])     # padding repeats the last query
            kv_slots.append(list(slots) + [slots[0]] * (lmax - len(slots)))  # padding: a written slot, masked
            valid.extend(range(j * cmax, j * cmax + c))
            start += c
            last.append(start - 1)
        qidx = torch.tensor(qidx, device=dev)
        kv_slots = torch.tensor(kv_slots, device=dev).view(-1)
        valid = torch.tensor(valid, device=dev)
        past_t = torch.tensor([p for p, _, _ in rows], device=dev)
        c_t = torch.tensor([c for _, c, _ in rows], device=dev)
        i = torch.minimum(torch.arange(cmax, device=dev)[None], c_t[:, None] - 1)       # [R, cmax]
        allow = torch.arange(lmax, device=dev)[None, None] <= (past_t[:, None] + i)[:, :, None]
        allow = allow[:, None]                                                        # [R, 1, cmax, lmax]
        hkv, d = self.num_kv_heads, self.head_dim
        for li, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, cos, sin)                         # [1, H*, N, D]
            cache.write(li, new_slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            kk, vv = cache.gather(li, kv_slots)
            kk = kk.view(r, lmax, hkv, d).transpose(1, 2)
            vv = vv.view(r, lmax, hkv, d).transpose(1, 2)
            qq = q[0][:, qidx].transpose(0, 1)                                        # [R, Hq, cmax, D]
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allow, scale=self.scale, enable_gqa=True)
            o = o.transpose(1, 2).reshape(r * cmax, -1).index_select(0, valid)        # [N, Hq * D]
            x = x + layer.self_attn.o_proj(o[None])
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if images is not None and li < len(deep):
                x[0, mask] = x[0, mask] + deep[li].to(x.dtype)
        return self._logits(x[0, last])

    @torch.no_grad()
    def decode(self, cache: PagedKVCache, batch: DecodeBatch, ids: torch.Tensor, pos: torch.Tensor,
               slots: torch.Tensor, max_pos: int | None = None) -> torch.Tensor:
        """One token per row: ids [B], pos [3, B], slots [B] (where each token's KV goes).
        `max_pos`: the largest position, known on the host (else read from `pos`: a device sync).
        Returns logits [B, V] (fp32)."""
        b = ids.shape[0]
        if self.fast is not None:
            x = self.text.embed_tokens(ids)                             # [B, H]
            batch.begin(slots)
            return self._decode_fast(cache, batch, x, *self._decode_rope(x, pos, max_pos), slots)
        x = self.text.embed_tokens(ids)[:, None]                       # [B, 1, H]
        cos, sin = self._rope(x, pos[:, :, None])
        batch.begin(slots)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, cos, sin)          # [B, H*, 1, D]
            k, v = k[:, :, 0], v[:, :, 0]
            cache.write(i, slots, k, v)
            batch.append(i, k, v)
            o = batch.attend(i, q[:, :, 0])                             # [B, Hq, D]
            x = x + layer.self_attn.o_proj(o.reshape(b, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        batch.advance()
        return self._logits(x[:, 0])

    # -- the functional decode path: weights, rotary tables ------------------------------------

    def prepare(self) -> None:
        """Before a decode call: rebuild the functional path's references if a module's parameter
        was replaced (`load_state_dict(assign=True)`, `.to()`), and re-derive its copies (fused
        q/k/v and gate/up weights, stacked q/k-norm weights) if a parameter changed in place."""
        if self.fast is None:
            return
        if not all(f.valid() for f in self.fast):
            self.fast = _fast_layers(self.layers, self.num_heads, self.num_kv_heads, self.head_dim)
        for f in self.fast:
            f.refresh()

    def _decode_rope(self, x: torch.Tensor, pos: torch.Tensor, max_pos: int | None = None):
        """cos [B, 1, D] and sin [B, 1, D] for rows at positions pos [3, B], the sine with
        rotate_half's sign folded in (`_rope_qk`). Text positions (the three M-RoPE rows equal, as
        the engine passes them: one row expanded) read a table the model's own rotary module
        computed, which is the same per-position arithmetic; anything else calls the module."""
        if self._rope_static and pos.stride(0) == 0:
            p = pos[0]
            n = (max_pos if max_pos is not None else int(p.max()) if p.numel() else 0) + 1
            if self._rope_tab is None or self._rope_tab[0].shape[0] < n:
                size = max(256, 1 << (n - 1).bit_length())
                ar = torch.arange(size, device=x.device)
                cos, sin = self._rope(x[:1, None], ar.expand(3, 1, -1))      # [1, size, D]
                self._rope_tab = (cos[0], _signed_sin(sin[0]))
            cos, sin = self._rope_tab
            return cos.index_select(0, p)[:, None], sin.index_select(0, p)[:, None]
        cos, sin = self._rope(x[:, None], pos[:, :, None])                   # [B, 1, D]
        return cos, _signed_sin(sin)

    def _decode_fast(self, cache, batch, x, cos, sin, slots) -> torch.Tensor:
        """`decode` with the layers' own parameters through functional ops: the same math as the
        modules (RMSNorm in fp32, the model's rotary, SiLU-gated MLP) without module dispatch.
        q/k/v come from one GEMM over the fused weights (`_Fast.refresh`), q and
        k are normalised and rotated together, gate and up come from one GEMM."""
        b, d, hq = x.shape[0], self.head_dim, self.num_heads
        for i, f in enumerate(self.fast):
            h = f.ln1(x)
            if f.wqkv is not None:
                qkv = F.linear(h, f.wqkv, f.bqkv)                           # [B, (Hq + 2 Hkv) D]
                qk = qkv[:, : f.nqk].view(b, -1, d)                         # [B, Hq + Hkv, D]
                v = qkv[:, f.nqk:].view(b, -1, d)                           # [B, Hkv, D]
            else:
                qk = torch.cat([F.linear(h, f.wq, f.bq), F.linear(h, f.wk, f.bk)], -1).view(b, -1, d)
                v = F.linear(h, f.wv, f.bv).view(b, -1, d)
            if f.wqk is not None:
                qk = F.rms_norm(qk.float(), (d,), None, f.eps_qk).to(x.dtype) * f.wqk
            qk = _rope_qk(qk, cos, sin)
            k = qk[:, hq:]
            cache.write(i, slots, k, v)
            batch.append(i, k, v)
            o = batch.attend(i, qk[:, :hq])                                 # [B, Hq, D]
            x = x + F.linear(o.reshape(b, -1), f.wo, f.bo)
            h = f.ln2(x)
            if f.wgu is not None:
                gu = F.linear(h, f.wgu)
                x = x + F.linear(F.silu(gu[:, : f.ni]) * gu[:, f.ni:], f.wd)
            else:
                x = x + F.linear(F.silu(F.linear(h, f.wg)) * F.linear(h, f.wu), f.wd)
        batch.advance()
        return self.lm_head(self.fast_norm(x)).float()


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with the first half negated: rotate_half(x) * sin == swap_halves(x) * signed sin,
    exactly (a sign flip is exact)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def _rope_qk(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """The transformers rotary application `x * cos + rotate_half(x) * sin` (the same products
    and sum, so the same rounding) on q and k heads at once."""
    half = x.shape[-1] // 2
    return (x * cos).add_(torch.cat((x[..., half:], x[..., :half]), -1).mul_(sin_signed))


# -- the functional decode path -------------------------------------------------------------------

# RMSNorms whose forward is exactly `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`.
_RMS_NORMS = {"Qwen3VLTextRMSNorm", "Qwen3RMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm"}
_MLPS = {"Qwen3VLTextMLP", "Qwen3MLP", "Qwen2MLP", "LlamaMLP", "MistralMLP"}
# Attentions whose projections, head layout (GQA: KV head j serves query heads j*G .. j*G+G-1) and
# rotary application (`x * cos + rotate_half(x) * sin`) the functional path reproduces.
_ATTENTIONS = {"Qwen3VLTextAttention", "Qwen3Attention", "Qwen2Attention", "LlamaAttention", "MistralAttention"}


class _rms:
    """A standard RMSNorm module as one fused op (fp32) or three (low precision, same rounding
    points as the module: normalise in fp32, cast, then scale)."""

    __slots__ = ("w", "eps", "shape")

    def __init__(self, norm):
        self.w, self.eps, self.shape = norm.weight, norm.variance_epsilon, (norm.weight.shape[-1],)

    def __call__(self, x):
        if x.dtype == torch.float32 and self.w.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.w, self.eps)
        return self.w * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


# Fused q/k/v and gate/up weights are copies (the model's parameters stay as they are: saving or
# moving the model is unaffected); above this size per model the layers keep separate GEMMs, which
# at such sizes cost the same (the fusion saves per-call overhead, not arithmetic).
FUSE_MAX_BYTES = 256 << 20


class _Fast:
    __slots__ = ("ln1", "ln2", "wq", "bq", "wk", "bk", "wv", "bv", "wqkv", "bqkv", "nqk", "qn", "kn", "wqk",
                 "eps_qk", "hq", "hkv", "wo", "bo", "wg", "wu", "wgu", "ni", "wd", "fuse", "params", "mods",
                 "versions")

    def valid(self) -> bool:
        """The modules still hold the parameters this layer was built from."""
        return all(getattr(mod, name) is p for (mod, name), p in zip(self.mods, self.params))

    def refresh(self) -> None:
        """Re-derive the copies (fused weights, the stacked q/k-norm weight [Hq + Hkv, D]) when a
        parameter changed in place since (its version counter moved: `load_state_dict`, an
        optimiser step, a copy into it)."""
        versions = [p._version if p is not None else 0 for p in self.params]
        if versions == self.versions:
            return
        with torch.no_grad():
            if self.fuse:
                self.wqkv = torch.cat([self.wq, self.wk, self.wv])
                self.bqkv = torch.cat([self.bq, self.bk, self.bv]) if self.bq is not None else None
                self.wgu = torch.cat([self.wg, self.wu])
            if self.qn is not None:
                d = self.qn.shape[-1]
                self.wqk = torch.cat([self.qn.expand(self.hq, d), self.kn.expand(self.hkv, d)])
        self.versions = versions


def _fast_layers(layers, num_heads: int, num_kv_heads: int, head_dim: int):
    """Per layer, the parameter tensors (references: `load_state_dict` copies into them in place)
    for the functional decode path, with q/k/v and gate/up fused (copies kept current by
    `_Fast.refresh`, below FUSE_MAX_BYTES), or None when a module is not one whose math it
    reproduces."""
    out, fused_bytes = [], 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        has_qk_norm = hasattr(attn, "q_norm")
        if has_qk_norm:
            norms += [attn.q_norm, attn.k_norm]
        if any(type(n).__name__ not in _RMS_NORMS for n in norms) or type(mlp).__name__ not in _MLPS:
            return None
        if type(attn).__name__ not in _ATTENTIONS:
            return None
        act = getattr(mlp, "act_fn", None)
        if type(act).__name__ not in ("SiLUActivation", "SiLU") or getattr(mlp, "down_proj", None) is None:
            return None
        if any(getattr(m, "bias", None) is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return None
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        biases = [m.bias for m in projs]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        if has_qk_norm and (attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon
                            or attn.q_norm.weight.shape != (head_dim,)):
            return None
        f = _Fast()
        f.ln1, f.ln2 = _rms(layer.input_layernorm), _rms(layer.post_attention_layernorm)
        f.hq, f.hkv = num_heads, num_kv_heads
        f.nqk = (num_heads + num_kv_heads) * head_dim
        f.wq, f.bq = attn.q_proj.weight, attn.q_proj.bias
        f.wk, f.bk = attn.k_proj.weight, attn.k_proj.bias
        f.wv, f.bv = attn.v_proj.weight, attn.v_proj.bias
        f.qn = attn.q_norm.weight if has_qk_norm else None
        f.kn = attn.k_norm.weight if has_qk_norm else None
        f.eps_qk = attn.q_norm.variance_epsilon if has_qk_norm else None
        f.wo, f.bo = attn.o_proj.weight, attn.o_proj.bias
        f.wg, f.wu, f.wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        f.ni = f.wg.shape[0]
        f.wqkv = f.bqkv = f.wgu = f.wqk = None
        mods = [(m, "weight") for m in projs] + [(m, "bias") for m in projs] + [
            (mlp.gate_proj, "weight"), (mlp.up_proj, "weight")]
        if has_qk_norm:
            mods += [(attn.q_norm, "weight"), (attn.k_norm, "weight")]
        # Checked for replacement too (the references above must stay the modules' own).
        mods += [(attn.o_proj, "weight"), (attn.o_proj, "bias"), (mlp.down_proj, "weight"),
                 (layer.input_layernorm, "weight"), (layer.post_attention_layernorm, "weight")]
        f.mods = mods
        f.params = [getattr(m, n) for m, n in mods]
        f.versions = None
        fused_bytes += sum(w.numel() * w.element_size() for w in (f.wq, f.wk, f.wv, f.wg, f.wu))
        out.append(f)
    for f in out:
        f.fuse = fused_bytes <= FUSE_MAX_BYTES
        f.refresh()
    return out
