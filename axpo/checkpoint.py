"""Checkpoints with torch.distributed.checkpoint (DCP): model and optimiser (sharded, loadable at
any world size), scheduler, per-rank RNG states, the training position (stage, step) and the config.
Layout: `<run>/checkpoints/step_<stage>_<N>/` plus a `latest` file naming the newest complete one.

A checkpoint is complete when its DCP metadata file (`.metadata`, written when every rank's shards
are) exists and its `meta.json` parses; `meta.json` is written after all ranks finished (atomically,
by rename), then `latest`, so a crash mid-save leaves an incomplete folder and an old `latest`.
`--resume` starts from the checkpoint `latest` names; if that is missing, empty or names an
incomplete or deleted folder, from the newest complete checkpoint, saying so; with no complete
checkpoint at all it is an error, never a silent fresh start.

Retention (`trainer.keep_last`): after each save only the newest `keep_last` complete checkpoints
are kept, plus the newest SFT one (RL's reference policy and benchmarks start from it); None or 0
keeps all.

`export_hf` writes the policy as a Hugging Face folder (safetensors + processor) that loads with
`AutoModelForImageTextToText.from_pretrained`.

`gathered_weights` streams the full (unsharded) weights of an FSDP2 model in buckets of a bounded
size: the rollout engine's weight sync and the export copy each piece into place, so no rank ever
holds a full state dict beside its model (one bucket, `bucket_bytes`, is the peak extra memory).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from axpo.distributed import Dist
from axpo.models import canonical_name, copy_nonpersistent_buffers

SYNC_BUCKET_BYTES = 512 * 2**20   # default bucket of `gathered_weights`


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


STAGE_ORDER = {"pretrain": 0, "sft": 1, "rl": 2}
DCP_METADATA = ".metadata"   # torch.distributed.checkpoint's FileSystemWriter writes it last
_NAME = re.compile(r"step_(pretrain|sft|rl)_(\d+)")


@contextlib.contextmanager
def _interrupts_surface():
    """Ctrl-C while DCP writes or reads: DCP catches every BaseException of a rank's part and
    re-raises it as a CheckpointException (with a multi-rank traceback), so the trainer's
    KeyboardInterrupt handling (one line naming the last complete checkpoint, exit 130) never saw
    it. Turn it back into the KeyboardInterrupt it was; the half-written folder has no meta.json,
    so it never counts as complete."""
    try:
        yield
    except CheckpointException as e:
        if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
            raise KeyboardInterrupt from e
        raise


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (or none exists); the message names the folder and the problem."""


def position(path: Path) -> tuple[int, int] | None:
    """(stage order, step) of a `step_<stage>_<N>` folder: the order checkpoints are made in."""
    m = _NAME.fullmatch(Path(path).name)
    return (STAGE_ORDER[m.group(1)], int(m.group(2))) if m else None


def problem(path: Path) -> str | None:
    """Why the checkpoint folder cannot be resumed from, or None when it is complete."""
    path = Path(path)
    if not path.is_dir():
        return "does not exist"
    if not (path / DCP_METADATA).exists():
        return f"has no {DCP_METADATA} (the DCP save did not finish)"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "has no meta.json (the save did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"has a meta.json that is not valid JSON ({type(e).__name__}: {e}; truncated?)"
    if not isinstance(meta, dict) or not isinstance(meta.get("stage"), str) or not isinstance(meta.get("step"), int):
        return "has a meta.json without 'stage' and 'step'"
    return None


