"""Copy pre-training: the skill every built-in tool call needs, taught before SFT.

A tool call copies values from the question (numbers into `print(...)`, a cell into a box, a name
into a query) and the answer copies values out of the tool's output. A randomly initialised tiny
model learns copying far too slowly from a few thousand demonstrations, so its tool calls almost
never succeed and RL has no successful tool use to reinforce (measured in
`benchmarks/copy_probe.py` and the README). This stage trains on synthetic sequences
`prefix, span, gap, span` with the loss on the second span only:

- "fixed" layout: an 8-token span and the same 40-token gap every time (a copy at a fixed offset,
  what a fixed question template gives);
- "variable" layout: span length 4-16, a random 0-30-token gap (the copy must be found by content).

Steps alternate the two layouts. Sequences are made from (seed, step) alone, so a resumed run
replays them exactly. A real pretrained checkpoint can already copy: set `pretrain.steps: 0`.
"""

from __future__ import annotations

import random

import torch

SEQ_LEN = 96


class CopySequences:
    """Synthetic copy sequences over a tokenizer's ordinary (non-special) tokens."""

    def __init__(self, tokenizer, seq_len: int = SEQ_LEN):
        special = set(tokenizer.all_special_ids)
        self.ids = [i for i in range(len(tokenizer)) if i not in special]
        # Half the spans are digit strings: the values tool calls copy most.
        self.digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        self.seq_len = seq_len
        self.fixed_gap = [random.Random(5).choice(self.ids) for _ in range(40)]

    def make(self, rng: random.Random, size: int, layout: str) -> list[tuple[list[int], list[int]]]:
        """`size` (tokens, loss mask) pairs; the mask marks the copied span."""
        if layout not in ("fixed", "variable"):
            raise ValueError(f"copy layout must be 'fixed' or 'variable', got {layout!r}")
        out = []
        for _ in range(size):
            n = 8 if layout == "fixed" else rng.randint(4, 16)
            pool = self.digits if rng.random() < 0.5 else self.ids
            span = [rng.choice(pool) for _ in range(n)]
            gap = self.fixed_gap if layout == "fixed" else [rng.choice(self.ids) for _ in range(rng.randint(0, 30))]
            pre = [rng.choice(self.ids) for _ in range(rng.randint(0, 10))]
            seq = (pre + span + gap + span)[:self.seq_len]
            mask = ([0] * (len(pre) + n + len(gap)) + [1] * n)[:self.seq_len]
            out.append((seq, mask))
        return out

    def tensors(self, rng: random.Random, size: int, layout: str, pad_id: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """A right-padded [size, seq_len] batch of tokens and its loss mask."""
        rows = self.make(rng, size, layout)
        x = torch.full((size, self.seq_len), pad_id, dtype=torch.long)
        m = torch.zeros((size, self.seq_len), dtype=torch.long)
        for r, (seq, mask) in enumerate(rows):
            x[r, :len(seq)] = torch.tensor(seq)
            m[r, :len(mask)] = torch.tensor(mask)
        return x, m

    def step_batch(self, seed: int, step: int, size: int) -> list[tuple[list[int], list[int]]]:
        """The sequences of (0-based) step `step`: odd steps fixed-offset, even steps by content."""
        layout = "fixed" if step % 2 == 0 else "variable"
        return self.make(random.Random(seed * 1_000_003 + step), size, layout)

    def held_out(self, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Content-based copies from a seed no training step uses (the harder layout)."""
        return self.tensors(random.Random(999), size, "variable")


@torch.no_grad()
def copy_accuracy(model, x: torch.Tensor, m: torch.Tensor) -> float:
    """Teacher-forced argmax accuracy on the copied tokens (the first of which is unpredictable,
    so 1.0 is out of reach). `model`: a plain Hugging Face causal/image-text model."""
    pred = model(input_ids=x.to(model.device)).logits[:, :-1].argmax(-1).cpu()
    hit = m[:, 1:].bool()
    return ((pred == x[:, 1:]) & hit).sum().item() / hit.sum().item()
