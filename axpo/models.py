"""Model and processor loading: `"tiny"` builds the built-in model (axpo/tiny.py); any other name is
a hub id or a local folder, loaded through `AutoModelForImageTextToText` / `AutoProcessor`.

Loading at scale (`load_on_rank0`, `materialize`, `load_full_weights`): only rank 0 reads the
weights (one full CPU copy); every rank builds the same architecture on the meta device (no
memory), shards it with FSDP2, allocates only its shards (`to_empty`) and receives them from rank
0 (`set_model_state_dict(..., broadcast_from_rank0=True)`, one tensor at a time). Non-persistent
buffers (the rotary `inv_freq` of the vision tower and of the text model) are in no state dict: they
are copied from rank 0's loaded model and broadcast.

The chat format lives in axpo/chat_format.py and the tiny builder in axpo/tiny.py; their names are
re-exported here for code written against the older single module."""

from __future__ import annotations

import copy

import torch
from torch import nn

from axpo.chat_format import (ADDED_TOKENS, CHAT_TEMPLATE, SPECIAL_TOKENS,  # noqa: F401  (re-exports)
                              special_token_ids, tool_call_json)
from axpo.tiny import (TinyModelConfig, build_tiny_model, build_tiny_processor,  # noqa: F401
                       build_tiny_tokenizer, processor_class, tiny_model_config)


def load_model_and_processor(name: str, *, seed: int = 0, tiny: TinyModelConfig | None = None,
                             dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                             tiny_base: str = "random"):
    """`name == "tiny"` builds the built-in model (`tiny_base`: "random" = seed init, "copy" = the
    shipped copy-pretrained text weights, axpo/copy_base.py); otherwise a hub id or local folder (a
    saved tiny model included) is loaded through the Auto classes."""
    if name == "tiny":
        processor = build_tiny_processor(tiny)
        model = build_tiny_model(seed, tiny, processor)
        if tiny_base == "copy":
            from axpo.copy_base import load_copy_base

            load_copy_base(model, processor.tokenizer, tiny or TinyModelConfig())
        elif tiny_base != "random":
            raise ValueError(f"tiny_base must be 'copy' or 'random', got {tiny_base!r}")
        if dtype is not None:
            model = model.to(dtype)
        return model, processor
    from transformers import AutoModelForImageTextToText

    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    return model, load_processor(name)


def load_processor(name: str):
    """AutoProcessor where it works. Without torchvision, transformers 5.x cannot instantiate any
    Qwen3-VL video processor, so AutoProcessor fails on every Qwen3-VL folder; we then build the same
    processor from the folder's own tokenizer, chat template and image-processor config (PIL
    backend), which is all an image-text agent uses."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name)
    video_processor = Qwen3VLVideoProcessor(
        patch_size=image_processor.patch_size, temporal_patch_size=image_processor.temporal_patch_size,
        merge_size=image_processor.merge_size)
    return processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor,
                              chat_template=getattr(tokenizer, "chat_template", None))


# -- loading at scale ----------------------------------------------------------------------------

def canonical_name(name: str) -> str:
    """A parameter/buffer name with the Hugging Face model's naming: no `hf.` prefix (PolicyModel)
    and no activation-checkpoint wrapper."""
    name = name.replace("_checkpoint_wrapped_module.", "")
    return name[3:] if name.startswith("hf.") else name


def build_meta_model(name: str, *, tiny: TinyModelConfig | None = None, dtype: torch.dtype | None = None,
                     attn_implementation: str | None = None, processor=None) -> nn.Module:
    """The model `load_model_and_processor` returns, on the meta device: the same class, parameter
    names, shapes and dtypes, no memory and no random numbers drawn."""
    with torch.device("meta"):
        if name == "tiny":
            model = build_tiny_model(0, tiny, processor)
            return model.to(dtype) if dtype is not None else model
        from transformers import AutoConfig, AutoModelForImageTextToText

        kwargs = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(name), **kwargs)


def _signature(model: nn.Module) -> dict[str, tuple]:
    out = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict(keep_vars=True).items()}
    for k, v in nonpersistent_buffers(model).items():
        out[k] = (tuple(v.shape), str(v.dtype))
    return out


def load_on_rank0(name: str, d, *, seed: int = 0, tiny: TinyModelConfig | None = None,
                  dtype: torch.dtype | None = None, attn_implementation: str | None = None,
                  tiny_base: str = "random"):
    """(full model or None, meta skeleton, processor). Rank 0 (or the only process) loads the
    weights on CPU; every rank, rank 0 included, gets the architecture on the meta device to build
    its shards from. The skeletons are checked against rank 0's model (names, shapes, dtypes) and
    get its generation config."""
    import torch.distributed as dist

    full = None
    if d.main:
        full, processor = load_model_and_processor(name, seed=seed, tiny=tiny, dtype=dtype,
                                                   attn_implementation=attn_implementation, tiny_base=tiny_base)
    else:
        processor = build_tiny_processor(tiny) if name == "tiny" else load_processor(name)
    skeleton = build_meta_model(name, tiny=tiny, dtype=dtype, attn_implementation=attn_implementation,
                                processor=processor)
    info = [(_signature(full), full.generation_config) if d.main else None]
    if d.enabled:
        dist.broadcast_object_list(info, src=0)
    want, generation_config = info[0]
    have = _signature(skeleton)
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:4]
        raise RuntimeError(f"the meta-device copy of {name!r} differs from rank 0's loaded model "
                           f"(name, (shape, dtype)): {diff}")
    skeleton.generation_config = copy.deepcopy(generation_config)
    return full, skeleton, processor


def nonpersistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers no state dict holds (e.g. rotary `inv_freq`), by canonical name."""
    out = {}
    for mname, mod in module.named_modules(remove_duplicate=False):
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            if mod._buffers.get(b) is not None:
                out[canonical_name(f"{mname}.{b}" if mname else b)] = mod._buffers[b]
    return out


