"""Module dependencies that #13 untangled: models.py is the model factory only (chat format in
axpo/chat_format.py, tiny builder in axpo/tiny.py, neither importing tasks or tools at import
time), and eval.py does not import the trainer (the trainer imports eval)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, forbidden", [
    ("axpo.models", ["axpo.tasks", "axpo.tools", "axpo.trainer"]),
    ("axpo.chat_format", ["axpo.tasks", "axpo.tools", "axpo.models"]),
    ("axpo.config", ["axpo.models", "axpo.tasks", "axpo.tools"]),
    ("axpo.eval", ["axpo.trainer"]),
    ("axpo.rollout_stats", ["axpo.trainer", "axpo.eval"]),
])
def test_module_does_not_pull_in(module, forbidden):
    code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", f"importing {module} imports {r.stdout.strip()}"
