"""Process group and FSDP2 sharding.

Order of parallelisms: data parallel only (FSDP2 = ZeRO-3 style sharding over all ranks). Each
decoder layer and the vision encoder is one `fully_shard` unit; the root unit (embeddings, final
norm, LM head) is not resharded after forward, so the fused head uses the gathered LM-head weight
for the whole micro-batch. gloo on CPU, nccl on GPU; bf16 mixed precision on GPU only.

Works as a single process too (`python axpo/train.py`): then there is no process group and the
model is left unsharded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init() -> Dist:
    device = torch.device("cpu")
    if "WORLD_SIZE" not in os.environ:   # plain `python axpo/train.py`: no process group
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
        return Dist(device=device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, device)


def close(barrier: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def shard(policy: nn.Module, d: Dist, *, mixed_precision: bool, activation_checkpointing: bool) -> nn.Module:
    """FSDP2-shard a `PolicyModel` (see axpo/policy.py) in place and return it."""
    hf = policy.hf
    layers = hf.model.language_model.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if not d.enabled:
        return policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    kw = {"mesh": mesh}
    if mixed_precision and d.device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kw)
    if getattr(hf.model, "visual", None) is not None:
        fully_shard(hf.model.visual, **kw)
        policy.always_run_vision = True
    fully_shard(policy, reshard_after_forward=False, **kw)
    return policy


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank gets the full (unsharded) weights: gather each DTensor first, then return plain
    tensors with the Hugging Face names (the `hf.` prefix and checkpoint-wrapper names removed).
    Used for the rollout engine's weight sync and for the Hugging Face export."""
    out = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        name = name.replace("_checkpoint_wrapped_module.", "")
        if name.startswith("hf."):
            name = name[3:]
        out[name] = value.detach()
    return out


def all_reduce_mean(values: dict[str, float], d: Dist) -> dict[str, float]:
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / d.world for k, v in zip(keys, t.tolist())}


def all_reduce_sum(x: float, d: Dist) -> float:
    if not d.enabled:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(x: int, d: Dist) -> int:
    if not d.enabled:
        return x
    t = torch.tensor([int(x)], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def even_batches(batches: list[list[int]], d: Dist) -> list[tuple[list[int], bool]]:
    """FSDP all-gathers parameters inside every forward, so all ranks must run the same number of
    forwards. Ranks with fewer micro-batches repeat their last one as a dummy (flag False: its loss
    is multiplied by zero). Returns (indices, real) pairs."""
    n = all_reduce_max(len(batches), d)
    out = [(b, True) for b in batches]
    while len(out) < n:
        out.append((batches[-1] if batches else [], False))
    return out


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out
