"""Paged KV tensors sized from a memory plan, and the decode workspace that reads them.

`PagedKVCache` holds per layer one K and one V tensor of `num_blocks * block_size` slots
([slots, kv_heads, head_dim]); slot = block * block_size + offset, with block ids from the block
manager. Writes and reads go through index tensors built from the block tables, once per chunk or
step per layer (never per block).

Memory plan (`plan_kv_cache`, a pure function: usable with a model on the meta device). The engine
gets a byte budget: an explicit one, or a fraction of the device's free memory (like vLLM's
gpu_memory_utilization, but of the memory free when the engine is built), or on CPU a default.
A slice of it (`workspace_fraction`) bounds the decode workspaces; the rest is the KV pool, whose
token count follows from the bytes per token of the model (layers x 2 x KV heads x head_dim x
dtype size); `max_kv_tokens` only caps it. CUDA commits memory when a tensor is allocated, so
the pool must never be sized from a token count alone: 2,000,000 tokens of Qwen3-VL-8B are 295 GB.

`DecodeBatch` is the workspace of one `Engine.generate` call, bounded by the plan's workspace
bytes. Two layouts, chosen per call:
- dense (when it fits the bound): every row's KV that is not in a cascaded shared prefix (its
  private prefix, then the tokens decoded in this call) lives in a padded per-row buffer
  [rows, heads, rest + max_tokens, head_dim] that each step appends to, so decode never re-gathers
  the cache, and all rows attend together (fp32 on CPU: two batched GEMMs over the buffers and a
  softmax, faster there than the fused SDPA kernel at decode sizes; otherwise one SDPA call). Rows of a group that share a long prefix
  (`cascade_min_tokens` or more, as after `fork`/`fork_at` of a long context) attend to one
  contiguous copy of it instead of each holding its own (cascade attention, attention.py): the
  prefixes of all such groups sit in one padded tensor, so one batched call serves every group,
  and the two partial results are merged by their log-sum-exp. Below the threshold the extra
  calls cost more than the rows' own copies of a short prefix.
- paged (when it does not): nothing is copied; each step every row's keys are read from the pool
  through its slot table in chunks sized to the bound (flash-style running softmax). Slower on
  CPU, but the workspace no longer grows with context length x rows.
Finished rows are dropped by moving the last live rows into their places (only the moved rows
are copied, `bytes_moved` counts them); the caller follows the returned order. Shared blocks are
immutable while shared (a writer copies them first), so shared copies stay valid for the call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from axpo.rollout.attention import decode_attention, float_mask, merge_lse, partial_attention

DEFAULT_CPU_BUDGET_BYTES = 2 << 30    # CPU, no budget given: 2 GiB (pages commit lazily there)
DEFAULT_MEMORY_FRACTION = 0.3         # accelerators, no budget given: of the free device memory
DEFAULT_WORKSPACE_FRACTION = 0.1      # of the budget, for the decode workspaces
CASCADE_MIN_TOKENS = 128              # shared prefix length from which cascade attention pays (measured)


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV bytes of one token over all layers: layers x (K, V) x KV heads x head_dim x dtype size."""
    return num_layers * 2 * num_kv_heads * head_dim * dtype_size(dtype)


