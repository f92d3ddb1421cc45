"""The exported Hugging Face folder (run/hf) loads in a fresh interpreter that has never imported
axpo: `AutoModelForImageTextToText` everywhere; `AutoProcessor` where torchvision is installed
(transformers requires it for every Qwen3-VL processor, Qwen's own releases included: the processor
always holds a video processor, and every video processor needs torchvision); without torchvision,
`axpo.models.load_processor` builds the same processor from the folder. Files get the usual mode
(0644 under umask 022), not safetensors' 0600 (#13)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from axpo.checkpoint import _umask, export_hf
from axpo.distributed import Dist
from axpo.models import build_tiny_model, build_tiny_processor

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]

# Run in a fresh interpreter: load the folder with the Auto classes (or axpo's loader), process one
# image + prompt and run one forward; write ids, pixels and logits for the parent to compare.
_LOAD = """
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForImageTextToText
folder, out, how = sys.argv[1], sys.argv[2], sys.argv[3]
if how == "auto":
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(folder)
else:
    from axpo.models import load_processor
    proc = load_processor(folder)
model = AutoModelForImageTextToText.from_pretrained(folder).eval()
img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
text = proc.apply_chat_template(json.loads(sys.argv[4]), add_generation_prompt=True, tokenize=False)
batch = proc(text=[text], images=[img], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
torch.save({"ids": batch["input_ids"], "pixels": batch["pixel_values"], "grid": batch["image_grid_thw"],
            "logits": logits, "processor": type(proc).__name__,
            "torchvision": "torchvision" in sys.modules}, out)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model exported exactly as a run exports it, and its outputs on one image + prompt."""
    out = tmp_path_factory.mktemp("export") / "hf"
    proc = build_tiny_processor()
    model = build_tiny_model(seed=3, processor=proc).eval()
    export_hf(model, proc, out, Dist())
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    text = proc.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    return out, {"ids": batch["input_ids"], "pixels": batch["pixel_values"], "grid": batch["image_grid_thw"],
                 "logits": logits}


def _load_in(python: str, folder: Path, how: str, tmp_path: Path, env: dict | None = None) -> dict:
    res = tmp_path / f"{how}.pt"
    r = subprocess.run([python, "-c", _LOAD, str(folder), str(res), how, json.dumps(PROMPT)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    if how == "auto" and "No module named 'torchvision'" in r.stderr:
        pytest.skip(f"{python} has no torchvision")
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(res, weights_only=False)


def _same(got: dict, want: dict, pixel_atol: float = 0.0) -> None:
    assert torch.equal(got["ids"], want["ids"]) and torch.equal(got["grid"], want["grid"])
    torch.testing.assert_close(got["pixels"], want["pixels"], rtol=0, atol=pixel_atol)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)


def test_exported_files_have_the_usual_mode(exported):
    folder, _ = exported
    names = {f.name for f in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask(), f.name


def test_loads_without_torchvision_in_a_fresh_interpreter(exported, tmp_path):
    folder, want = exported
    got = _load_in(sys.executable, folder, "axpo", tmp_path)
    assert not got["torchvision"] and got["processor"] == "Qwen3VLProcessor"
    _same(got, want)


def _torchvision_python() -> str | None:
    """An interpreter that may have torchvision: $AXPO_TORCHVISION_PYTHON, else the vLLM test
    environment that .ci/vllm_env.sh builds (its transformers is older than the project's: a real
    'other environment')."""
    for py in (os.environ.get("AXPO_TORCHVISION_PYTHON"), str(ROOT / ".venv-vllm" / "bin" / "python")):
        if py and Path(py).exists():
            return py
    return None


def test_loads_with_auto_processor_where_torchvision_is_installed(exported, tmp_path):
    py = _torchvision_python()
    if py is None:
        pytest.skip("no interpreter with torchvision here (set AXPO_TORCHVISION_PYTHON, or build .venv-vllm "
                    "with .ci/vllm_env.sh)")
    folder, want = exported
    # PYTHONPATH empty: that interpreter sees only its own packages, never this checkout's axpo.
    got = _load_in(py, folder, "auto", tmp_path, env={"PYTHONPATH": ""})
    assert got["torchvision"] and got["processor"] == "Qwen3VLProcessor"
    # Its image processor is the torchvision backend: the same resize and normalisation in other
    # kernels (measured: pixels within 2.4e-7, logits within 7e-7 of the PIL backend's).
    _same(got, want, pixel_atol=1e-5)
