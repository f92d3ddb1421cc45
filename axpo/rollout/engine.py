"""The built-in rollout engine: token-in/token-out decoding over a paged KV cache with forking.

A sequence is a list of token ids, its image spans (which fix its M-RoPE positions) and its KV in
the paged cache, addressed through the block manager's table. `add`/`extend` prefill chunks
(prompts, tool responses with images), and `add_many`/`extend_many` those of several sequences
in packed forwards (a rollout's prompts, a turn's tool responses); `generate` decodes a batch
until every row stops; `fork`/`fork_at` create branches that share the KV of a prefix, so
resampling K continuations from a point of a finished rollout costs no prefill
(`stats["prefill_tokens"]` does not move).

State of a sequence. The last token of a sequence may be *pending*: sampled but not yet
forwarded (its KV is written by the next step that needs it: the next `generate` step, the
`extend` chunk it heads, or a fork of its full length). Otherwise the sequence holds the logits
predicting its next token, so e.g. all children of `fork_at(seq, t, n)` sample their first token
from one set of logits (computed once, reading the shared KV without writing) and then diverge.

Weights. `load_weights` bumps the weights version and clears cached logits; sequences prefilled
with older weights can then only be read (`tokens`) or freed, never extended or forked, so stale
KV cannot leak into a rollout of the new policy.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from axpo.rollout.block_manager import PoolExhaustedError, make_block_manager
from axpo.rollout.kv_cache import (
    CASCADE_MIN_TOKENS,
    DEFAULT_WORKSPACE_FRACTION,
    DecodeBatch,
    PagedKVCache,
    plan_groups,
    plan_kv_cache,
)
from axpo.rollout.positions import (
    add_chunk_spans,
    positions,
    span_containing,
    spans_before,
    text_position_delta,
)
from axpo.rollout.runner import ModelRunner
from axpo.rollout.sampling import Completion, Sampler, SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion"]

log = logging.getLogger(__name__)


# A packed prefill's attention scores (chunks x query heads x longest chunk x longest sequence) at
# most: the math path materialises them (512 MiB in fp32 at this bound).
PREFILL_BATCH_SCORES = 1 << 27


class _Chunk:
    """A checked chunk for a sequence: its pending head token(s), the chunk, the spans after it."""

    __slots__ = ("sid", "past", "head", "chunk", "spans", "pixel_values", "image_grid_thw")

    def __init__(self, sid, past, head, chunk, spans, pixel_values, image_grid_thw):
        self.sid, self.past, self.head, self.chunk, self.spans = sid, past, head, chunk, spans
        self.pixel_values, self.image_grid_thw = pixel_values, image_grid_thw

    @property
    def n(self) -> int:
        """Tokens this prefill forwards: the pending head and the chunk."""
        return len(self.head) + len(self.chunk)


class _Seq:
    __slots__ = ("tokens", "spans", "logits", "version", "pinned")

    def __init__(self, tokens, spans, logits, version, pinned=False):
        self.tokens: list[int] = tokens
        self.spans = spans                       # tuple[ImagePositions, ...]
        self.logits: torch.Tensor | None = logits
        self.version: int = version
        self.pinned: bool = pinned


class Engine:
    """Memory: the KV pool and the decode workspace are sized from a byte budget
    (kv_cache.plan_kv_cache): `kv_cache_bytes` if given, else `kv_memory_fraction` of the device's
    free memory (default 0.3 on an accelerator), else on CPU a 2 GiB default; `workspace_bytes`
    (default `workspace_fraction` of the budget) bounds one generate call's decode workspace, the
    rest is the pool, whose tokens `max_kv_tokens` caps (None: no cap). The plan is `self.kv_plan`
    and is logged. Decode: `cascade_min_tokens` is the shared-prefix length from which a group's
    rows attend to one copy of it; `workspace_mode` forces the "dense" or "paged" workspace layout
    (tests; default: dense when it fits the bound)."""

    def __init__(self, model, *, block_size: int = 16, max_kv_tokens: int | None = 65536,
                 kv_cache_bytes: int | None = None, kv_memory_fraction: float | None = None,
                 workspace_fraction: float = DEFAULT_WORKSPACE_FRACTION, workspace_bytes: int | None = None,
                 cascade_min_tokens: int = CASCADE_MIN_TOKENS, workspace_mode: str | None = None,
                 device=None, dtype=None):
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.eval()
        self.runner = ModelRunner(self.model)
        w = self.runner.param
        self.device, self.dtype = w.device, w.dtype
        self.kv_plan = plan_kv_cache(num_layers=len(self.runner.layers), num_kv_heads=self.runner.num_kv_heads,
                                     head_dim=self.runner.head_dim, dtype=self.dtype, block_size=block_size,
                                     max_kv_tokens=max_kv_tokens, budget_bytes=kv_cache_bytes,
                                     memory_fraction=kv_memory_fraction, device=self.device,
                                     workspace_fraction=workspace_fraction, workspace_bytes=workspace_bytes)
        plan = self.kv_plan
        (log.info if plan.capped or max_kv_tokens is None else log.warning)("rollout engine: %s", plan.describe())
        self.block_size = block_size
        self.cascade_min_tokens = cascade_min_tokens
        self.workspace_mode = workspace_mode    # None: dense when it fits the plan's bound; "dense"/"paged": forced
        self.bm = make_block_manager(plan.num_blocks, block_size)
        self.cache = PagedKVCache.from_plan(plan, len(self.runner.layers), self.runner.num_kv_heads,
                                            self.runner.head_dim, self.dtype, self.device)
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0                       # one past the largest id handed out
        self._version = 0
        self._count = dict(prefill_tokens=0, decode_tokens=0, sampled_tokens=0, decode_steps=0,
                           logit_forwards=0, forks=0, generate_calls=0, workspace_bytes_moved=0,
                           paged_decode_calls=0, batched_prefills=0)
        self._workspace_bytes = 0

    # -- sequences ---------------------------------------------------------------------------

    def add(self, token_ids: list[int], *, pixel_values=None, image_grid_thw=None) -> int:
        """A new sequence, prefilled (images get their 3-D positions); returns its id."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("add: empty token list")
        sid = self.bm.allocate(0)
        self._next_id = max(self._next_id, sid + 1)
        self._seqs[sid] = _Seq([], (), None, self._version)
        try:
            self._prefill(sid, ids, pixel_values, image_grid_thw, "add")
        except BaseException:
            self.bm.free(sid)
            del self._seqs[sid]
            raise
        return sid

    def extend(self, seq_id: int, token_ids: list[int], *, pixel_values=None, image_grid_thw=None) -> None:
        """Prefill a chunk continuing the sequence (tool response, forced tokens); images inside it
        get M-RoPE positions continuing the sequence's."""
        self._get(seq_id, "extend", write=True)
        ids = [int(t) for t in token_ids]
        if ids:
            self._prefill(seq_id, ids, pixel_values, image_grid_thw, "extend")

    def add_many(self, chunks: list[list[int]], mm: list[dict] | None = None) -> list[int]:
        """New sequences, prefilled together in packed forwards: the same sequences and logits as
        `add` of each (mm: per sequence {} or dict(pixel_values=..., image_grid_thw=...)).
        All or nothing: on an error no sequence is left behind."""
        mm = mm or [{}] * len(chunks)
        if len(mm) != len(chunks):
            raise ValueError(f"add_many: {len(chunks)} chunks but {len(mm)} image entries")
        chunks = [[int(t) for t in ids] for ids in chunks]
        if any(not ids for ids in chunks):
            raise ValueError("add_many: empty token list")
        sids = []
        try:
            for _ in chunks:
                sid = self.bm.allocate(0)
                sids.append(sid)
                self._next_id = max(self._next_id, sid + 1)
                self._seqs[sid] = _Seq([], (), None, self._version)
            self._prefill_many(list(zip(sids, chunks, mm)), "add_many")
        except BaseException:
            for sid in sids:
                self.bm.free(sid)
                del self._seqs[sid]
            raise
        return sids

    def extend_many(self, seq_ids: list[int], chunks: list[list[int]], mm: list[dict] | None = None) -> None:
        """`extend` of several distinct sequences in packed forwards (tool responses of a turn).
        Every chunk is checked before any is written."""
        seq_ids = list(seq_ids)
        mm = mm or [{}] * len(seq_ids)
        if not len(seq_ids) == len(chunks) == len(mm):
            raise ValueError(f"extend_many: {len(seq_ids)} sequences, {len(chunks)} chunks, {len(mm)} image entries")
        for sid in seq_ids:
            self._get(sid, "extend_many", write=True)
        items = [(sid, [int(t) for t in ids], m) for sid, ids, m in zip(seq_ids, chunks, mm) if len(ids)]
        if items:
            self._prefill_many(items, "extend_many")

    def generate(self, seq_ids: list[int], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Decode every sequence until it emits a stop token or reaches max_tokens, batched.
        Sampled tokens are appended to their sequences. Log-probs/entropies: see sampling.py."""
        seq_ids = list(seq_ids)
        if isinstance(params, SamplingParams):
            params = [params] * len(seq_ids)
        if len(params) != len(seq_ids):
            raise ValueError(f"generate: {len(seq_ids)} sequences but {len(params)} SamplingParams")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("generate: a sequence id is listed twice")
        if not seq_ids:
            return []
        for s in seq_ids:
            self._get(s, "generate", write=True)
        pending = [s for s in seq_ids if self._pending(s)]
        if pending and len(pending) < len(seq_ids):
            self._materialize(pending)          # uniform rows: all pending or none
        all_pending = len(pending) == len(seq_ids)
        self._count["generate_calls"] += 1

        batch, rows = self._decode_batch(seq_ids, capacity=max(p.max_tokens for p in params))
        by_id = dict(zip(seq_ids, range(len(seq_ids))))
        idx = [by_id[s] for s in rows]
        rparams = [params[i] for i in idx]
        sampler = Sampler(rparams, self.device)
        stops = [set(p.stop_token_ids) for p in rparams]
        limits = [p.max_tokens for p in rparams]
        seqs = [self._seqs[s] for s in rows]
        outs = [Completion([], [], [], "length") for _ in rows]
        active = list(range(len(rows)))         # batch position -> row
        if all_pending:
            logits = self._decode_step(batch, rows)
        else:
            logits = torch.stack([self._seqs[s].logits for s in rows])
        active_t = None                         # `active` as a tensor, rebuilt when rows finish
        try:
            while True:
                if active_t is None:
                    active_t = torch.tensor(active, device=self.device)
                toks, lps, ents = sampler.sample(logits, active_t)
                keep = []
                for j, r in enumerate(active):
                    s, out, tok = seqs[r], outs[r], toks[j]
                    s.tokens.append(tok)
                    s.logits = None
                    out.token_ids.append(tok)
                    out.logprobs.append(lps[j])
                    out.entropies.append(ents[j])
                    if tok in stops[r]:
                        out.finish_reason = "stop"
                    elif len(out.token_ids) < limits[r]:
                        keep.append(j)
                self._count["sampled_tokens"] += len(active)
                if not keep:
                    break
                if len(keep) < len(active):
                    order = batch.keep(keep)
                    active = [active[j] for j in order]
                    active_t = None
                logits = self._decode_step(batch, [rows[r] for r in active])
        finally:
            self._count["workspace_bytes_moved"] += batch.bytes_moved
        result = [None] * len(rows)
        for r, i in enumerate(idx):
            result[i] = outs[r]
        return result

    def fork(self, seq_id: int, n: int) -> list[int]:
        """n children sharing all of the sequence's KV (and its next-token logits)."""
        s = self._get(seq_id, "fork")
        if self._pending(seq_id):
            self._materialize([seq_id])
        return self._children(seq_id, self.bm.fork(seq_id, n), s.tokens, s.spans, s.logits)

    def fork_at(self, seq_id: int, num_tokens: int, n: int) -> list[int]:
        """n children sharing the KV of tokens [0, num_tokens) of a live or pinned (retained)
        sequence, without re-prefilling it. They all sample their first token from the logits at
        position num_tokens - 1, computed once."""
        s = self._get(seq_id, "fork_at")
        t = self._check_cut(s, num_tokens, "fork_at")
        logits = self._logits_at(seq_id, s, t)
        return self._children(seq_id, self.bm.fork_at(seq_id, t, n), s.tokens[:t], spans_before(s.spans, t), logits)

    def free(self, seq_id: int) -> None:
        if seq_id not in self._seqs:
            self.bm.free(seq_id)                # raises the manager's clear message
        if self._seqs[seq_id].pinned:
            raise ValueError(f"free: sequence {seq_id} is pinned; release it with unpin")
        self.bm.free(seq_id)
        del self._seqs[seq_id]

    def free_many(self, seq_ids: list[int]) -> None:
        """Free a batch of sequences at once (validated first: all or nothing)."""
        seq_ids = list(seq_ids)
        self.bm.free_many(seq_ids)
        for s in seq_ids:
            del self._seqs[s]

    def tokens(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id, "tokens", fresh=False).tokens)

    def positions(self, seq_id: int) -> torch.Tensor:
        """[3, len] M-RoPE positions of the sequence's tokens (text: all three equal)."""
        s = self._get(seq_id, "positions", fresh=False)
        return positions(s.spans, 0, len(s.tokens))

    def next_token_logits(self, seq_id: int) -> torch.Tensor:
        """fp32 logits [V] of the distribution of the sequence's next token."""
        s = self._get(seq_id, "next_token_logits")
        return self._logits_at(seq_id, s, len(s.tokens)).clone()

    # -- pinned prefixes -----------------------------------------------------------------------

    def pin(self, seq_id: int, num_tokens: int | None = None) -> int:
        """Retain tokens [0, num_tokens) of a sequence as a read-only sequence (its own id) that
        survives freeing the original; fork_at it to resample. Release with unpin."""
        s = self._get(seq_id, "pin")
        t = self._check_cut(s, len(s.tokens) if num_tokens is None else num_tokens, "pin")
        if t > self.bm.num_tokens(seq_id):
            self._materialize([seq_id])
        pid = self.bm.pin(seq_id, t)
        self._next_id = max(self._next_id, pid + 1)
        logits = s.logits if t == len(s.tokens) else None
        self._seqs[pid] = _Seq(s.tokens[:t], spans_before(s.spans, t), logits, s.version, pinned=True)
        return pid

    def unpin(self, pin_id: int) -> None:
        self.bm.unpin(pin_id)
        del self._seqs[pin_id]

    @contextlib.contextmanager
    def pinned(self, seq_id: int, num_tokens: int | None = None):
        """`with engine.pinned(seq, t) as prefix:` ... the prefix is unpinned on exit, always."""
        pid = self.pin(seq_id, num_tokens)
        try:
            yield pid
        finally:
            self.unpin(pid)

    # -- weights & stats -----------------------------------------------------------------------

    def load_weights(self, state_dict_or_model) -> None:
        """New policy weights (a state dict with the model's names, or a model). Clears cached
        logits and transformers' rope_deltas; existing sequences become read-only (stale)."""
        sd = state_dict_or_model
        if isinstance(sd, torch.nn.Module):
            sd = sd.state_dict()
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or ())
        missing = [k for k in missing if k not in tied]
        if unexpected or missing:
            raise ValueError(f"load_weights: unexpected keys {list(unexpected)[:5]}, missing keys {missing[:5]}")
        self._version += 1
        for s in self._seqs.values():
            s.logits = None
        if hasattr(getattr(self.model, "model", None), "rope_deltas"):
            self.model.model.rope_deltas = None

    @property
    def stats(self) -> dict:
        b = self.bm.stats()
        return dict(self._count, cow_copies=b["cow_copies"], blocks_used=b["blocks_used"],
                    blocks_total=b["blocks_total"], blocks_free=b["blocks_free"], sequences=b["sequences"],
                    pinned=b["pinned"], block_size=self.block_size, kv_cache_bytes=self.cache.nbytes,
                    kv_cache_tokens=self.kv_plan.num_tokens, workspace_limit_bytes=self.kv_plan.workspace_bytes,
                    workspace_bytes=self._workspace_bytes, weights_version=self._version,
                    block_manager=type(self.bm).__module__.split(".")[-1])

    # -- internals -------------------------------------------------------------------------------

    def _get(self, seq_id: int, op: str, *, write: bool = False, fresh: bool = True) -> _Seq:
        s = self._seqs.get(seq_id)
        if s is None:
            if 0 <= seq_id < self._next_id:
                raise ValueError(f"{op}: sequence {seq_id} was already freed")
            raise ValueError(f"{op}: unknown sequence {seq_id}")
        if fresh and s.version != self._version:
            raise ValueError(f"{op}: sequence {seq_id} was prefilled with older weights (load_weights was "
                             f"called since); free it")
        if write and s.pinned:
            raise ValueError(f"{op}: sequence {seq_id} is pinned (read-only); fork it to continue")
        return s

    def _pending(self, seq_id: int) -> bool:
        return self.bm.num_tokens(seq_id) < len(self._seqs[seq_id].tokens)

    @staticmethod
    def _check_cut(s: _Seq, t: int, op: str) -> int:
        if not 1 <= t <= len(s.tokens):
            raise ValueError(f"{op}: num_tokens {t} out of range [1, {len(s.tokens)}]")
        span = span_containing(s.spans, t)
        if span is not None:
            raise ValueError(f"{op}: token {t} is inside the image at tokens [{span.start}, {span.end}); "
                             "cut before or after the whole image")
        return t

    def _children(self, parent: int, ids: list[int], tokens, spans, logits) -> list[int]:
        version = self._seqs[parent].version
        for c in ids:
            self._seqs[c] = _Seq(list(tokens), spans, logits, version)
        if ids:
            self._next_id = max(self._next_id, max(ids) + 1)
        self._count["forks"] += len(ids)
        return ids

    def _logits_at(self, seq_id: int, s: _Seq, t: int) -> torch.Tensor:
        """Logits predicting token t (given tokens [0, t)) of a sequence, t <= len(tokens)."""
        if t > self.bm.num_tokens(seq_id):
            self._materialize([seq_id])
        if t == len(s.tokens) and s.logits is not None:
            return s.logits
        # One-token forward of token t-1 reading the KV of [0, t) from the cache, writing nothing.
        last = t - 1
        if any(sp.start <= last < sp.end for sp in s.spans):
            raise ValueError(f"cannot compute logits after image token {last}: fork before the image or after "
                             "the token that closes it")
        ids = torch.tensor([s.tokens[last]], device=self.device)
        slots = torch.tensor(self.bm.slots(seq_id, 0, t), device=self.device)
        pos = positions(s.spans, last, t).to(self.device)
        logits = self.runner.prefill(self.cache, ids, pos, slots, last, write=False)
        self._count["logit_forwards"] += 1
        if t == len(s.tokens):
            s.logits = logits
        return logits

    def _plan_chunk(self, sid: int, chunk: list[int], pixel_values, image_grid_thw, op: str) -> _Chunk:
        """Check a chunk for a sequence and work out its tokens and spans; changes nothing."""
        s = self._seqs[sid]
        past = self.bm.num_tokens(sid)
        head = s.tokens[past:]                       # the pending token, if any
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError(f"{op}: pass pixel_values and image_grid_thw together")
        grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
        if grids and not self.runner.is_vl:
            raise ValueError(f"{op}: images given but {type(self.model).__name__} is not a vision-language model")
        spans = add_chunk_spans(s.spans, len(s.tokens), chunk, self.runner.image_token_id, grids, self.runner.merge)
        if grids:
            want = sum(t * h * w for t, h, w in grids)
            if pixel_values.shape[0] != want:
                raise ValueError(f"{op}: pixel_values has {pixel_values.shape[0]} patches, the grids need {want}")
        return _Chunk(sid, past, head, chunk, spans, pixel_values if grids else None, image_grid_thw if grids else None)

    def _images(self, ids: torch.Tensor, heads: list[tuple[int, int]], pixel_values, image_grid_thw, op: str):
        """(image-token mask over ids, embeddings, DeepStack features), or None without images.
        heads: (start, length) of each pending head token run in ids (never image tokens)."""
        if pixel_values is None:
            return None
        embeds, deep = self.runner.image_features(pixel_values, image_grid_thw)
        mask = ids == self.runner.image_token_id
        for a, n in heads:
            mask[a:a + n] = False
        if embeds.shape[0] != int(mask.sum()):
            raise ValueError(f"{op}: Image features and image tokens do not match: {int(mask.sum())} tokens, "
                             f"{embeds.shape[0]} features")
        return mask, embeds, deep

    def _commit(self, c: _Chunk, logits: torch.Tensor) -> None:
        s = self._seqs[c.sid]
        s.logits = logits
        s.tokens.extend(c.chunk)
        s.spans = c.spans
        self._count["prefill_tokens"] += len(c.chunk)
        self._count["decode_tokens"] += len(c.head)

    def _prefill(self, sid: int, chunk: list[int], pixel_values, image_grid_thw, op: str) -> None:
        self._prefill_one(self._plan_chunk(sid, chunk, pixel_values, image_grid_thw, op), op)

    def _prefill_one(self, c: _Chunk, op: str) -> None:
        ids = torch.tensor(c.head + c.chunk, device=self.device)
        images = self._images(ids, [(0, len(c.head))], c.pixel_values, c.image_grid_thw, op)
        n = c.n
        self.cache.copy_blocks(self.bm.append(c.sid, n))
        slots = torch.tensor(self.bm.slots(c.sid, 0, c.past + n), device=self.device)
        pos = positions(c.spans, c.past, c.past + n).to(self.device)
        self._commit(c, self.runner.prefill(self.cache, ids, pos, slots, c.past, images=images))

    def _prefill_many(self, items: list[tuple[int, list[int], dict]], op: str) -> None:
        """Prefill chunks of several distinct sequences: all are checked before any is written,
        then they run in packed forwards (`ModelRunner.prefill_many`) of at most
        PREFILL_BATCH_SCORES attention scores each; the same KV and logits as one `_prefill` each."""
        if len({sid for sid, _, _ in items}) != len(items):
            raise ValueError(f"{op}: a sequence is listed twice")
        plans = [self._plan_chunk(sid, chunk, mm.get("pixel_values"), mm.get("image_grid_thw"), op)
                 for sid, chunk, mm in items]
        need = sum(self.bm.append_blocks_needed(c.sid, c.n) for c in plans)
        if need > self.bm.num_free_blocks:
            raise PoolExhaustedError(f"{op}: KV pool exhausted (need up to {need} blocks, "
                                     f"{self.bm.num_free_blocks} free); raise max_kv_tokens or free sequences")
        heads = self.runner.num_heads
        group: list[_Chunk] = []
        cmax = lmax = 0                             # the pack's longest chunk and sequence
        for c in plans + [None]:
            if c is not None:
                cm, lm = max(cmax, c.n), max(lmax, c.past + c.n)
                if not group or (len(group) + 1) * heads * cm * lm <= PREFILL_BATCH_SCORES:
                    group.append(c)
                    cmax, lmax = cm, lm
                    continue
            if len(group) == 1:
                self._prefill_one(group[0], op)
            elif group:
                self._prefill_group(group, op)
            group = [c]
            cmax, lmax = (c.n, c.past + c.n) if c is not None else (0, 0)

    def _prefill_group(self, group: list[_Chunk], op: str) -> None:
        ids, pos, new_slots, rows, heads, copies = [], [], [], [], [], []
        for c in group:
            copies += self.bm.append(c.sid, c.n)
        self.cache.copy_blocks(copies)
        for c in group:
            n = c.n
            heads.append((len(ids), len(c.head)))
            ids += c.head + c.chunk
            slots = self.bm.slots(c.sid, 0, c.past + n)
            new_slots += slots[c.past:]
            rows.append((c.past, n, slots))
            pos.append(positions(c.spans, c.past, c.past + n))
        ids_t = torch.tensor(ids, device=self.device)
        pv = [c.pixel_values for c in group if c.pixel_values is not None]
        grids = [c.image_grid_thw for c in group if c.image_grid_thw is not None]
        images = self._images(ids_t, heads, torch.cat(pv) if pv else None, torch.cat(grids) if grids else None, op)
        logits = self.runner.prefill_many(self.cache, ids_t, torch.cat(pos, 1).to(self.device),
                                          torch.tensor(new_slots, device=self.device), rows, images=images)
        for c, lg in zip(group, logits):
            self._commit(c, lg)
        self._count["batched_prefills"] += 1

    def _decode_batch(self, seq_ids: list[int], capacity: int) -> tuple[DecodeBatch, list[int]]:
        self.runner.prepare()
        tables = [self.bm.block_table(s) for s in seq_ids]
        lengths = [self.bm.num_tokens(s) for s in seq_ids]
        order, groups = plan_groups(tables, lengths, self.block_size)
        rows = [seq_ids[i] for i in order]
        slot_lists = [torch.tensor(self.bm.slots(s, 0, lengths[i]), dtype=torch.long, device=self.device)
                      for s, i in zip(rows, order)]
        batch = DecodeBatch(self.cache, slot_lists, groups, capacity, self.runner.scale, self.runner.num_heads,
                            max_bytes=self.kv_plan.workspace_bytes, cascade_min_tokens=self.cascade_min_tokens,
                            mode=self.workspace_mode)
        self._workspace_bytes = batch.nbytes
        self._count["paged_decode_calls"] += batch.mode == "paged"
        return batch, rows

    def _decode_step(self, batch: DecodeBatch, rows: list[int]) -> torch.Tensor:
        """Forward the pending token of every row (rows in the batch's order) -> logits [B, V]."""
        need = sum(self.bm.append_blocks_needed(s, 1) for s in rows)
        if need > self.bm.num_free_blocks:
            raise PoolExhaustedError(f"generate: KV pool exhausted (need up to {need} blocks, "
                                     f"{self.bm.num_free_blocks} free); raise max_kv_tokens or free sequences")
        ids, pos, slots, copies = [], [], [], []
        for sid in rows:
            s = self._seqs[sid]
            n = self.bm.num_tokens(sid)
            ids.append(s.tokens[n])
            pos.append(n + text_position_delta(s.spans))
            copies += self.bm.append(sid, 1)
            slots.append(self.bm.slots(sid, n, n + 1)[0])
        self.cache.copy_blocks(copies)
        ids_t, pos_t, slots_t = torch.tensor([ids, pos, slots], device=self.device)   # one host copy
        logits = self.runner.decode(self.cache, batch, ids_t, pos_t.expand(3, -1), slots_t,
                                    max_pos=max(pos) if pos else 0)   # host value: no device read
        self._count["decode_tokens"] += len(rows)
        self._count["decode_steps"] += 1
        return logits

    def _materialize(self, seq_ids: list[int]) -> None:
        """Forward the pending last token of these sequences, leaving them with next-token logits."""
        seq_ids = [s for s in seq_ids if self._pending(s)]
        if not seq_ids:
            return
        batch, rows = self._decode_batch(seq_ids, capacity=1)
        logits = self._decode_step(batch, rows)
        for sid, lg in zip(rows, logits):
            self._seqs[sid].logits = lg
