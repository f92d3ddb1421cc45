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


def test_no_two_classes_share_a_name():
    """One name, one meaning: two `ImageSpan` classes (a trajectory's image tokens and the engine's
    M-RoPE placement) used to live side by side (#13)."""
    import ast
    from collections import defaultdict
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    where = defaultdict(list)
    for path in sorted((root / "axpo").rglob("*.py")) + sorted((root / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):   # public names
                where[node.name].append(str(path.relative_to(root)))
    dup = {name: files for name, files in where.items() if len(files) > 1}
    assert not dup, f"classes defined more than once: {dup}"