def read_meta(path: Path) -> dict:
    why = problem(path)
    if why is not None:
        raise CheckpointError(f"checkpoint {path} {why}")
    return json.loads((Path(path) / "meta.json").read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, run_dir: str | Path, d: Dist, keep_last: int | None = None):
        if keep_last is not None and keep_last < 0:
            raise ValueError(f"trainer.keep_last must be >= 0 or null (0/null keeps all), got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.d = d
        self.keep_last = keep_last or None

    def _barrier(self):
        if self.d.enabled:
            dist.barrier()

    def checkpoints(self) -> list[Path]:
        """Every `step_<stage>_<N>` folder, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and position(p) is not None), key=position)

    def complete(self) -> list[Path]:
        return [p for p in self.checkpoints() if problem(p) is None]

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, if it is complete."""
        f = self.root / "latest"
        name = f.read_text().strip() if f.is_file() else ""
        return self.root / name if name and problem(self.root / name) is None else None

    def resume_point(self) -> tuple[Path, dict, str | None]:
        """(checkpoint, its meta, a note when it is not the one `latest` names) for --resume.
        Raises CheckpointError when there is no complete checkpoint."""
        f = self.root / "latest"
        name = f.read_text().strip() if f.is_file() else ""
        if name and problem(self.root / name) is None:
            return self.root / name, read_meta(self.root / name), None
        if not f.is_file():
            why = f"{f} is missing"
        elif not name:
            why = f"{f} is empty"
        else:
            why = f"{f} names {name}, which {problem(self.root / name)}"
        done = self.complete()
        if not done:
            found = self.checkpoints()
            what = ("; ".join(f"{p.name} {problem(p)}" for p in found) if found else
                    f"no checkpoint folders in {self.root}" if self.root.is_dir() else f"{self.root} does not exist")
            raise CheckpointError(
                f"--resume: no complete checkpoint to resume from ({what}). To start the run from scratch, "
                "leave out --resume (trainer.resume=false) or give a new --output-dir.")
        path = done[-1]
        return path, read_meta(path), f"--resume: {why}; resuming from {path}, the newest complete checkpoint"

    def save(self, model, optimizer, scheduler, *, stage: str, step: int, extra: dict | None = None) -> Path:
        path = self.root / f"step_{stage}_{step:06d}"
        if self.d.main:
            # A folder left by an earlier run or crash: its old meta.json must not make a partial
            # save look complete.
            (path / "meta.json").unlink(missing_ok=True)
        self._barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _interrupts_surface():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        torch.save(rng_state(), path / f"rng_rank{self.d.rank}.pt")
        self._barrier()
        if self.d.main:
            meta = {"stage": stage, "step": step, "world": self.d.world,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    **(extra or {})}
            _write_atomic(path / "meta.json", json.dumps(meta, indent=1))
            _write_atomic(self.root / "latest", path.name)
            self._prune(path)
        self._barrier()
        return path

    def _prune(self, current: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints up to `current` (which `latest` names)
        and the newest complete SFT one; delete the other folders older than `current`. Folders
        newer than `current` (left by an earlier, longer run) are left alone."""
        if self.keep_last is None:
            return
        pos = position(current)
        older = [p for p in self.checkpoints() if position(p) < pos]
        done = [p for p in older if problem(p) is None]
        keep = set(done[max(0, len(done) - (self.keep_last - 1)):]) if self.keep_last > 1 else set()
        sft = [p for p in self.complete() if p.name.startswith("step_sft_") and position(p) <= pos]
        if sft:
            keep.add(sft[-1])
        for p in older:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, model, optimizer, scheduler, path: Path | None = None) -> dict:
        if path is None:
            path = self.resume_point()[0]
        meta = read_meta(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _interrupts_surface():
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        rng = path / f"rng_rank{self.d.rank}.pt"
        if rng.exists() and meta.get("world") == self.d.world:
            set_rng_state(torch.load(rng, weights_only=False))
        return meta


def load_model_weights(model, path: str | Path) -> None:
    """Load only the model part of a DCP checkpoint (to evaluate it, or to start RL from it)."""
    state = {"model": get_model_state_dict(model)}
    with _interrupts_surface():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").exists()


def check_checkpoint_path(path: str | Path) -> Path:
    """`path` as a Path if it is a DCP checkpoint folder or a Hugging Face folder, else an error
    naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if not (is_hf_folder(p) or (p / DCP_METADATA).exists()):
        raise FileNotFoundError(f"{p} is neither a DCP checkpoint folder (no {DCP_METADATA}) nor a Hugging Face "
                                "folder (no config.json)")
    return p


def load_weights(module, path: str | Path, d: Dist, *, dtype: torch.dtype | None = None) -> None:
    """The one weight loader: a DCP checkpoint folder (its model part) or a Hugging Face folder into
    `module` (a PolicyModel or a bare model, FSDP2-sharded or not), used for `init_from`, the
    reference policy and evaluation. Every rank calls it. A Hugging Face folder is read on rank 0
    only (`from_pretrained`, in `dtype`) and broadcast tensor by tensor, each rank keeping its
    shard; names are matched through `models.canonical_name` on both paths."""
    from axpo.models import load_full_weights

    p = check_checkpoint_path(path)
    if not is_hf_folder(p):
        load_model_weights(module, p)
        return
    full = None
    if d.main:
        from transformers import AutoModelForImageTextToText

        full = AutoModelForImageTextToText.from_pretrained(str(p), **({"dtype": dtype} if dtype else {}))
    load_full_weights(module, full, d, buffers=False)


@torch.no_grad()
def copy_local_weights(dst, src) -> None:
    """`src`'s weights into `dst`, both sharded alike (same units, same ranks) or both unsharded:
    each rank copies its own shards, matched by canonical name (no collective)."""
    mine = {canonical_name(k): v for k, v in src.state_dict().items()}
    for k, v in dst.state_dict().items():
        w = mine[canonical_name(k)]
        (v.to_local() if hasattr(v, "to_local") else v).copy_(w.to_local() if hasattr(w, "to_local") else w)


def _row_layout(value, world: int):
    """For a DTensor sharded along dim 0 over a 1-D mesh of all ranks (FSDP2's layout): the
    (rows, global row offset) of every rank's local shard, as DTensor computes them; else None."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(value, DTensor) or value.dim() == 0 or value.device_mesh.ndim != 1:
        return None
    if value.device_mesh.size() != world or len(value.placements) != 1:
        return None
    pl = value.placements[0]
    if type(pl) is not Shard or pl.dim != 0:
        return None
    n = value.shape[0]
    layout = []
    for r in range(world):
        size, off = Shard.local_shard_size_and_offset(n, world, r)
        size = max(0, min(int(size), n - int(off)))
        layout.append((size, int(off)))
    me = dist.get_rank(value.device_mesh.get_group())
    if value.to_local().shape[0] != layout[me][0]:
        raise RuntimeError(f"unexpected FSDP2 shard: {tuple(value.to_local().shape)} on rank {me}, "
                           f"expected {layout[me][0]} rows of {tuple(value.shape)}")
    return layout


def gathered_weights(module, *, bucket_bytes: int = SYNC_BUCKET_BYTES):
    """Yield `(name, first_row, rows)` pieces that together make every entry of `module.state_dict()`
    in full (names canonical: no `hf.` prefix, no checkpoint wrapper): `full[name][first_row:first_row
    + len(rows)] = rows` (a 0-dim entry comes whole with first_row 0). Every rank must consume the
    whole stream (it runs collectives). Pieces are views into a reused buffer: copy them before
    asking for the next one.

    Dim-0-sharded DTensors (FSDP2) are gathered in buckets: each rank contributes row ranges of its
    local shards to one flat buffer (a tensor too large for a bucket is split by rows) and one
    all-gather fills `world` such buffers, so the extra memory is `bucket_bytes` (+1/world) whatever
    the model's size. Other DTensors are gathered whole (`full_tensor`), plain tensors are local."""
    enabled = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if enabled else 1
    pending: list[tuple] = []     # (name, local shard, layout, first local row, rows, slot offset)
    used = 0                      # elements per rank in the current bucket
    key = None                    # (dtype, device) of the current bucket
    cap = 0                       # elements per rank of a bucket of that dtype
    buffers: dict = {}            # one send and one receive buffer, reused by every bucket

    def flush():
        nonlocal pending, used
        if not pending:
            return
        if key not in buffers:
            buffers.clear()
            buffers[key] = (torch.empty(cap, dtype=key[0], device=key[1]),
                            torch.empty(world * cap, dtype=key[0], device=key[1]))
        send, recv = buffers[key]
        send, recv = send.narrow(0, 0, used), recv.narrow(0, 0, world * used)
        me = dist.get_rank()
        for name, local, layout, o, k, slot in pending:
            rest = local.shape[1:]
            have = max(0, min(k, layout[me][0] - o))
            if have:
                send.narrow(0, slot, have * math.prod(rest)).view(have, *rest).copy_(local.narrow(0, o, have))
        _all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        _all_gather(recv, send)
        items = pending
        pending, used = [], 0
        for name, local, layout, o, k, slot in items:
            rest = local.shape[1:]
            row = math.prod(rest)
            for r, (n_r, off_r) in enumerate(layout):
                have = max(0, min(k, n_r - o))
                if have:
                    piece = recv.narrow(0, r * (recv.numel() // world) + slot, have * row)
                    yield name, off_r + o, piece.view(have, *rest)

    for raw, value in module.state_dict().items():
        name = canonical_name(raw)
        layout = _row_layout(value, world) if enabled else None
        if layout is None:
            if hasattr(value, "full_tensor"):
                yield from flush()
                value = value.full_tensor()
            yield name, 0, value.detach()
            continue
        local = value.to_local().detach()
        row = math.prod(value.shape[1:])
        if key != (local.dtype, local.device) or row > cap:
            yield from flush()
            key = (local.dtype, local.device)
            cap = max(row, bucket_bytes // (world * local.element_size()))   # elements per rank, >= 1 row
            buffers.clear()
        rows_per_rank = max(n for n, _ in layout)
        o = 0
        while o < rows_per_rank:
            room = (cap - used) // row
            if room <= 0:
                yield from flush()
                continue
            k = min(room, rows_per_rank - o)
            pending.append((name, local, layout, o, k, used))
            used += k * row
            o += k
    yield from flush()


@torch.no_grad()
def copy_gathered_weights(module, targets: dict[str, torch.Tensor] | None, *,
                          bucket_bytes: int = SYNC_BUCKET_BYTES) -> None:
    """Gather `module`'s full weights piece by piece (`gathered_weights`) into `targets` (name ->
    tensor of the full shape, e.g. another model's `state_dict(keep_vars=True)`); every target must
    be filled and every name known. `targets=None`: only take part in the collectives (ranks that
    keep no copy)."""
    seen = set()
    for name, first, rows in gathered_weights(module, bucket_bytes=bucket_bytes):
        if targets is None:
            continue
        t = targets.get(name)
        if t is None:
            raise KeyError(f"weight {name} has no counterpart in the target model")
        t = t.data if isinstance(t, torch.nn.Parameter) else t
        (t.narrow(0, first, rows.shape[0]) if rows.dim() else t).copy_(rows)
        seen.add(name)
    if targets is not None and set(targets) - seen:
        raise KeyError(f"weights missing from the source model: {sorted(set(targets) - seen)[:5]}")


def export_hf(policy, processor, out_dir: str | Path, d: Dist, *,
              bucket_bytes: int = SYNC_BUCKET_BYTES) -> Path | None:
    """Gather the full weights (all ranks take part, bucket by bucket) into a fresh unsharded copy
    of the architecture on rank 0's CPU, which rank 0 writes as a Hugging Face folder."""
    out = Path(out_dir)
    hf = policy.hf if hasattr(policy, "hf") else policy
    fresh = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            fresh = type(hf)(hf.config)
        fresh.to_empty(device="cpu")
        copy_nonpersistent_buffers(fresh, hf)
    copy_gathered_weights(policy, fresh.state_dict(keep_vars=True) if fresh is not None else None,
                          bucket_bytes=bucket_bytes)
    if d.main:
        fresh.generation_config = hf.generation_config
        fresh.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        _readable(out)
    if d.enabled:
        dist.barrier()
    return out if d.main else None


def _readable(folder: Path) -> None:
    """Give the exported files the usual file mode (0666 minus the umask, 0644 by default):
    safetensors writes model.safetensors with mode 0600, which other users and serving
    containers then cannot read."""
    umask = _umask()
    for f in folder.iterdir():
        if f.is_file():
            f.chmod((stat.S_IMODE(f.stat().st_mode) | 0o666) & ~umask)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
