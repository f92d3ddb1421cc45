"""Rank-0 loading and the bucketed engine sync, measured (run by tests/test_rank0_load.py):

    torchrun --nproc_per_node=2 tests/scripts/rank0_load.py MODEL_DIR OUT_DIR [BUCKET_BYTES]

Phase "load": what `Trainer.__init__` does for the policy (axpo.models.load_on_rank0 -> FSDP2
shard of the meta skeleton -> materialize -> load_full_weights). Phase "sync": a rank without a
loaded model allocates its engine copy from the skeleton and fills it with
`copy_gathered_weights` (what `Trainer.sync_engine` does); phase "resync": the same again, as
after every optimiser step; then the engine copy is released (`release_storage`, what
`Trainer.release_engine_weights` does), restored and synced once more. Each phase's peak RSS increase (VmHWM,
reset through /proc/self/clear_refs before the phase) goes to OUT_DIR/rank<r>.json, with the
checks against a plain `from_pretrained`: every local shard equals its rows of the reference, the
non-persistent buffers equal the reference's, and the synced full copy equals it.
"""

import ctypes
import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := current RSS
    return rss_kb("VmRSS")


def main(model_dir: str, out_dir: str, bucket_bytes: int) -> None:
    from axpo import distributed
    from axpo.checkpoint import copy_gathered_weights
    from axpo.models import (build_meta_model, canonical_name, load_full_weights, load_on_rank0, materialize,
                             nonpersistent_buffers, release_storage, restore_storage)
    from axpo.policy import PolicyModel

    d = distributed.init()
    out = {"rank": d.rank, "world": d.world}
    # Warm-up out of the measured phases: the first use of transformers' Qwen3-VL classes, the
    # processor and DCP's state-dict helpers imports ~100 MB of modules, which scales with nothing.
    from torch.distributed.checkpoint.state_dict import set_model_state_dict  # noqa: F401
    from transformers import AutoModelForImageTextToText

    from axpo.models import load_processor

    build_meta_model(model_dir, dtype=torch.float32)
    load_processor(model_dir)
    dist.barrier()
    before = reset_peak()
    full, skeleton, _ = load_on_rank0(model_dir, d, dtype=torch.float32)
    policy = distributed.shard(PolicyModel(skeleton), d, activation_checkpointing=False)
    materialize(policy, d.device)
    load_full_weights(policy, full, d)
    out["load_peak_increase_bytes"] = (rss_kb("VmHWM") - before) * 1024
    out["shard_bytes"] = sum(p.to_local().numel() * p.element_size() for p in policy.parameters())
    del full
    dist.barrier()

    # Engine copy of a rank without a loaded model, filled bucket by bucket.
    engine_model = None
    before = reset_peak()
    if not d.main:
        engine_model = build_meta_model(model_dir, dtype=torch.float32)
        materialize(engine_model, d.device, buffers_from=policy)
    copy_gathered_weights(policy, engine_model.state_dict(keep_vars=True) if engine_model is not None else None,
                          bucket_bytes=bucket_bytes)
    out["sync_peak_increase_bytes"] = (rss_kb("VmHWM") - before) * 1024
    dist.barrier()
    # Every later sync: the copy exists, only the buckets come and go.
    before = reset_peak()
    copy_gathered_weights(policy, engine_model.state_dict(keep_vars=True) if engine_model is not None else None,
                          bucket_bytes=bucket_bytes)
    out["resync_peak_increase_bytes"] = (rss_kb("VmHWM") - before) * 1024
    dist.barrier()
    # Released while the policy trains (Trainer.release_engine_weights), refilled by the next sync.
    if engine_model is not None:
        before = rss_kb("VmRSS")
        handle = release_storage(engine_model)
        # glibc keeps freed heap chunks mapped (the engine's tensors are heap chunks once its mmap
        # threshold has grown); malloc_trim hands them back so RSS shows what was freed.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out["release_rss_drop_bytes"] = (before - rss_kb("VmRSS")) * 1024
        out["released_bytes"] = sum(n for _, n in handle)
        restore_storage(handle)
    copy_gathered_weights(policy, engine_model.state_dict(keep_vars=True) if engine_model is not None else None,
                          bucket_bytes=bucket_bytes)
    dist.barrier()

    # Checks against a plain from_pretrained (after the measurements).
    ref = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    ref_sd = ref.state_dict()
    out["full_bytes"] = sum(v.numel() * v.element_size() for v in ref_sd.values())
    out["largest_tensor_bytes"] = max(v.numel() * v.element_size() for v in ref_sd.values())
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    bad = []
    for name, v in policy.state_dict().items():
        r = ref_sd[canonical_name(name)]
        if hasattr(v, "to_local"):
            shape, offset = compute_local_shape_and_global_offset(r.shape, v.device_mesh, v.placements)
            r = r[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
            v = v.to_local()
        if not torch.equal(v, r):
            bad.append(name)
    ref_buf = nonpersistent_buffers(ref)
    bufs = nonpersistent_buffers(policy)
    out["buffers"] = sorted(bufs)
    bad += [f"buffer {k}" for k, b in bufs.items() if not torch.equal(b, ref_buf[k])]
    if engine_model is not None:
        bad += [f"engine {k}" for k, v in engine_model.state_dict().items() if not torch.equal(v, ref_sd[k])]
        eb = nonpersistent_buffers(engine_model)
        bad += [f"engine buffer {k}" for k, b in eb.items() if not torch.equal(b, ref_buf[k])]
    out["mismatches"] = bad
    Path(out_dir, f"rank{d.rank}.json").write_text(json.dumps(out, indent=1))
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 16 * 2**20)
