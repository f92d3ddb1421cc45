"""The training row: one token sequence with its images, as the policy packs it.

Every path into the policy (pre-training sequences, SFT demonstrations, RL rollouts) hands rows
to `policy.pack` and to micro-batching. They used to be untyped dicts
`{"tokens", "pixel_values", "grids"}`; `TrainingRow` is that record with its invariants checked
once. It still reads like the dict (`row["tokens"]`), so code written against dicts (pack,
axpo/update.py) takes either while callers move over.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

_FIELDS = ("tokens", "pixel_values", "grids", "prompt_len")


@dataclass
class TrainingRow:
    tokens: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)   # one [patches, dim] tensor per image
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # one (t, h, w) patch grid per image
    # Leading tokens that name the row's group for shared-prefix training (`policy.shared_prefix`):
    # a demonstration's system turn; None shares with no one.
    prompt_len: int | None = None

    def __post_init__(self) -> None:
        if len(self.pixel_values) != len(self.grids):
            raise ValueError(f"training row: {len(self.pixel_values)} pixel tensors for {len(self.grids)} image grids")
        for k, (pv, g) in enumerate(zip(self.pixel_values, self.grids)):
            if pv.shape[0] != g[0] * g[1] * g[2]:
                raise ValueError(f"training row: image {k} has {pv.shape[0]} patches, its grid {tuple(g)} "
                                 f"needs {g[0] * g[1] * g[2]}")

    def __len__(self) -> int:
        return len(self.tokens)

    # Dict-style reads, for code that still takes the old dicts.
    def __getitem__(self, key: str):
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return [f.name for f in fields(self)]

    @classmethod
    def of_trajectory(cls, t) -> TrainingRow:
        """An RL rollout (axpo.agent.trajectory.Trajectory)."""
        return cls(list(t.tokens), list(t.pixel_values), [tuple(s.grid_thw) for s in t.image_spans])

    @classmethod
    def of_demo(cls, e) -> TrainingRow:
        """An encoded SFT demonstration (axpo.sft.EncodedDemo)."""
        return cls(list(e.tokens), list(e.pixel_values), [tuple(g) for g in e.grids], e.system_len)
