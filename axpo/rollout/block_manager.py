"""Block manager for the paged KV cache: block tables, reference counts, free list, copy lists.

Metadata only: the KV tensors live in PyTorch (`kv_cache.py`); the manager hands out block ids and
the (src, dst) block pairs to copy before a write. The C++ extension `axpo._C` implements it
(`csrc/block_manager.cpp`); without the extension (built with AXPO_NO_EXT=1, or forced off with
AXPO_FORCE_PY_BLOCK_MANAGER=1) the pure-Python `PyBlockManager` below is used, with a one-time
warning. Both behave identically, block ids included; the tests run both.

Semantics (after vLLM v0's block manager; `fork_at` is AXPO's truncate-then-fork):
- `allocate(n)`: a new sequence holding n tokens; returns its id. Ids are never reused.
- `append(seq, k)`: room for k more tokens. If the last block is partially filled and shared
  (refcount > 1), it is copied first and the (src, dst) pair returned: copy-on-write, lazily, so N
  branches sharing a block make at most N-1 copies (the last holder writes in place).
- `fork(seq, n)` / `fork_at(seq, t, n)`: n children sharing the blocks that cover tokens [0, t)
  (all tokens for `fork`). Allocates nothing, so it cannot run out of blocks.
- `free(seq)`: drop references; blocks at zero return to the free list. The free list is LIFO:
  the most recently freed block is reused first (its memory is the most likely to be cached).
- `pin(seq, t)` -> id of a read-only retained sequence holding tokens [0, t). Its blocks are never
  freed, reused or written until `unpin(id)`; it can be forked like any sequence.
Misuse (unknown sequence, double free, writing a pinned sequence, out-of-range counts) raises
ValueError; running out of blocks raises PoolExhaustedError (a RuntimeError) and leaves the
state unchanged.

Arguments are checked before any state changes, in both backends alike (same exception types and
messages; tests/test_block_manager.py drives both with the same hostile values):
- every integer argument must be an int (anything with `__index__`) and not a bool: TypeError;
- a count outside int64 is a ValueError ("does not fit in 64 bits"); a sequence id outside int64
  is an unknown sequence;
- num_blocks and block_size are in [1, 2^31), so slot ids fit in int64 and no count overflows;
- a token count needing more blocks than are free raises PoolExhaustedError whatever its size;
- a fork creates at most MAX_FORK_CHILDREN children, and at most MAX_SEQUENCES sequences live at
  once (reference counts are int32 in C++).
"""

from __future__ import annotations

import operator
import os
import warnings

__all__ = ["BlockManager", "PyBlockManager", "PoolExhaustedError", "HAS_C", "make_block_manager",
           "MAX_FORK_CHILDREN", "MAX_SEQUENCES"]

MAX_FORK_CHILDREN = 1 << 16    # children one fork / fork_at may create (BlockManager::kMaxForkChildren)
MAX_SEQUENCES = 2**31 - 1      # live sequences at once (BlockManager::kMaxSequences)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _index_arg(v, op: str, name: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be an integer, got bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer, got {type(v).__name__}") from None


def _int_arg(v, op: str, name: str) -> int:
    """A count or size: an int (not bool) that fits in int64, as the C++ binding requires."""
    v = _index_arg(v, op, name)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"{op}: {name} {v} does not fit in 64 bits")
    return v


def _seq_arg(v, op: str, name: str = "seq") -> int:
    """A sequence id: an int (not bool); one outside int64 cannot exist."""
    v = _index_arg(v, op, name)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"{op}: unknown sequence {v}")
    return v


class PyPoolExhaustedError(RuntimeError):
    """The pool has fewer free blocks than an operation needs."""


class _Seq:
    __slots__ = ("blocks", "num_tokens", "pinned")

    def __init__(self, blocks: list[int], num_tokens: int, pinned: bool = False):
        self.blocks = blocks
        self.num_tokens = num_tokens
        self.pinned = pinned