@torch.no_grad()
def copy_nonpersistent_buffers(dst: nn.Module, src: nn.Module) -> None:
    """Fill `dst`'s non-persistent buffers from `src`'s (same canonical names; any devices)."""
    have = nonpersistent_buffers(src)
    for name, buf in nonpersistent_buffers(dst).items():
        if name not in have:
            raise KeyError(f"buffer {name} has no counterpart in the source model")
        buf.copy_(have[name])


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device, *, buffers_from: nn.Module | None = None) -> None:
    """Allocate a meta-device (possibly FSDP2-sharded) module's storage on `device`: each rank only
    its shards, contents undefined until loaded. `buffers_from`: a module to copy the non-persistent
    buffers from (else `load_full_weights` sets them)."""
    module.to_empty(device=device)
    if buffers_from is not None:
        copy_nonpersistent_buffers(module, buffers_from)


def load_full_weights(policy: nn.Module, full: nn.Module | None, d, *, buffers: bool = True) -> None:
    """Fill a materialized (sharded) policy from rank 0's full model `full` (None on the other
    ranks): weights through `set_model_state_dict(broadcast_from_rank0=True)`, one tensor at a time,
    each rank keeping its shard; with `buffers`, the non-persistent buffers too (copied on rank 0,
    broadcast). One process: plain copies."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    prefix = "hf." if hasattr(policy, "hf") else ""
    if not d.enabled:
        (policy.hf if prefix else policy).load_state_dict(full.state_dict(), strict=True)
        if buffers:
            copy_nonpersistent_buffers(policy, full)
        return
    sd = {prefix + k: v for k, v in full.state_dict().items()} if d.main else {}
    set_model_state_dict(policy, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if buffers:
        if d.main:
            copy_nonpersistent_buffers(policy, full)
        with torch.no_grad():
            for buf in nonpersistent_buffers(policy).values():
                dist.broadcast(buf, src=0)


def _storages(module: nn.Module) -> list:
    """The distinct storages of the module's state-dict tensors (tied weights share one)."""
    seen, out = set(), []
    for t in module.state_dict(keep_vars=True).values():
        s = t.untyped_storage()
        if s.data_ptr() not in seen and s.nbytes():
            seen.add(s.data_ptr())
            out.append((t, s, s.nbytes()))
    return out


@torch.no_grad()
def release_storage(module: nn.Module) -> list:
    """Free the memory of a module's weights (every state-dict tensor) while keeping its tensor
    objects, so code holding references to them (the rollout engine's runner) stays valid: each
    storage is resized to 0 bytes. Returns the handle for `restore_storage`; the contents are gone
    until the weights are copied in again. Storages that cannot be resized (memory-mapped from a
    file) are kept."""
    handle = []
    for _, s, n in _storages(module):
        if s.resizable():
            handle.append((s, n))
            s.resize_(0)
    return handle


@torch.no_grad()
def restore_storage(handle: list) -> None:
    """Reallocate what `release_storage` freed (contents undefined: copy the weights in next)."""
    for s, n in handle:
        s.resize_(n)
