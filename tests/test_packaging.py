"""kernels/ ships as `axpo.kernels` (never a top-level `kernels`, which is Hugging Face's package
name): checked in the installed (editable) package and inside a built wheel."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_under_axpo(tmp_path):
    spec = importlib.util.find_spec("axpo.kernels")
    assert spec is not None and Path(spec.origin).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    # The installed package exposes no bare `kernels` (checked from a neutral directory: a Python
    # started in the repository root has the root itself on sys.path).
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "None" or Path(out).resolve().parent != (ROOT / "kernels").resolve()
    # Even with the root on sys.path, transformers does not take our folder for the hub's
    # `kernels` package: it checks installed distribution metadata, so it sees Hugging Face's
    # package (a dependency of transformers >= 5.2x) from the root exactly where it sees it from
    # elsewhere, and then imports it (tests/kernels/test_custom_ops.py: the bare name is handed
    # to that package).
    probe = ("from transformers.utils.import_utils import is_kernels_available as k; "
             "print(k(), __import__('kernels').__file__ if k() else '')")
    seen = [subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True,
                           check=True).stdout.strip() for cwd in (ROOT, tmp_path)]
    assert seen[0] == seen[1], seen


def test_wheel_contains_axpo_kernels(tmp_path):
    env = {**os.environ, "AXPO_NO_EXT": "1"}   # the extension build is covered by the install itself
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("axpo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("axpo/kernels/__init__.py", "axpo/kernels/logprob_entropy.py", "axpo/rollout/engine.py",
              "axpo/train.py", "axpo/tools/_sandbox_child.py", "axpo/assets/tiny_copy_base.safetensors"):
        assert f in names, f
    assert not any(n.startswith("kernels/") for n in names)
