"""`python -m axpo.eval` refuses a path that is not a checkpoint with one line naming it (it used to
fail with an AssertionError deep in the loader)."""

import subprocess
import sys


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "axpo.eval", *args], capture_output=True, text=True, timeout=120)


def test_missing_checkpoint_is_named(tmp_path):
    r = _eval("--checkpoint", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert f"--checkpoint {tmp_path / 'nope'}: no such file or folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_folder_that_is_no_checkpoint_is_named(tmp_path):
    r = _eval("--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "neither a Hugging Face folder" in r.stderr and "Traceback" not in r.stderr


def test_eval_module_does_not_import_the_trainer():
    code = "import sys, axpo.eval; print('axpo.trainer' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
