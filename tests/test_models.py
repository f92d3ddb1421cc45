"""The tiny Qwen3-VL and its processor: real transformers classes, built offline, loadable back."""

import importlib

import numpy as np
import pytest
import torch
from PIL import Image

from axpo.models import (ADDED_TOKENS, SPECIAL_TOKENS, build_tiny_model, load_model_and_processor,
                         special_token_ids, tool_call_json)


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_packages_import():
    import axpo
    import axpo.kernels  # noqa: F401  (kernels/ is shipped as axpo.kernels)

    assert importlib.util.find_spec("axpo.kernels").origin.endswith("kernels/__init__.py")


def test_extension_imports_when_built():
    spec = importlib.util.find_spec("axpo._C")
    if spec is None:
        pytest.skip("built with AXPO_NO_EXT=1 (the pure-Python block manager is used)")
    importlib.import_module("axpo._C")


def test_special_tokens_present(tiny_processor):
    tok = tiny_processor.tokenizer
    ids = special_token_ids(tok)
    assert set(ids) == set(SPECIAL_TOKENS + ADDED_TOKENS)
    assert len(set(ids.values())) == len(ids)
    # Each special token is one token, never split.
    for t, i in ids.items():
        assert tok(t, add_special_tokens=False)["input_ids"] == [i]


def test_forward_with_image_and_text_only(tiny_model, tiny_processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = tiny_processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    batch = tiny_processor(text=[text], images=[_image(400, 300)], return_tensors="pt")
    n_pad = int((batch["input_ids"] == tiny_processor.image_token_id).sum())
    assert n_pad == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    with torch.no_grad():
        out = tiny_model(**batch)
    assert out.logits.shape == (1, batch["input_ids"].shape[1], len(tiny_processor.tokenizer))
    assert torch.isfinite(out.logits).all()

    text_only = tiny_processor.apply_chat_template(
        [{"role": "user", "content": "2 + 2?"}], add_generation_prompt=True, tokenize=False)
    batch = tiny_processor(text=[text_only], return_tensors="pt")
    with torch.no_grad():
        out = tiny_model(**batch)
    assert torch.isfinite(out.logits).all()


def test_seeded_init_is_reproducible(tiny_processor):
    a = build_tiny_model(seed=3, processor=tiny_processor).state_dict()
    b = build_tiny_model(seed=3, processor=tiny_processor).state_dict()
    c = build_tiny_model(seed=4, processor=tiny_processor).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_chat_template_renders_tool_turns(tiny_processor):
    msgs = [
        {"role": "user", "content": "Compute 12*34."},
        {"role": "assistant", "reasoning_content": "Use python.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "print(12*34)"}}}]},
        {"role": "tool", "content": "408"},
        {"role": "assistant", "reasoning_content": "Done.", "content": "The answer is \\boxed{408}."},
    ]
    text = tiny_processor.apply_chat_template(msgs, tokenize=False)
    call = tool_call_json("python", {"code": "print(12*34)"})
    assert f"<|im_start|>assistant\n<think>\nUse python.\n</think>\n\n<tool_call>\n{call}\n</tool_call><|im_end|>\n" in text
    assert "<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nDone.\n</think>\n\nThe answer is \\boxed{408}.<|im_end|>\n")


def test_save_and_load_round_trip(tmp_path, tiny_model, tiny_processor):
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    model, processor = load_model_and_processor(str(tmp_path))
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    ref = tiny_model.state_dict()
    got = model.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True, tokenize=False)
    img = _image(320, 256)
    a = tiny_processor(text=[text], images=[img], return_tensors="pt")
    b = processor(text=[text], images=[img], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(tiny_model(**a).logits, model(**b).logits, atol=1e-6)
    # The loaded model generates.
    out = model.generate(**b, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == a["input_ids"].shape[1] + 4 or out[0, -1].item() in model.generation_config.eos_token_id
