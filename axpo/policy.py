"""The policy forward used for training: backbone -> fused LM head -> per-token log-probs/entropies.

`PolicyModel` wraps the Hugging Face model so that FSDP2's root unit owns the LM head: the head's
weight is all-gathered once when the root forward starts and used whole by the chunked fused op
(`axpo.kernels.linear_logprob_entropy`), never once per chunk, and no `[tokens, vocab]` logits
tensor is ever built.

Batches are right-padded rows of whole trajectories (prompt + all turns, images included);
3-D M-RoPE positions come from the model's own `get_rope_index` via `mm_token_type_ids`.
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

    @property
    def targets(self) -> torch.Tensor:
        """Next-token targets aligned with positions 0..L-2."""
        return self.input_ids[:, 1:]


def pack(seqs: list[dict], pad_id: int, image_token_id: int, rows: list[int]) -> PackedBatch:
    """seqs: dicts with `tokens` (list[int]), `pixel_values` (list of per-image tensors) and
    `grids` (list of (t, h, w)). Images are concatenated in row order, as the model expects."""
    L = max(len(s["tokens"]) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    pv, grids = [], []
    for i, s in enumerate(seqs):
        n = len(s["tokens"])
        ids[i, :n] = torch.tensor(s["tokens"], dtype=torch.long)
        att[i, :n] = 1
        pv += list(s["pixel_values"])
        grids += [tuple(g) for g in s["grids"]]
    mm = (ids == image_token_id).long() * att
    return PackedBatch(ids, att, mm, torch.cat(pv, 0) if pv else None,
                       torch.tensor(grids, dtype=torch.long) if grids else None, rows)


class PolicyModel(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    @property
    def backbone(self) -> nn.Module:
        return self.hf.model

    @property
    def lm_head(self) -> nn.Linear:
        return self.hf.lm_head

    def forward(self, batch: PackedBatch, *, temperature: float = 1.0, return_entropy: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs of the next token (and entropies), shape [B, L-1]; padded positions
        hold garbage and must be masked by the caller."""
        kwargs = {}
        if batch.pixel_values is not None:
            kwargs = dict(pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw)
        # A stale rope_deltas from a previous call must never shift positions: this is a fresh,
        # cache-free forward, so clear it and let get_rope_index compute positions from scratch.
        if hasattr(self.backbone, "rope_deltas"):
            self.backbone.rope_deltas = None
        out = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            mm_token_type_ids=batch.mm_token_type_ids, use_cache=False, **kwargs)
        hidden = out.last_hidden_state[:, :-1]
        logp, ent = linear_logprob_entropy(
            hidden, self.lm_head.weight, batch.targets, bias=self.lm_head.bias,
            temperature=temperature, return_entropy=return_entropy)
        return logp, ent
