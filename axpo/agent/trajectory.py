"""A rollout as tokens: everything the loss, AXPO and the diagnostics need, nothing re-rendered.

Token-in/token-out: `tokens` is the exact id sequence the policy saw and produced (prompt included).
Per token we keep whether the policy produced it (`loss_mask`), the behaviour log-prob and entropy of
sampled tokens, and for every tool call the index where its `<tool_call>` token starts: AXPO's cut
points. Images are kept in order with the token span of their pad run, so a prefix can be cut
without ever splitting an image from its pad tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ToolCallRecord:
    start: int                    # index in `tokens` of the <tool_call> token (AXPO's cut point)
    end: int                      # index one past </tool_call>
    name: str | None
    arguments: dict | None
    error: str | None             # None if the call ran fine, else the error kind


@dataclass
class ImageSpan:
    start: int                    # first <|image_pad|> token
    end: int                      # one past the last pad token
    grid_thw: tuple[int, int, int]
    from_tool: bool


@dataclass
class Trajectory:
    uid: str                      # unique per rollout
    sample_uid: str               # the question
    group: int                    # index of the question in the step (AXPO groups by it)
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)    # behaviour log-probs (0 for non-sampled)
    entropies: list[float] = field(default_factory=list)   # entropies at sampled positions (0 otherwise)
    images: list = field(default_factory=list)             # PIL images in order of appearance
    image_spans: list[ImageSpan] = field(default_factory=list)
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per image, processor output
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    turns: int = 0
    final_text: str = ""                                   # decoded text of the last assistant turn
    finished: bool = False        # produced a final answer (ended with <|im_end|>)
    truncated: bool = False       # hit a token or turn limit
    reward: float = 0.0
    # AXPO branches: the rollout they were cut from, where, and which branch set they belong to.
    parent_uid: str | None = None
    cut: int | None = None
    branch_set: int | None = None
    seq_id: int | None = None     # engine sequence id while live

    def append(self, ids: list[int], *, sampled: bool, logprobs: list[float] | None = None,
               entropies: list[float] | None = None) -> None:
        """Extend the per-token lists together. Non-sampled tokens (prompt, tool responses, and by
        default an AXPO branch's forced "<tool_call>") carry no loss; forced tokens that are to be
        trained are `sampled` with zero placeholders (recomputed before updates)."""
        self.tokens.extend(ids)
        self.loss_mask.extend([int(sampled)] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.entropies.extend(entropies if entropies is not None else [0.0] * len(ids))

    @property
    def used_tool(self) -> bool:
        return len(self.tool_calls) > 0

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)

    def image_grid_thw(self) -> torch.Tensor | None:
        if not self.image_spans:
            return None
        return torch.tensor([s.grid_thw for s in self.image_spans], dtype=torch.long)

    def pixel_values_cat(self) -> torch.Tensor | None:
        return torch.cat(self.pixel_values, 0) if self.pixel_values else None

    def check(self, image_token_id: int, merge_size: int = 2) -> None:
        """Invariants checked before every forward: aligned per-token lists, each image's pad run
        matches its grid, no pad token outside a span, tool-call cut points inside the response."""
        n = len(self.tokens)
        assert len(self.loss_mask) == len(self.logprobs) == len(self.entropies) == n, "unaligned lists"
        assert not any(self.loss_mask[: self.prompt_len]), "prompt tokens carry loss"
        assert len(self.image_spans) == len(self.pixel_values) == len(self.images), "image bookkeeping"
        covered = 0
        for span, pv in zip(self.image_spans, self.pixel_values):
            t, h, w = span.grid_thw
            assert span.end - span.start == t * h * w // merge_size**2, "pad count != grid size"
            assert pv.shape[0] == t * h * w, "pixel rows != grid size"
            assert all(tok == image_token_id for tok in self.tokens[span.start:span.end]), "span not pads"
            assert not any(self.loss_mask[span.start:span.end]), "image pads carry loss"
            covered += span.end - span.start
        assert sum(tok == image_token_id for tok in self.tokens) == covered, "pad outside any span"
        for call in self.tool_calls:
            assert self.prompt_len <= call.start < call.end <= n, "cut point outside the response"
