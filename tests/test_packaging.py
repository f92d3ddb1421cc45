"""kernels/ ships as `axpo.kernels` (never a top-level `kernels`, which is Hugging Face's package
name): checked in the installed (editable) package and inside a built wheel."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels_under_axpo():
    spec = importlib.util.find_spec("axpo.kernels")
    assert spec is not None and Path(spec.origin).resolve() == (ROOT / "kernels" / "__init__.py").resolve()
    # A bare `kernels` must not resolve to our folder.
    bare = importlib.util.find_spec("kernels")
    assert bare is None or Path(bare.origin or "").resolve().parent != (ROOT / "kernels").resolve()


def test_wheel_contains_axpo_kernels(tmp_path):
    env = {**os.environ, "AXPO_NO_EXT": "1"}   # the extension build is covered by the install itself
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("axpo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("axpo/kernels/__init__.py", "axpo/kernels/logprob_entropy.py", "axpo/rollout/engine.py",
              "axpo/train.py", "axpo/tools/_sandbox_child.py"):
        assert f in names, f
    assert not any(n.startswith("kernels/") for n in names)
