"""The policy forward used for training: backbone -> fused LM head -> per-token log-probs/entropies.

`PolicyModel` wraps the Hugging Face model so that FSDP2's root unit owns the LM head: the head's
weight is all-gathered once when the root forward starts and used whole by the chunked fused op
(`axpo.kernels.linear_logprob_entropy`), never once per chunk, and no `[tokens, vocab]` logits
tensor is ever built.

Batches are right-padded rows of whole trajectories (prompt + all turns, images included);
3-D M-RoPE positions come from the model's own `get_rope_index` via `mm_token_type_ids`.
A right-padded batch (every `pack`ed one) runs plain causal attention without the padding mask:
a real token attends only to earlier positions, all real, so its output is the masked forward's
(up to float order), while the SDPA kernel takes its causal path (it skips the upper triangle
instead of reading a [B, 1, L, L] mask). Positions of real tokens do not change either (pads
follow them); pad positions hold finite garbage, masked by every loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from axpo.kernels import linear_logprob_entropy


@dataclass
class PackedBatch:
    input_ids: torch.Tensor          # [B, L]
    attention_mask: torch.Tensor     # [B, L]
    mm_token_type_ids: torch.Tensor  # [B, L]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    rows: list[int]                  # index of each row's sequence in the caller's list
    right_padded: bool = False       # every row's real tokens come first (pack's batches)

    @property
    def targets(self) -> torch.Tensor:
        """Next-token targets aligned with positions 0..L-2."""
        return self.input_ids[:, 1:]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The batch on `device`. FSDP2 moves a forward's tensor arguments to the device, but it
        does not walk into a dataclass, so the policy moves its batch itself."""
        device = torch.device(device)
        if _on(self.input_ids, device):
            return self
        mv = (lambda t: None if t is None else t.to(device))
        return PackedBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.mm_token_type_ids),
                           mv(self.pixel_values), mv(self.image_grid_thw), self.rows, self.right_padded)


def _on(t: torch.Tensor, device: torch.device | str) -> bool:
    """`t` is on `device` ("cuda" matches any CUDA index, as torch's own placement does)."""
    d = torch.device(device)
    return t.device.type == d.type and (d.index is None or t.device.index == d.index)


def pack(seqs: list[dict], pad_id: int, image_token_id: int, rows: list[int],
         device: torch.device | str | None = None) -> PackedBatch:
    """seqs: dicts with `tokens` (list[int]), `pixel_values` (list of per-image tensors) and
    `grids` (list of (t, h, w)). Images are concatenated in row order, as the model expects.
    The index tensors are built directly on `device` (default CPU) from Python lists: one
    host-to-device copy each, and no CPU tensor left behind for a CUDA model to trip over."""
    L = max(len(s["tokens"]) for s in seqs)
    ids = [list(s["tokens"]) + [pad_id] * (L - len(s["tokens"])) for s in seqs]
    att = [[1] * len(s["tokens"]) + [0] * (L - len(s["tokens"])) for s in seqs]
    mm = [[int(t == image_token_id) * a for t, a in zip(r, m)] for r, m in zip(ids, att)]
    pv, grids = [], []
    for s in seqs:
        pv += list(s["pixel_values"])
        grids += [tuple(g) for g in s["grids"]]
    long = dict(dtype=torch.long, device=device)
    pixels = None
    if pv:
        pixels = torch.cat(pv, 0)
        if device is not None and not _on(pixels, device):
            pixels = pixels.to(device)
    return PackedBatch(torch.tensor(ids, **long), torch.tensor(att, **long), torch.tensor(mm, **long), pixels,
                       torch.tensor(grids, **long) if grids else None, rows, right_padded=True)


class PolicyModel(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        # Under FSDP every rank must run the vision tower in every forward (its parameters are
        # all-gathered inside it); set by distributed.shard.
        self.always_run_vision = False

    @property
    def backbone(self) -> nn.Module:
        return self.hf.model

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf.lm_head

    def forward(self, batch: PackedBatch, *, temperature: float = 1.0, return_entropy: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs of the next token (and entropies), shape [B, L-1]; padded positions
        hold garbage and must be masked by the caller. The batch is moved to the model's device."""
        batch = batch.to(self.lm_head.weight.device)
        kwargs = {}
        if batch.pixel_values is not None:
            kwargs = dict(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
        # A stale rope_deltas from a previous call must never shift positions: this is a fresh,
        # cache-free forward, so clear it and let get_rope_index compute positions from scratch.
        if hasattr(self.backbone, "rope_deltas"):
            self.backbone.rope_deltas = None
        # Right padding: causal attention alone gives real tokens the masked result (module doc).
        att = None if batch.right_padded else batch.attention_mask
        if self.always_run_vision and batch.pixel_values is None:
            # Text-only batch under FSDP: the vision tower still runs (on a dummy image, adding
            # exactly zero) and its output enters through the input embeddings, where image
            # features would, so every rank's collectives happen in the same order, forward and
            # backward. Text-only positions are plain aranges, which the model derives itself.
            embeds = self.backbone.get_input_embeddings()(batch.input_ids) + self._vision_zero()
            out = self.backbone(inputs_embeds=embeds, attention_mask=att, use_cache=False)
        else:
            out = self.backbone(input_ids=batch.input_ids, attention_mask=att,
                                mm_token_type_ids=batch.mm_token_type_ids, use_cache=False, **kwargs)
        hidden = out.last_hidden_state[:, :-1]
        logp, ent = linear_logprob_entropy(
            hidden, self.lm_head.weight, batch.targets, bias=self.lm_head.bias,
            temperature=temperature, return_entropy=return_entropy)
        # Clones: FSDP warns that in-place ops on a returned view would skip its backward hook.
        return logp.clone(), (ent.clone() if ent is not None else None)

    def _vision_zero(self) -> torch.Tensor:
        """Exactly zero, but computed through the vision tower on the smallest valid image (one
        merge window), so this rank takes part in the tower's FSDP collectives, forward and
        backward, like the ranks whose batch has images."""
        visual = self.backbone.visual
        c = visual.config
        # Shapes from the config only: touching the (sharded) weight outside its unit's forward
        # would trigger a DTensor collective on this rank alone.
        m = c.spatial_merge_size
        w = visual.patch_embed.proj.weight
        grid = torch.tensor([[1, m, m]], device=w.device)
        pixels = torch.zeros(m * m, c.in_channels * c.temporal_patch_size * c.patch_size ** 2,
                             device=w.device, dtype=w.dtype)
        feats = self.backbone.get_image_features(pixels, grid)
        total = sum(f.sum() for f in feats.pooler_output)
        total = total + sum(f.sum() for level in feats.deepstack_features for f in level)
        return total * 0.0
