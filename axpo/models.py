"""Model and processor loading: `"tiny"` builds the built-in model (axpo/tiny.py); any other name is
a hub id or a local folder, loaded through `AutoModelForImageTextToText` / `AutoProcessor`.

The chat format lives in axpo/chat_format.py and the tiny builder in axpo/tiny.py; their names are
re-exported here for code written against the older single module."""

from __future__ import annotations

import torch

from axpo.chat_format import (ADDED_TOKENS, CHAT_TEMPLATE, SPECIAL_TOKENS,  # noqa: F401  (re-exports)
                              special_token_ids, tool_call_json)
from axpo.tiny import (TinyModelConfig, build_tiny_model, build_tiny_processor,  # noqa: F401
                       build_tiny_tokenizer, processor_class, tiny_model_config)


def load_model_and_processor(name: str, *, seed: int = 0, tiny: TinyModelConfig | None = None,
                             dtype: torch.dtype | None = None, attn_implementation: str | None = None):
    """`name == "tiny"` builds the built-in model; otherwise a hub id or local folder (a saved tiny
    model included) is loaded through the Auto classes."""
    if name == "tiny":
        processor = build_tiny_processor(tiny)
        model = build_tiny_model(seed, tiny, processor)
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
