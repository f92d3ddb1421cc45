"""benchmarks/gpu_smoke.py (issue #19's GPU smoke): the parts that need no GPU. The argument
parsing, the train step's overrides through axpo's own config loader and checks, the run up to the
first CUDA call, a few of the checks at tiny shapes on CPU, the summary's schema and the carried
wheel list. The full rehearsal (fresh venv, install, Triton interpreter, torchrun on gloo) is
`bash benchmarks/gpu_smoke.sh --rehearse`: minutes, so not here."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gs = _load("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")


@pytest.fixture
def clean_path():
    """run() puts benchmarks/ on sys.path (for bench_kernels / common); undo that afterwards."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


def test_cli_parses_the_documented_commands():
    p = gs.build_parser()
    a = p.parse_args(["run", "--rehearse", "--out", "/x"])
    assert (a.cmd, a.rehearse, a.out, a.device, a.tiny) == ("run", True, "/x", "cuda", False)
    a = p.parse_args(["run", "--tiny", "--device", "cpu", "--skip", "train", "--budget-s", "60"])
    assert (a.tiny, a.device, a.skip, a.budget_s) == (True, "cpu", "train", 60.0)
    a = p.parse_args(["install", "--keep-image-transformers"])
    assert a.keep_image_transformers
    a = p.parse_args(["train-worker", "--probe", "p.json", "--", "--config", "c.yaml", "rl.steps=1"])
    assert a.train_args[-3:] == ["--config", "c.yaml", "rl.steps=1"]
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--device", "tpu"])
    with pytest.raises(SystemExit, match="needs --tiny"):
        gs.main(["run", "--device", "cpu"])


def test_unknown_skip_name_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        gs.main(["run", "--skip", "kernals", "--out", str(tmp_path)])


def test_train_overrides_pass_the_config_loader_and_its_checks(tmp_path):
    from axpo.config import parse_args
    from axpo.tasks import task_config

    info = gs.check_train_config()
    assert (info["pretrain_steps"], info["sft_steps"], info["rl_steps"]) == (1, 1, 1)
    assert info["dtype"] == "bfloat16"
    # the same argument list train.py gets from torchrun
    cfg, _ = parse_args(["--config", str(ROOT / gs.TRAIN_CONFIG), "--output-dir", str(tmp_path / "run"),
                         *gs.TRAIN_OVERRIDES])
    assert cfg.trainer.output_dir == str(tmp_path / "run")
    assert not cfg.trainer.plots and not cfg.trainer.tensorboard and not cfg.trainer.evaluate
    # No python tool anywhere (its sandbox needs bubblewrap, which the image may lack): not
    # enabled, and no configured task asks for it.
    assert "python" not in cfg.tools.enabled
    for name in cfg.data.tasks:
        assert "python" not in getattr(task_config(name, cfg.data.task_options.get(name)), "tools", [])
    # RL really trains tokens of the tiny model's truncated rollouts
    assert cfg.rollout.mask_truncated is False and cfg.rollout.max_total_tokens >= 1024


def test_rehearse_stops_before_the_first_cuda_call(tmp_path, monkeypatch, capsys, clean_path):
    def no_cuda(*a, **k):
        raise AssertionError("the rehearsal reached a CUDA call")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", no_cuda)
    assert gs.main(["run", "--rehearse", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / gs.SUMMARY_NAME).read_text())
    gs.validate_summary(s)
    assert s["mode"] == "rehearse" and s["ok"]
    assert [c["name"] for c in s["checks"]] == ["prepare", "rehearse"]
    assert s["plan"]["kernel:logprob_entropy"]["logits"] == [8192, 151936]
    assert s["plan"]["head:linear_policy_loss"]["hidden"] == [8, 4096, 4096]
    lines = capsys.readouterr().out.strip().splitlines()
    assert "before the first CUDA call" in lines[-1]


