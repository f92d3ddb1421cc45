"""Paged KV tensors, and the decode workspace that reads them through block tables.

`PagedKVCache` holds per layer one K and one V tensor of `num_blocks * block_size` slots
([slots, kv_heads, head_dim]); slot = block * block_size + offset, with block ids from the block
manager. Writes and reads go through index tensors built from the block tables, once per chunk or
step per layer (never per block).

`DecodeBatch` is the workspace of one `Engine.generate` call. Its rows are grouped by shared
prefix (rows whose block tables start with the same blocks, as after `fork`/`fork_at`); each
group's shared prefix KV is gathered once into a contiguous tensor and attended with one batched
matmul for all its rows (cascade attention, see attention.py). The rest of every row (its private
prefix, then the tokens decoded in this call) lives in a padded per-row buffer that each step
appends to, so decode never re-gathers the cache. Shared blocks are immutable while shared (a
writer copies them first), so the copies stay valid for the whole call.
"""

from __future__ import annotations

import torch

from axpo.rollout.attention import attend_rest, attend_shared, merge


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        # Uninitialised: only written slots are ever read (so pages are committed as they are used).
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [N, kv_heads, head_dim] into slots [N]."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer].index_select(0, slots), self.v[layer].index_select(0, slots)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Apply the block manager's copy-on-write (src, dst) pairs in every layer."""
        if not pairs:
            return
        dev = self.k[0].device
        src = torch.tensor([p[0] for p in pairs], device=dev)
        dst = torch.tensor([p[1] for p in pairs], device=dev)
        for t in self.k + self.v:
            blocks = t.view(self.num_blocks, self.block_size, *t.shape[1:])
            blocks.index_copy_(0, dst, blocks.index_select(0, src))


