"""Checkpoints with torch.distributed.checkpoint (DCP): model and optimiser (sharded, loadable at
any world size), scheduler, per-rank RNG states, the training position (stage, step) and the config.
Layout: `<run>/checkpoints/step_<stage>_<N>/` plus a `latest` file naming the newest complete one
(written last, so a crash mid-save never points at a partial checkpoint).

`export_hf` writes the policy as a Hugging Face folder (safetensors + processor) that loads with
`AutoModelForImageTextToText.from_pretrained`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from axpo.distributed import Dist, full_state_dict


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Checkpointer:
    def __init__(self, run_dir: str | Path, d: Dist):
        self.root = Path(run_dir) / "checkpoints"
        self.d = d

    def _barrier(self):
        if self.d.enabled:
            dist.barrier()

    def latest(self) -> Path | None:
        f = self.root / "latest"
        if not f.exists():
            return None
        path = self.root / f.read_text().strip()
        return path if (path / "meta.json").exists() else None

    def save(self, model, optimizer, scheduler, *, stage: str, step: int, extra: dict | None = None) -> Path:
        path = self.root / f"step_{stage}_{step:06d}"
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        torch.save(rng_state(), path / f"rng_rank{self.d.rank}.pt")
        self._barrier()
        if self.d.main:
            meta = {"stage": stage, "step": step, "world": self.d.world,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    **(extra or {})}
            (path / "meta.json").write_text(json.dumps(meta, indent=1))
            (self.root / "latest").write_text(path.name)
        self._barrier()
        return path

    def load(self, model, optimizer, scheduler, path: Path | None = None) -> dict:
        path = path or self.latest()
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {self.root}")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = json.loads((path / "meta.json").read_text())
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        rng = path / f"rng_rank{self.d.rank}.pt"
        if rng.exists() and meta.get("world") == self.d.world:
            set_rng_state(torch.load(rng, weights_only=False))
        return meta


def load_model_weights(model, path: str | Path) -> None:
    """Load only the model part of a DCP checkpoint (to evaluate it, or to start RL from it)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def export_hf(policy, processor, out_dir: str | Path, d: Dist) -> Path | None:
    """Gather the full weights (all ranks take part) and let rank 0 write a Hugging Face folder."""
    sd = full_state_dict(policy)
    out = Path(out_dir)
    if d.main:
        hf = policy.hf if hasattr(policy, "hf") else policy
        out.mkdir(parents=True, exist_ok=True)
        # A fresh unsharded copy of the architecture receives the gathered weights.
        fresh = type(hf)(hf.config)
        missing, unexpected = fresh.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m or not hf.config.tie_word_embeddings]:
            raise RuntimeError(f"export: missing {missing[:5]} unexpected {unexpected[:5]}")
        fresh.generation_config = hf.generation_config
        fresh.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
    if d.enabled:
        dist.barrier()
    return out if d.main else None