def test_tiny_cpu_checks_write_a_valid_summary(tmp_path, clean_path):
    skip = "head,train,kernel:linear_logprob_entropy,kernel:linear_policy_loss"   # the slow ones here
    rc = gs.main(["run", "--tiny", "--device", "cpu", "--skip", skip, "--out", str(tmp_path / "out"),
                  "--work", str(tmp_path / "work")])
    s = json.loads((tmp_path / "out" / gs.SUMMARY_NAME).read_text())
    gs.validate_summary(s)
    by = {c["name"]: c for c in s["checks"]}
    assert rc == 0 and s["mode"] == "cpu-tiny"
    for name in ("prepare", "env", "kernel:logprob_entropy", "kernel:clipped_policy_loss",
                 "kernel:grouped_policy_loss"):
        assert by[name]["status"] == "pass", by[name]["line"]
    errs = by["kernel:logprob_entropy"]["data"]["errors"]
    assert set(errs) == {"logp", "entropy", "dlogits"}
    for e in errs.values():
        assert set(e) >= {"err", "torch_same_dtype_err", "tol", "ok"} and e["ok"]
    assert by["kernel:logprob_entropy"]["data"]["fwd_bwd"]["reps"] == gs.TINY["reps"]
    # every file the device tool would bring back has a name it accepts
    for f in (tmp_path / "out").iterdir():
        assert re.fullmatch(r"[A-Za-z0-9._-]+", f.name), f.name


def _valid_summary():
    return {"schema": gs.SCHEMA, "mode": "gpu", "started": "t", "finished": "t", "git": None, "ok": False,
            "wall_s": 1.0, "env": {}, "shapes": {},
            "checks": [{"name": "env", "status": "pass", "line": "x", "wall_s": 0.1, "data": {}},
                       {"name": "head", "status": "fail", "line": "y", "wall_s": 0.1, "data": {}}]}


@pytest.mark.parametrize("breakage", ["schema", "status", "ok", "line", "no_checks"])
def test_validate_summary_rejects_a_broken_summary(breakage):
    gs.validate_summary(_valid_summary())
    s = _valid_summary()
    if breakage == "schema":
        s["schema"] = "other/1"
    elif breakage == "status":
        s["checks"][0]["status"] = "ok"
    elif breakage == "ok":
        s["ok"] = True   # but a check failed
    elif breakage == "line":
        s["checks"][1]["line"] = None
    else:
        s["checks"] = []
    with pytest.raises(ValueError):
        gs.validate_summary(s)


def test_tolerance_rule_is_the_kernel_tests_one():
    lib = _load("kernels_testlib_for_smoke", ROOT / "tests" / "kernels" / "kernels_testlib.py")
    assert {str(k).replace("torch.", ""): v for k, v in lib.TOL.items()} == gs.TOL_BY_NAME
    a = gs.ErrAcc()
    ref = torch.tensor([1.0, 2.0, float("-inf")], dtype=torch.float64)
    a.add(torch.tensor([1.0, 2.01, float("-inf")]), ref, torch.tensor([1.0, 2.1, float("-inf")]))
    r = a.result("bfloat16")
    assert r["ok"] and abs(r["err"] - 0.01) < 1e-6 and abs(r["torch_same_dtype_err"] - 0.1) < 1e-6
    bad = gs.ErrAcc()
    bad.add(torch.tensor([float("nan"), 2.0, float("-inf")]), ref, ref)   # NaN where the reference is finite
    assert not bad.result("bfloat16")["ok"]


def test_peak_table_by_device_name():
    assert gs.peaks_for("NVIDIA H200")[:2] == (4.8e12, 989e12)
    assert gs.peaks_for("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert gs.peaks_for("NVIDIA H100 PCIe")[0] == 2.0e12
    assert gs.peaks_for("NVIDIA A10G") == (None, None, None)


def test_carried_wheels_are_listed_pinned_and_gitignored():
    entries = gs.read_manifest()
    assert {e["name"] for e in entries} >= {"transformers", "liger-kernel"}
    assert len({e["name"] for e in entries}) == len(entries)   # one version of each (pip refuses two)
    present = [(e, gs.wheel_file(e)) for e in entries]
    total = 0
    for e, p in present:
        if p is None:
            continue   # not fetched on this machine: `bash benchmarks/gpu_smoke.sh --fetch-wheels`
        assert p.name.endswith("-py3-none-any.whl"), p.name   # pure Python: installs on the image's 3.12
        assert gs.sha256_of(p) == e["sha256"], p.name
        total += p.stat().st_size
    assert total < gs.TRAVEL_LIMIT_BYTES // 2
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q",
                                  "benchmarks/gpu_smoke_wheels/x-1.0-py3-none-any.whl"])
        assert ignored.returncode == 0, "carried wheels must stay out of git (they travel via carry)"
        listed = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "benchmarks/gpu_smoke_wheels/wheels.txt"])
        assert listed.returncode == 1, "the wheel list itself is tracked"


def test_shell_entry_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_smoke.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
