"""Make PyPI's torchvision importable next to a CPU-only torch (the vLLM CPU test environment only).

Why this exists. vLLM's Qwen3-VL code imports transformers' torchvision image processor, so
torchvision must be importable. The only torchvision matching torch 2.13 that this machine can
install is PyPI's `torchvision==0.28.0`, a CUDA 13 build: its C++ extension `_C.so` links
`libtorch_cuda.so`, which the CPU torch (`2.13.0+cpu`) does not have, so the extension cannot load.
torchvision is meant to survive that (`torchvision.extension._has_ops()` becomes False and its
custom ops raise "Couldn't load custom C++ ops" when called), but 0.28/0.29 register fake kernels
for `torchvision::nms` and `torchvision::qnms` without checking `_has_ops()`, so `import
torchvision` itself raises `RuntimeError: operator torchvision::nms does not exist`. (The CPU wheel
on PyTorch's own index would not have this problem; that index is not reachable here.)

What this does. Just before torchvision is first imported, and only if its `_C.so` really cannot be
loaded by this torch, it declares those two operator schemas, exactly as torchvision's C++ would,
with no kernels. Nothing else changes: transformers and vLLM use only torchvision's pure-Python
transforms (`torchvision.transforms.v2.functional`, running on torch ops), and calling
`torchvision.ops.nms` still fails with torchvision's own message.

How it is hooked. vLLM imports torchvision in processes it starts itself (the model-registry
inspector runs `python -m vllm.model_executor.models.registry` in a subprocess, and its imports
reach torchvision before vLLM's plugins load), so this must act in every interpreter of the
environment: `.ci/vllm_env.sh` copies this module and `axpo_torchvision_cpu.pth` into the vLLM
venv's site-packages. The .pth only installs a meta-path hook (torch is not imported at start-up);
the hook removes itself the first time `import torchvision` runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBS = []          # keep the torch.library.Library objects alive
status = "not triggered"


def _extension_loads() -> bool:
    """Whether torchvision's own C++ extension loads into this torch (then nothing is needed)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    for d in spec.submodule_search_locations:
        for name in os.listdir(d):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(d, name))
                    return True
                except OSError:
                    return False
    return False


def declare_missing_schemas() -> str:
    """Declare the torchvision op schemas that `import torchvision` needs, if its extension cannot
    load. Idempotent. Returns what it did."""
    global status
    import torch

    if _extension_loads():
        status = "torchvision extension loads; nothing declared"
        return status
    missing = [op for op in _SCHEMAS if not hasattr(torch.ops.torchvision, op)]
    if missing:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in missing:
            lib.define(_SCHEMAS[op])
        _LIBS.append(lib)
    status = f"torchvision extension cannot load with torch {torch.__version__}; declared schemas {missing}"
    return status


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        declare_missing_schemas()
        return None     # the normal finders import torchvision


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeTorchvision())