@dataclass(frozen=True)
class KVPlan:
    bytes_per_token: int
    block_size: int
    num_blocks: int
    budget_bytes: int        # pool + decode workspace
    workspace_bytes: int     # bound on one generate call's decode workspace
    source: str              # where the budget came from
    max_kv_tokens: int | None

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def pool_bytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    @property
    def capped(self) -> bool:
        """True when max_kv_tokens, not the budget, set the pool size."""
        return self.max_kv_tokens is not None and self.num_blocks == -(-self.max_kv_tokens // self.block_size)

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"KV pool {self.num_tokens} tokens ({self.num_blocks} blocks of {self.block_size}, "
                f"{self.bytes_per_token} B/token, {self.pool_bytes / gib:.2f} GiB) + decode workspace <= "
                f"{self.workspace_bytes / gib:.2f} GiB, from a budget of {self.budget_bytes / gib:.2f} GiB "
                f"({self.source})" + (f"; capped by max_kv_tokens={self.max_kv_tokens}" if self.capped else
                                      (f"; max_kv_tokens={self.max_kv_tokens} does not fit" if self.max_kv_tokens
                                       else "")))


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_device_bytes(device) -> int | None:
    """Free memory of a device: CUDA's mem_get_info, MemAvailable on CPU, None when unknown (meta)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type == "cpu":
        return _mem_available()
    return None


def plan_kv_cache(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int = 16,
                  max_kv_tokens: int | None = None, budget_bytes: int | None = None,
                  memory_fraction: float | None = None, free_bytes: int | None = None, device=None,
                  workspace_fraction: float = DEFAULT_WORKSPACE_FRACTION, workspace_bytes: int | None = None
                  ) -> KVPlan:
    """The KV pool and decode-workspace sizes for a byte budget. Pure unless the device's free
    memory has to be queried (`memory_fraction` without `free_bytes`).

    Budget: `budget_bytes` if given; else `memory_fraction` x free memory (`free_bytes`, or the
    device's); else on an accelerator DEFAULT_MEMORY_FRACTION of its free memory, and on CPU/meta
    DEFAULT_CPU_BUDGET_BYTES. `workspace_bytes` (default: `workspace_fraction` of the budget) bounds
    the decode workspace; the rest holds whole blocks of KV, at most `max_kv_tokens` tokens
    (rounded up to a block)."""
    if block_size <= 0:
        raise ValueError(f"plan_kv_cache: block_size must be positive, got {block_size}")
    if not 0 <= workspace_fraction < 1:
        raise ValueError(f"plan_kv_cache: workspace_fraction must be in [0, 1), got {workspace_fraction}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if budget_bytes is not None:
        budget, source = int(budget_bytes), "explicit byte budget"
    else:
        frac = memory_fraction
        if frac is None and dev.type not in ("cpu", "meta"):
            frac = DEFAULT_MEMORY_FRACTION
        if frac is not None:
            if not 0 < frac <= 1:
                raise ValueError(f"plan_kv_cache: memory_fraction must be in (0, 1], got {frac}")
            free = free_bytes if free_bytes is not None else free_device_bytes(dev)
            if free is None:
                raise ValueError(f"plan_kv_cache: free memory of {dev} unknown; pass free_bytes or budget_bytes")
            budget, source = int(frac * free), f"{frac:g} of {free / 2**30:.2f} GiB free on {dev.type}"
        else:
            budget, source = DEFAULT_CPU_BUDGET_BYTES, f"default {dev.type} budget"
    bpt = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
    workspace = int(budget * workspace_fraction) if workspace_bytes is None else int(workspace_bytes)
    if not 0 <= workspace < budget:
        raise ValueError(f"plan_kv_cache: workspace_bytes {workspace} must be in [0, budget {budget})")
    blocks = (budget - workspace) // (bpt * block_size)
    if max_kv_tokens is not None:
        if max_kv_tokens <= 0:
            raise ValueError(f"plan_kv_cache: max_kv_tokens must be positive, got {max_kv_tokens}")
        blocks = min(blocks, -(-max_kv_tokens // block_size))
    if blocks < 1:
        raise ValueError(f"plan_kv_cache: a budget of {budget} bytes ({source}) holds no block of {block_size} "
                         f"tokens at {bpt} bytes per token")
    return KVPlan(bpt, block_size, int(blocks), budget, workspace, source, max_kv_tokens)


def kv_geometry(model_or_config) -> dict:
    """num_layers / num_kv_heads / head_dim of a Hugging Face decoder (model or config; for a
    vision-language model its text config), for `plan_kv_cache`. Works on the meta device."""
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return dict(num_layers=cfg.num_hidden_layers, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                head_dim=head_dim)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        # Uninitialised: only written slots are ever read (on CPU, pages commit as they are used;
        # on CUDA the whole pool is committed here, which is why it is sized by the plan).
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def from_plan(cls, plan: KVPlan, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device):
        return cls(num_layers, plan.num_blocks, plan.block_size, num_kv_heads, head_dim, dtype, device)

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


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class DecodeBatch:
    """Decode workspace over rows already ordered by `plan_groups` (see the module docstring).
    `capacity`: tokens each row may still add in this call; `max_bytes`: the workspace bound
    (None: unbounded, dense); `mode`: force "dense" or "paged"."""

    def __init__(self, cache: PagedKVCache, slot_lists: list[torch.Tensor], groups: list[tuple[int, int, int]],
                 capacity: int, scale: float, num_q_heads: int, *, max_bytes: int | None = None,
                 cascade_min_tokens: int = CASCADE_MIN_TOKENS, mode: str | None = None):
        self.cache, self.scale = cache, scale
        self.num_layers = len(cache.k)
        self.device, self.dtype = cache.k[0].device, cache.k[0].dtype
        hkv, d = cache.k[0].shape[1:]
        self.hkv, self.d, self.g = hkv, d, num_q_heads // hkv
        b = self.n = len(slot_lists)
        self.bytes_moved = 0                      # workspace bytes copied to drop finished rows
        self.max_bytes = max_bytes
        lengths = [len(s) for s in slot_lists]
        elt = cache.k[0].element_size()
        per_tok = 2 * self.num_layers * hkv * d * elt
        shared_of = [0] * b
        casc = []                                 # (rows, shared tokens) of the cascaded groups
        for start, end, shared in groups:
            if end - start >= 2 and shared >= max(1, cascade_min_tokens):
                casc.append((range(start, end), shared))
                for r in range(start, end):
                    shared_of[r] = shared
        rest = [n - s for n, s in zip(lengths, shared_of)]
        cap = max(rest) + capacity
        self.dense_bytes = (b * cap + len(casc) * max((s for _, s in casc), default=0)) * per_tok
        if mode is None:
            mode = "dense" if max_bytes is None or self.dense_bytes <= max_bytes else "paged"
        if mode not in ("dense", "paged"):
            raise ValueError(f"DecodeBatch: mode must be 'dense' or 'paged', got {mode!r}")
        self.mode = mode
        if mode == "dense":
            self._init_dense(slot_lists, casc, shared_of, rest, cap)
        else:
            self._init_paged(slot_lists, lengths, capacity)
        self._step_tensors()

    # -- layouts ---------------------------------------------------------------------------------

    def _init_dense(self, slot_lists, casc, shared_of, rest, cap):
        dev, dtype, hkv, d, b = self.device, self.dtype, self.hkv, self.d, self.n
        self.group_of = [-1] * b                  # cascade group of each row position
        # Shared prefixes of all cascaded groups in one padded tensor per layer [groups, Hkv, S, D]
        # (padding zero and masked), so one batched call attends every group to its own prefix.
        self.shared_k, self.shared_v, self.shared_mask = [], [], None
        if casc:
            ng, smax = len(casc), max(sh for _, sh in casc)
            lens = torch.tensor([sh for _, sh in casc], device=dev)
            idx = torch.cat([slot_lists[rows[0]][:sh] for rows, sh in casc])
            gi_ = torch.repeat_interleave(torch.arange(ng, device=dev), lens)
            col = torch.cat([torch.arange(sh, device=dev) for _, sh in casc])
            for layer in range(self.num_layers):
                k, v = self.cache.gather(layer, idx)
                sk = torch.zeros(ng, hkv, smax, d, dtype=dtype, device=dev)
                sv = torch.zeros(ng, hkv, smax, d, dtype=dtype, device=dev)
                sk[gi_, :, col] = k
                sv[gi_, :, col] = v
                self.shared_k.append(sk)
                self.shared_v.append(sv)
            valid = torch.arange(smax, device=dev)[None, :] < lens[:, None]
            if not bool(valid.all()):
                self.shared_mask = float_mask(valid[:, None, None, :], dtype)
            for gi, (rows, _) in enumerate(casc):
                for r in rows:
                    self.group_of[r] = gi
        rest_slots = [s[shared_of[r]:] for r, s in enumerate(slot_lists)]
        flat = torch.cat(rest_slots) if rest_slots else torch.zeros(0, dtype=torch.long, device=dev)
        row = torch.repeat_interleave(torch.arange(b, device=dev), torch.tensor(rest, device=dev))
        col = torch.cat([torch.arange(n, device=dev) for n in rest])
        # Padding stays zero (finite): a masked score times a NaN value would still poison the matmul.
        self.rest_k, self.rest_v = [], []
        for layer in range(self.num_layers):
            bk = torch.zeros(b, hkv, cap, d, dtype=dtype, device=dev)
            bv = torch.zeros(b, hkv, cap, d, dtype=dtype, device=dev)
            if flat.numel():
                k, v = self.cache.gather(layer, flat)
                bk[row, :, col] = k
                bv[row, :, col] = v
            self.rest_k.append(bk)
            self.rest_v.append(bv)
        self.pos = list(rest)                     # where each row's next token goes in its buffer

    def _init_paged(self, slot_lists, lengths, capacity):
        dev, b = self.device, self.n
        self.group_of = [-1] * b
        self.shared_k, self.shared_v = [], []
        width = max(lengths) + capacity
        self.slots = torch.zeros(b, width, dtype=torch.long, device=dev)   # padding: slot 0, masked
        if sum(lengths):
            flat = torch.cat(slot_lists)
            row = torch.repeat_interleave(torch.arange(b, device=dev), torch.tensor(lengths, device=dev))
            col = torch.cat([torch.arange(n, device=dev) for n in lengths])
            self.slots[row, col] = flat
        self.pos = list(lengths)                  # key index of each row's next token
        # Keys per chunk such that one chunk's gathered K, V and fp32 scores fit the bound.
        elt = self.cache.k[0].element_size()
        per_key = b * self.hkv * (2 * self.d * elt + 3 * self.g * 4)
        self.chunk = max(1, (self.max_bytes or 1 << 62) // per_key)

    @property
    def nbytes(self) -> int:
        """Bytes held for the call (dense buffers and shared copies; the slot table and one chunk's
        temporaries when paged)."""
        if self.mode == "paged":
            elt = self.cache.k[0].element_size()
            t = min(self.chunk, self.slots.shape[1])
            return _nbytes([self.slots]) + self.n * self.hkv * t * (2 * self.d * elt + 3 * self.g * 4)
        return _nbytes(self.rest_k + self.rest_v + self.shared_k + self.shared_v)

    @property
    def size(self) -> int:
        return self.n

    def _step_tensors(self):
        """The per-step index tensors, rebuilt from the host positions (at the start and after
        rows are dropped; `advance` updates them in place)."""
        dev, n = self.device, self.n
        self._rows = torch.arange(n, device=dev)
        self._pos = torch.tensor(self.pos[:n], device=dev)            # where this step's token goes
        self._t = max(self.pos[:n]) + 1                               # keys to attend (incl. this token)
        self._mask = self._mask3 = None
        if self.mode == "paged":
            self._valid = torch.arange(self._t, device=dev)[None, :] <= self._pos[:, None]
            return
        # Flat row index of (row, head, pos) in a [rows * heads * cap, D] view of a buffer.
        hk, cap = self.hkv, self.rest_k[0].shape[2]
        heads = torch.arange(hk, device=dev)
        self._flat = ((self._rows[:, None] * hk + heads[None, :]) * cap + self._pos[:, None]).reshape(-1)
        # Rows of equal length need no mask; otherwise an additive mask over the whole capacity
        # (one column more: `advance` opens the column after a row's last write), sliced per step.
        self._ragged = min(self.pos[:n]) != self._t - 1
        if self._ragged:
            valid = torch.arange(cap + 1, device=dev)[None, :] <= self._pos[:, None]
            self._mask_buf = float_mask(valid[:, None, None, :], self.dtype)
            self._mask_base = self._rows * (cap + 1)
            self._mask = self._mask_buf[..., : self._t]
        self._casc = None
        if self.shared_k:
            # Per cascaded group its live rows, padded to the largest group with the group's
            # first live row (the padded queries' results are dropped).
            members = [[] for _ in range(self.shared_k[0].shape[0])]
            for p in range(n):
                if self.group_of[p] >= 0:
                    members[self.group_of[p]].append(p)
            width = max(len(m) for m in members)
            if width:
                grid = [m + [m[0] if m else 0] * (width - len(m)) for m in members]
                sel = [gi * width + j for gi, m in enumerate(members) for j in range(len(m))]
                rows = [p for m in members for p in m]
                self._casc = (torch.tensor(grid, device=dev).reshape(-1), width,
                              torch.tensor(sel, device=dev), torch.tensor(rows, device=dev))

    # -- per step --------------------------------------------------------------------------------

    def begin(self, slots: torch.Tensor) -> None:
        """This step's pool slots [n] (the runner writes the new KV there before attending)."""
        if self.mode == "paged":
            self.slots[self._rows, self._pos] = slots

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """This step's k/v [n, Hkv, D] at each row's end (paged: already in the pool)."""
        if self.mode == "dense":
            d = self.d
            self.rest_k[layer].view(-1, d).index_copy_(0, self._flat, k.reshape(-1, d))
            self.rest_v[layer].view(-1, d).index_copy_(0, self._flat, v.reshape(-1, d))

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [n, Hq, D] (this step's token of every row) -> attention output [n, Hq, D]."""
        n = q.shape[0]
        qg = q.view(n, self.hkv, self.g, self.d)
        if self.mode == "paged":
            return self._attend_paged(layer, qg).to(q.dtype).view(n, -1, self.d)
        t = self._t
        k, v = self.rest_k[layer][:n, :, :t], self.rest_v[layer][:n, :, :t]
        if self._casc is None:
            if q.device.type == "cpu" and q.dtype == torch.float32:
                return self._attend_bmm(qg, k, v).view(n, -1, self.d)
            return decode_attention(qg, k, v, self._mask, self.scale).view(n, -1, self.d)
        o, lse = partial_attention(qg, k, v, self._mask, self.scale)
        grid, width, sel, rows = self._casc
        ng, hkv, g, d = self.shared_k[0].shape[0], self.hkv, self.g, self.d
        qs = qg.index_select(0, grid).view(ng, width, hkv, g, d).transpose(1, 2).reshape(ng, hkv, width * g, d)
        o1, lse1 = partial_attention(qs, self.shared_k[layer], self.shared_v[layer], self.shared_mask, self.scale)
        o1 = o1.view(ng, hkv, width, g, d).transpose(1, 2).reshape(ng * width, hkv, g, d).index_select(0, sel)
        lse1 = lse1.view(ng, hkv, width, g).transpose(1, 2).reshape(ng * width, hkv, g).index_select(0, sel)
        merged = merge_lse(o1, lse1, o.index_select(0, rows), lse.index_select(0, rows))
        o = o.float().index_copy_(0, rows, merged)
        return o.to(q.dtype).view(n, -1, self.d)

    def _attend_bmm(self, qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense decode attention on CPU as two batched GEMMs over (row, KV head) and a softmax:
        k/v [n, Hkv, t, D] are slices of the row buffers, which merge to [n * Hkv, t, D] views
        (no copy); the scores start from the step's additive mask, expanded once per step and
        shared by every layer. Faster there than the fused SDPA kernel at decode sizes (G query
        heads per KV head against a short key range), and the same softmax attention; fp32 only
        (lower precisions keep SDPA, which accumulates the softmax in fp32)."""
        n, hkv, g, d = qg.shape
        t = k.shape[2]
        qb, kb, vb = qg.reshape(n * hkv, g, d), k.reshape(n * hkv, t, d), v.reshape(n * hkv, t, d)
        if self._mask is None:
            s = torch.bmm(qb, kb.transpose(1, 2)).mul_(self.scale)
        else:
            if self._mask3 is None:
                self._mask3 = self._mask.expand(n, hkv, g, t).reshape(n * hkv, g, t)
            s = torch.baddbmm(self._mask3, qb, kb.transpose(1, 2), alpha=self.scale)
        return torch.bmm(torch.softmax(s, -1), vb).view(n, hkv, g, d)

    def _attend_paged(self, layer: int, qg: torch.Tensor) -> torch.Tensor:
        """Running-softmax attention over chunks of keys gathered from the pool."""
        n, t = qg.shape[0], self._t
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        acc_o = acc_m = acc_l = None
        for c0 in range(0, t, self.chunk):
            c1 = min(t, c0 + self.chunk)
            idx = self.slots[:n, c0:c1].reshape(-1)
            k = kc.index_select(0, idx).view(n, c1 - c0, self.hkv, self.d).transpose(1, 2)
            v = vc.index_select(0, idx).view(n, c1 - c0, self.hkv, self.d).transpose(1, 2)
            valid = self._valid[:, c0:c1]
            # Unwritten slots may hold anything (NaN included): mask scores and zero values.
            v = v.masked_fill(~valid[:, None, :, None], 0)
            s = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(self.scale)
            s.masked_fill_(~valid[:, None, None, :], float("-inf"))
            m = s.amax(-1, keepdim=True)
            empty = torch.isinf(m)                                        # rows with no key in this chunk
            m_safe = m.masked_fill(empty, 0.0)
            p = (s - m_safe).exp_()
            l = p.sum(-1, keepdim=True)
            o = torch.matmul(p.to(v.dtype), v).float()
            if acc_o is None:
                acc_o, acc_m, acc_l = o, m, l        # chunk 0 holds key 0: valid for every row
                continue
            new_m = torch.maximum(acc_m, m)
            a_old = (acc_m - new_m).exp_()
            a_new = (m_safe - new_m).exp_().masked_fill_(empty, 0.0)
            acc_o = acc_o * a_old + o * a_new
            acc_l = acc_l * a_old + l * a_new
            acc_m = new_m
        return acc_o / acc_l

    def advance(self) -> None:
        """After all layers ran a step: every row's token is now part of its keys. Every row
        moves on by one, so the step tensors are updated in place (dense: the write positions,
        the flat write index, the mask's next column) rather than rebuilt."""
        self.pos = [p + 1 for p in self.pos[:self.n]]
        if self.mode == "paged":
            self._step_tensors()
            return
        self._pos += 1
        self._flat += 1
        self._t += 1
        if self._ragged:
            self._mask_buf.view(-1).index_fill_(0, self._mask_base + self._pos, 0.0)
            self._mask = self._mask_buf[..., : self._t]
            self._mask3 = None

    def keep(self, rows: list[int]) -> list[int]:
        """Drop finished rows (rows: the positions to keep). The last live rows move into the
        freed positions (only they are copied). Returns the new order: new position i holds the
        row that was at position order[i]."""
        n_new = len(rows)
        if n_new == self.n:
            return list(range(self.n))
        kept = set(rows)
        holes = [p for p in range(n_new) if p not in kept]
        movers = [p for p in rows if p >= n_new]
        order = list(range(n_new))
        for h, m in zip(holes, movers):
            order[h] = m
        if holes:
            ht = torch.tensor(holes, device=self.device)
            mt = torch.tensor(movers, device=self.device)
            bufs = [self.slots] if self.mode == "paged" else self.rest_k + self.rest_v
            for buf in bufs:
                moved = buf.index_select(0, mt)
                buf.index_copy_(0, ht, moved)
                self.bytes_moved += moved.numel() * moved.element_size()
        self.pos = [self.pos[o] for o in order]
        self.group_of = [self.group_of[o] for o in order]
        self.n = n_new
        self._step_tensors()
        return order
