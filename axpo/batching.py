"""Micro-batches bounded by a token budget (padded rows x longest row), in the caller's order, so
a batch's memory is predictable whatever the mix of short and long trajectories."""

from __future__ import annotations


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Greedy split of indices (sorted by length, so padding stays small) into groups whose
    `len(group) * max_len` stays within `budget`; a row longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and m * (len(cur) + 1) > budget:
            out.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        out.append(cur)
    return out