class PyBlockManager:
    """Pure-Python implementation with the interface of `axpo._C.BlockManager`."""

    def __init__(self, num_blocks: int, block_size: int):
        num_blocks = _int_arg(num_blocks, "BlockManager", "num_blocks")
        block_size = _int_arg(block_size, "BlockManager", "block_size")
        if not 0 < num_blocks < 2**31:
            raise ValueError(f"BlockManager: num_blocks must be in [1, 2^31), got {num_blocks}")
        if not 0 < block_size < 2**31:
            raise ValueError(f"BlockManager: block_size must be in [1, 2^31), got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # LIFO: pop() hands out 0, 1, 2, ...
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0
        self._stats = dict(allocations=0, forks=0, cow_copies=0, frees=0, pins=0)

    # -- helpers ---------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self._block_size)

    def _get(self, seq: int, op: str) -> _Seq:
        s = self._seqs.get(seq)
        if s is None:
            if 0 <= seq < self._next_id:
                raise ValueError(f"{op}: sequence {seq} was already freed")
            raise ValueError(f"{op}: unknown sequence {seq}")
        return s

    def _pop_free(self) -> int:
        b = self._free.pop()
        self._ref[b] = 1
        return b

    def _release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _fork(self, seq: int, num_tokens: int, n: int, op: str) -> list[int]:
        s = self._get(seq, op)
        if n < 0:
            raise ValueError(f"{op}: n must be >= 0, got {n}")
        if n > MAX_FORK_CHILDREN:
            raise ValueError(f"{op}: n must be <= {MAX_FORK_CHILDREN}, got {n}")
        if len(self._seqs) > MAX_SEQUENCES - n:
            raise ValueError(f"{op}: too many sequences ({len(self._seqs)} live, {n} more would pass "
                             f"{MAX_SEQUENCES})")
        if not 0 <= num_tokens <= s.num_tokens:
            raise ValueError(f"{op}: num_tokens {num_tokens} out of range [0, {s.num_tokens}] for sequence {seq}")
        shared = s.blocks[: self._blocks_for(num_tokens)]
        children = []
        for _ in range(n):
            for b in shared:
                self._ref[b] += 1
            cid = self._new_id()
            self._seqs[cid] = _Seq(list(shared), num_tokens)
            children.append(cid)
        self._stats["forks"] += n
        return children

    # -- operations ------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, num_tokens: int = 0) -> int:
        num_tokens = _int_arg(num_tokens, "allocate", "num_tokens")
        if num_tokens < 0:
            raise ValueError(f"allocate: num_tokens must be >= 0, got {num_tokens}")
        need = self._blocks_for(num_tokens)
        if need > len(self._free):
            raise PyPoolExhaustedError(f"allocate: pool exhausted (need {need} blocks, {len(self._free)} free)")
        if len(self._seqs) >= MAX_SEQUENCES:
            raise ValueError(f"allocate: too many sequences ({len(self._seqs)} live, 1 more would pass "
                             f"{MAX_SEQUENCES})")
        sid = self._new_id()
        self._seqs[sid] = _Seq([self._pop_free() for _ in range(need)], num_tokens)
        self._stats["allocations"] += 1
        return sid

    def append_blocks_needed(self, seq: int, k: int) -> int:
        seq = _seq_arg(seq, "append_blocks_needed")
        k = _int_arg(k, "append_blocks_needed", "k")
        s = self._get(seq, "append_blocks_needed")
        if k <= 0:
            return 0
        cow = s.num_tokens % self._block_size != 0 and self._ref[s.blocks[-1]] > 1
        return self._blocks_for(s.num_tokens + k) - len(s.blocks) + int(cow)

    def append(self, seq: int, k: int) -> list[tuple[int, int]]:
        seq, k = _seq_arg(seq, "append"), _int_arg(k, "append", "k")
        s = self._get(seq, "append")
        if s.pinned:
            raise ValueError(f"append: sequence {seq} is pinned (read-only); fork it to continue")
        if k < 0:
            raise ValueError(f"append: k must be >= 0, got {k}")
        if k == 0:
            return []
        cow = s.num_tokens % self._block_size != 0 and self._ref[s.blocks[-1]] > 1
        fresh = self._blocks_for(s.num_tokens + k) - len(s.blocks)
        need = fresh + int(cow)
        if need > len(self._free):
            raise PyPoolExhaustedError(f"append: pool exhausted (need {need} blocks, {len(self._free)} free)")
        copies = []
        if cow:
            src, dst = s.blocks[-1], self._pop_free()
            self._ref[src] -= 1
            s.blocks[-1] = dst
            copies.append((src, dst))
            self._stats["cow_copies"] += 1
        s.blocks.extend(self._pop_free() for _ in range(fresh))
        s.num_tokens += k
        return copies

    def fork(self, seq: int, n: int) -> list[int]:
        seq, n = _seq_arg(seq, "fork"), _int_arg(n, "fork", "n")
        return self._fork(seq, self._get(seq, "fork").num_tokens, n, "fork")

    def fork_at(self, seq: int, num_tokens: int, n: int) -> list[int]:
        seq = _seq_arg(seq, "fork_at")
        num_tokens, n = _int_arg(num_tokens, "fork_at", "num_tokens"), _int_arg(n, "fork_at", "n")
        return self._fork(seq, num_tokens, n, "fork_at")

    def free(self, seq: int) -> None:
        seq = _seq_arg(seq, "free")
        s = self._get(seq, "free")
        if s.pinned:
            raise ValueError(f"free: sequence {seq} is pinned; release it with unpin")
        self._release(s.blocks)
        del self._seqs[seq]
        self._stats["frees"] += 1

    def free_many(self, seqs: list[int]) -> None:
        seqs = [_seq_arg(s, "free_many") for s in seqs]
        seen = set()
        for seq in sorted(seqs):
            if seq in seen:
                raise ValueError(f"free_many: sequence {seq} listed twice")
            seen.add(seq)
            if self._get(seq, "free_many").pinned:
                raise ValueError(f"free_many: sequence {seq} is pinned; release it with unpin")
        for seq in seqs:
            self._release(self._seqs.pop(seq).blocks)
        self._stats["frees"] += len(seqs)

    def pin(self, seq: int, num_tokens: int) -> int:
        seq, num_tokens = _seq_arg(seq, "pin"), _int_arg(num_tokens, "pin", "num_tokens")
        pid = self._fork(seq, num_tokens, 1, "pin")[0]
        self._stats["forks"] -= 1  # a pin is not a fork
        self._seqs[pid].pinned = True
        self._stats["pins"] += 1
        return pid

    def unpin(self, pin_id: int) -> None:
        pin_id = _seq_arg(pin_id, "unpin", "pin_id")
        s = self._get(pin_id, "unpin")
        if not s.pinned:
            raise ValueError(f"unpin: sequence {pin_id} is not pinned")
        self._release(s.blocks)
        del self._seqs[pin_id]
        self._stats["frees"] += 1

    # -- queries ---------------------------------------------------------------------------

    def block_table(self, seq: int) -> list[int]:
        return list(self._get(_seq_arg(seq, "block_table"), "block_table").blocks)

    def slots(self, seq: int, start: int, end: int) -> list[int]:
        seq = _seq_arg(seq, "slots")
        start, end = _int_arg(start, "slots", "start"), _int_arg(end, "slots", "end")
        s = self._get(seq, "slots")
        if not 0 <= start <= end <= s.num_tokens:
            raise ValueError(f"slots: range [{start}, {end}) out of [0, {s.num_tokens}] for sequence {seq}")
        bs = self._block_size
        return [s.blocks[i // bs] * bs + i % bs for i in range(start, end)]

    def num_tokens(self, seq: int) -> int:
        return self._get(_seq_arg(seq, "num_tokens"), "num_tokens").num_tokens

    def has_sequence(self, seq: int) -> bool:
        return _index_arg(seq, "has_sequence", "seq") in self._seqs

    def is_pinned(self, seq: int) -> bool:
        return self._get(_seq_arg(seq, "is_pinned"), "is_pinned").pinned

    def sequence_ids(self) -> list[int]:
        return sorted(self._seqs)

    def ref_counts(self) -> list[int]:
        return list(self._ref)

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def stats(self) -> dict:
        return dict(blocks_total=self._num_blocks, blocks_free=len(self._free),
                    blocks_used=self._num_blocks - len(self._free), sequences=len(self._seqs),
                    pinned=sum(s.pinned for s in self._seqs.values()), **self._stats)


def _load_c():
    if os.environ.get("AXPO_FORCE_PY_BLOCK_MANAGER", "0") == "1":
        return None
    try:
        from axpo import _C
    except ImportError:
        return None
    return _C


_C = _load_c()
HAS_C = _C is not None
_warned = False

if HAS_C:
    BlockManager = _C.BlockManager
    PoolExhaustedError = _C.PoolExhaustedError
else:
    BlockManager = PyBlockManager
    PoolExhaustedError = PyPoolExhaustedError


def make_block_manager(num_blocks: int, block_size: int):
    """The C++ manager when the extension is built, else the Python one (warning once)."""
    global _warned
    if not HAS_C and not _warned:
        _warned = True
        warnings.warn("axpo._C is not available (built with AXPO_NO_EXT=1 or "
                      "AXPO_FORCE_PY_BLOCK_MANAGER=1): using the pure-Python block manager",
                      RuntimeWarning, stacklevel=2)
    return BlockManager(num_blocks, block_size)
