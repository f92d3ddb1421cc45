"""Micro-batches bounded by a token budget (padded rows x longest row), so a batch's memory is
predictable whatever the mix of short and long trajectories, and grouped by length so that little
compute goes to padding.

A micro-batch costs its padded tokens (rows x longest row: every row is computed to the longest)
plus a fixed `overhead` per forward/backward pass (launches, Python, FSDP's per-pass weight
gathers). Over the rows sorted by length, the split into consecutive groups with the least total
cost under the budget is found exactly (a dynamic program; for this cost some optimal split always
groups consecutive sorted rows). Example (AXPO mode, 64 rows: 60 of at most 90 tokens, 4 two-turn
rows of 175-217): one micro-batch computes 64 x 217 = 13,888 tokens, the split 60 x 90 + 4 x 217
6,268. How rows are split does not change the step (the token-mean is global); only float order.
"""

from __future__ import annotations

import numpy as np

# Fixed cost of one micro-batch, in padded tokens: a few ms of pass overhead on a small model, far
# less than the padding a mixed-length batch wastes, and more than the few padded tokens a split
# of near-equal lengths would save.
DEFAULT_OVERHEAD_TOKENS = 1024


def micro_batches(lengths: list[int], budget: int, overhead: int = DEFAULT_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices (by ascending length) split into groups whose `len(group) * max_len` stays within
    `budget`, minimising the sum over groups of `len(group) * max_len + overhead`; a row longer
    than the budget goes alone. Ties go to fewer, larger groups."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: lengths[i])
    ln = np.array([lengths[i] for i in order], dtype=np.int64)
    # best[i]: least cost of the first i sorted rows; cut[i]: where the last group starts.
    best = np.zeros(n + 1, dtype=np.float64)
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        longest = int(ln[i - 1])
        k = max(1, budget // max(1, longest))          # rows a group ending at row i may hold
        j = np.arange(max(0, i - k), i)                 # candidate starts
        cost = best[j] + (i - j) * longest + overhead
        a = int(np.argmin(cost))                        # first minimum: the earliest start (largest group)
        best[i], cut[i] = cost[a], j[a]
    out, i = [], n
    while i > 0:
        out.append(order[cut[i]:i])
        i = int(cut[i])
    return out[::-1]