def plan_groups(tables: list[list[int]], lengths: list[int], block_size: int
                ) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Group rows that share leading blocks. Returns (row order, [(start, end, shared_tokens)]) over
    the reordered rows. A group is all rows with the same first block; its shared prefix is their
    longest common run of block ids, capped by the shortest row. Singletons share nothing (their
    whole KV goes to the per-row buffer, which batches them together)."""
    buckets: dict[object, list[int]] = {}
    for r, (table, n) in enumerate(zip(tables, lengths)):
        key = table[0] if n > 0 else ("empty", r)
        buckets.setdefault(key, []).append(r)
    order, groups = [], []
    for rows in buckets.values():
        shared = 0
        if len(rows) > 1:
            ts = [tables[r] for r in rows]
            lcp = 0
            while all(len(t) > lcp for t in ts) and all(t[lcp] == ts[0][lcp] for t in ts):
                lcp += 1
            shared = min(lcp * block_size, min(lengths[r] for r in rows))
        groups.append((len(order), len(order) + len(rows), shared))
        order.extend(rows)
    return order, groups


class DecodeBatch:
    """Decode workspace over rows already ordered by `plan_groups` (see the module docstring).
    `capacity` is the number of tokens each row may still add in this call."""

    def __init__(self, cache: PagedKVCache, slot_lists: list[torch.Tensor], groups: list[tuple[int, int, int]],
                 capacity: int, scale: float, num_q_heads: int):
        self.cache, self.scale = cache, scale
        self.num_layers = len(cache.k)
        dev, dtype = cache.k[0].device, cache.k[0].dtype
        hkv, d = cache.k[0].shape[1:]
        self.hkv, self.d, self.g = hkv, d, num_q_heads // hkv
        b = len(slot_lists)
        # Shared prefixes: one contiguous [Hkv, S, D] copy per group and layer.
        self.groups = []  # (start, end, [k per layer] | None, [v per layer] | None)
        rest_slots = []
        for start, end, shared in groups:
            pk = pv = None
            if shared > 0:
                idx = slot_lists[start][:shared]
                pk, pv = [], []
                for layer in range(self.num_layers):
                    k, v = cache.gather(layer, idx)
                    pk.append(k.transpose(0, 1).contiguous())
                    pv.append(v.transpose(0, 1).contiguous())
            self.groups.append([start, end, pk, pv])
            rest_slots.extend(s[shared:] for s in slot_lists[start:end])
        self.rest_len = [len(s) for s in rest_slots]
        cap = max(self.rest_len) + capacity
        # Valid entries only: padding stays zero (finite), since a masked score times a NaN value
        # would still poison the matmul.
        flat = torch.cat(rest_slots) if rest_slots else torch.zeros(0, dtype=torch.long, device=dev)
        row = torch.repeat_interleave(torch.arange(b, device=dev), torch.tensor(self.rest_len, device=dev))
        col = torch.cat([torch.arange(n, device=dev) for n in self.rest_len])
        self.rest_k, self.rest_v = [], []
        for layer in range(self.num_layers):
            bk = torch.zeros(b, hkv, cap, d, dtype=dtype, device=dev)
            bv = torch.zeros(b, hkv, cap, d, dtype=dtype, device=dev)
            if flat.numel():
                k, v = cache.gather(layer, flat)
                bk[row, :, col] = k
                bv[row, :, col] = v
            self.rest_k.append(bk)
            self.rest_v.append(bv)
        self._step_tensors()

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.rest_k + self.rest_v)
        for _, _, pk, pv in self.groups:
            if pk is not None:
                n += sum(t.numel() * t.element_size() for t in pk + pv)
        return n

    @property
    def size(self) -> int:
        return len(self.rest_len)

    def _step_tensors(self):
        dev = self.rest_k[0].device
        self._rows = torch.arange(len(self.rest_len), device=dev)
        self._pos = torch.tensor(self.rest_len, device=dev)          # where this step's token goes
        self._lens = self._pos + 1                                   # valid keys incl. this token
        self._t = max(self.rest_len) + 1

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """This step's k/v [B, Hkv, D] at each row's end."""
        self.rest_k[layer][self._rows, :, self._pos] = k
        self.rest_v[layer][self._rows, :, self._pos] = v

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D] (this step's token of every row) -> attention output [B, Hq, D]."""
        b = q.shape[0]
        qg = q.view(b, self.hkv, self.g, self.d)
        t = self._t
        o2, m2, l2 = attend_rest(qg, self.rest_k[layer][:, :, :t], self.rest_v[layer][:, :, :t], self._lens,
                                 self.scale)
        if all(pk is None for _, _, pk, _ in self.groups):
            return (o2 / l2).to(q.dtype).view(b, -1, self.d)
        out = torch.empty_like(o2)
        for start, end, pk, pv in self.groups:
            if pk is None:
                out[start:end] = o2[start:end] / l2[start:end]
                continue
            n = end - start
            qs = qg[start:end].permute(1, 0, 2, 3).reshape(self.hkv, n * self.g, self.d)
            o1, m1, l1 = attend_shared(qs, pk[layer], pv[layer], self.scale)
            back = lambda x: x.view(self.hkv, n, self.g, -1).permute(1, 0, 2, 3)  # noqa: E731
            out[start:end] = merge(back(o1), back(m1), back(l1), o2[start:end], m2[start:end], l2[start:end])
        return out.to(q.dtype).view(b, -1, self.d)

    def advance(self) -> None:
        """After all layers ran a step: every row's token is now part of its rest."""
        self.rest_len = [n + 1 for n in self.rest_len]
        self._step_tensors()

    def keep(self, rows: list[int]) -> None:
        """Drop finished rows (rows: the indices to keep, ascending)."""
        if len(rows) == self.size:
            return
        idx = torch.tensor(rows, device=self.rest_k[0].device)
        self.rest_k = [t.index_select(0, idx) for t in self.rest_k]
        self.rest_v = [t.index_select(0, idx) for t in self.rest_v]
        self.rest_len = [self.rest_len[r] for r in rows]
        kept = set(rows)
        groups, start = [], 0
        for s, e, pk, pv in self.groups:
            n = sum(1 for r in range(s, e) if r in kept)
            if n:
                groups.append([start, start + n, pk, pv])
                start += n
        self.groups = groups
        self._step_tensors()
