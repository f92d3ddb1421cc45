"""GPU smoke of issue #19: one short run on a lent H100/H200 that says whether the GPU path works.

Run from the repository root through benchmarks/gpu_smoke.sh (which calls the subcommands below
in order); on the lent machine, with the device tool:

    run(command="bash benchmarks/gpu_smoke.sh", carry=["benchmarks/gpu_smoke_wheels"], timeout_s=570)

after `bash benchmarks/gpu_smoke.sh --fetch-wheels` here (the carried wheels are gitignored).

Subcommands:
    install       pip-install the carried wheels and the project (--no-deps, no network) on the
                  image's torch, then probe every module the smoke imports (stdlib only: it runs
                  before anything is installed)
    run           the checks, one printed line each, and a JSON summary (gpu_smoke.json):
                    env                       torch / CUDA / device, its peak HBM bandwidth and bf16 rate
                    kernel:<op>               Triton op vs the fp64 reference, against PyTorch's own
                                              error in the same dtype (the project's tolerance rule,
                                              tests/kernels/kernels_testlib.py), fwd and fwd+bwd timed
                                              with CUDA events (median), bandwidth / FLOP rate as a
                                              fraction of the device's peak
                    head:linear_policy_loss   fused head + loss at N=32768, multi-chunk, bf16, against
                                              Liger's fused GRPO loss (when importable) and the bare
                                              3-GEMM floor: time and peak memory
                    train:torchrun            1 copy-pretrain + 1 SFT + 1 RL step of the tiny model,
                                              torchrun --nproc_per_node=1, NCCL, bf16
                  --rehearse: everything up to the first CUDA call (imports, shape plan, the train
                  overrides through the config loader and its checks), then stop.
                  --tiny --device cpu: the same checks at tiny shapes on CPU (timings meaningless).
    fetch-wheels  (here, with a registry) download the wheels named in gpu_smoke_wheels/wheels.txt
    train-worker  (internal) what torchrun runs: axpo.train.main plus a probe of device and backend

Exit status: 0 when no check failed (a skip, e.g. Liger absent, is not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WHEELS_DIR = HERE / "gpu_smoke_wheels"
MANIFEST = WHEELS_DIR / "wheels.txt"
SCHEMA = "axpo-gpu-smoke/1"
SUMMARY_NAME = "gpu_smoke.json"
STATUSES = ("pass", "fail", "skip")
# What travels to the device machine (tracked + untracked-not-ignored files + carried paths).
TRAVEL_LIMIT_BYTES = 64 * 2**20
# The whole smoke, install included, must fit 8 minutes on a fresh machine (issue #19).
DEFAULT_BUDGET_S = 480

# Shapes. FULL: the issue's (N=8192 tokens, Qwen3's V=151936; H=4096 is Qwen3-VL-8B's hidden size;
# the head case is one 8B micro-batch, 32768 tokens, as 8 rows of 4096). TINY: the same checks in
# seconds on CPU; chunk sizes are forced there so the multi-chunk paths still run.
FULL = dict(N=8192, V=151936, H=4096, B=16, T=512, head_B=8, head_T=4096, ref_rows=1024,
            chunk_tokens=None, head_chunk_tokens=None, warmup=3, reps=10, gemm_reps=5, head_reps=3)
TINY = dict(N=64, V=4099, H=64, B=4, T=16, head_B=2, head_T=128, ref_rows=16,
            chunk_tokens=16, head_chunk_tokens=64, warmup=0, reps=1, gemm_reps=1, head_reps=1)

# Peaks by device name (torch.cuda.get_device_name), first match wins: HBM bytes/s and dense bf16
# FLOP/s from NVIDIA's data sheets (H100 SXM / H200: 3.35 / 4.8 TB/s, 989 TFLOP/s dense bf16).
PEAKS = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100", 3.35e12, 989e12),
)

# The train check: configs/smoke.yaml plus these overrides. One step of each stage; bf16; only
# the perception task and the zoom tool, so the python tool (bubblewrap, maybe absent on the
# image) is never built; no evaluation, plots or TensorBoard (time and files). rollout:
# max_total_tokens 1024 leaves room for 24-token turns after the perception prompt, and
# mask_truncated=false trains those truncated rollouts, so the RL update really runs (with the
# untrained tiny model every reward is 0: the update runs with zero advantages, a zero gradient).
# deterministic=false: torch's deterministic mode needs CUBLAS_WORKSPACE_CONFIG on CUDA and is
# not what this smoke checks.
TRAIN_CONFIG = "configs/smoke.yaml"
TRAIN_OVERRIDES = (
    "pretrain.steps=1", "sft.steps=1", "rl.steps=1",
    "model.dtype=bfloat16",
    "data.tasks=[perception]", "tools.enabled=[image_zoom_in]",
    "rollout.max_total_tokens=1024", "rollout.mask_truncated=false",
    "trainer.evaluate=false", "trainer.plots=false", "trainer.tensorboard=false",
    "trainer.deterministic=false",
)

# Modules the smoke imports, checked after the install: (module, required). Optional ones only
# turn a check into a skip (Liger) or are not used by the smoke's config (plots, TensorBoard).
PROBE_MODULES = (
    ("torch", True), ("triton", True), ("transformers", True), ("tokenizers", True),
    ("safetensors", True), ("numpy", True), ("yaml", True), ("PIL", True), ("tqdm", True),
    ("axpo", True), ("axpo.kernels", True), ("axpo.kernels.reference", True), ("axpo.config", True),
    ("axpo.trainer", True), ("axpo.train", True),
    ("liger_kernel.chunked_loss", False), ("matplotlib", False), ("torch.utils.tensorboard", False),
    ("pyarrow", False), ("axpo._C", False),
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# the wheel manifest (stdlib only)
# --------------------------------------------------------------------------------------------


def read_manifest(path: Path = MANIFEST) -> list[dict]:
    """[{name, version, sha256}] from wheels.txt: `name==version  sha256` per line, # comments."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)\s+([0-9a-f]{64})", line)
        if not m:
            raise ValueError(f"{path}:{n}: expected 'name==version  sha256', got {line!r}")
        out.append({"name": m[1], "version": m[2], "sha256": m[3]})
    return out


def wheel_file(entry: dict, folder: Path = WHEELS_DIR) -> Path | None:
    """The carried wheel of a manifest entry (wheel file names use '_' for '-' in the name)."""
    stem = re.sub(r"[-_.]+", "_", entry["name"]).lower()
    for p in sorted(folder.glob("*.whl")):
        parts = p.name.split("-")
        if len(parts) >= 2 and parts[0].lower() == stem and parts[1] == entry["version"]:
            return p
    return None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheels(args) -> int:
    """Download the manifest's wheels (pure Python, for the image's Python 3.12) and check them."""
    entries = read_manifest()
    WHEELS_DIR.mkdir(exist_ok=True)
    specs = [f"{e['name']}=={e['version']}" for e in entries]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "-d", str(WHEELS_DIR), *specs]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        say(r.stdout[-2000:] + r.stderr[-2000:])
        say(f"FAIL fetch-wheels: pip download exited {r.returncode}")
        return 1
    bad = 0
    for e in entries:
        p = wheel_file(e)
        if p is None:
            say(f"FAIL fetch-wheels: no wheel for {e['name']}=={e['version']} in {WHEELS_DIR}")
            bad += 1
        elif sha256_of(p) != e["sha256"]:
            say(f"FAIL fetch-wheels: {p.name} sha256 {sha256_of(p)} != manifest {e['sha256']}")
            bad += 1
        else:
            say(f"ok   {p.name} ({p.stat().st_size / 2**20:.1f} MiB)")
    return 1 if bad else 0


# --------------------------------------------------------------------------------------------
# install (stdlib only: runs before the project is importable)
# --------------------------------------------------------------------------------------------

PROBE_CODE = r"""
import importlib, json, sys
from importlib.metadata import version
mods = json.loads(sys.argv[1])
out = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}, "versions": {}}
for name, required in mods:
    try:
        importlib.import_module(name)
        out["modules"][name] = "ok"
    except Exception as e:
        out["modules"][name] = f"{type(e).__name__}: {e}"[:300]
for dist in ("torch", "triton", "transformers", "tokenizers", "huggingface-hub", "safetensors", "liger-kernel",
             "numpy", "axpo", "pybind11", "setuptools", "regex"):
    try:
        out["versions"][dist] = version(dist)
    except Exception:
        out["versions"][dist] = None
try:
    import torch
    out["versions"]["torch.version.cuda"] = torch.version.cuda
except Exception:
    pass
print(json.dumps(out))
"""


def _pip(py: str, args: list[str], log, env=None) -> int:
    cmd = [py, "-m", "pip", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    log.write(f"[exit {r.returncode}]\n")
    log.flush()
    return r.returncode


def install(args) -> int:
    """The carried wheels, then the project, with --no-deps and no index (nothing can be fetched
    there); then a probe in a fresh interpreter of every module the smoke imports."""
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = args.python or sys.executable
    lines, data, status = [], {"wheels": {}}, "pass"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    with open(out / "install.log", "a") as log:
        wheels = []
        for e in read_manifest():
            if args.keep_image_transformers and e["name"] == "transformers":
                data["wheels"][e["name"]] = "not installed (--keep-image-transformers)"
                continue
            p = wheel_file(e)
            if p is None:
                data["wheels"][e["name"]] = "not carried"
                lines.append(f"{e['name']} wheel not carried (run `bash benchmarks/gpu_smoke.sh --fetch-wheels` "
                             f"here and carry benchmarks/gpu_smoke_wheels)")
                continue
            if sha256_of(p) != e["sha256"]:
                data["wheels"][e["name"]] = "sha256 mismatch"
                lines.append(f"{p.name}: sha256 differs from wheels.txt, not installed")
                status = "fail"
                continue
            wheels.append(p)
            data["wheels"][e["name"]] = p.name
        if wheels:
            rc = _pip(py, ["install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                           *map(str, wheels)], log, env)
            if rc != 0:
                status = "fail"
                lines.append(f"pip install of the carried wheels exited {rc} (install.log)")
        # The project, editable, on the image's torch; the pybind11 extension is built in place.
        # If it does not build, the pure-Python block manager takes over (as axpo does without it).
        t_proj = time.time()
        rc = _pip(py, ["install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], log, env)
        if rc != 0:
            rc = _pip(py, ["install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], log,
                      dict(env, AXPO_NO_EXT="1"))
            lines.append("C++ extension did not build (install.log): retried with AXPO_NO_EXT=1")
        if rc != 0:
            # An editable install needs a PEP 660 setuptools; a plain wheel install does not.
            rc = _pip(py, ["install", "-q", "--no-index", "--no-deps", "--no-build-isolation", str(ROOT)], log, env)
            lines.append(f"editable install failed (install.log); plain install exited {rc}")
            if rc != 0:
                status = "fail"
        data["project_install_s"] = round(time.time() - t_proj, 1)
    probe = subprocess.run([py, "-c", PROBE_CODE, json.dumps(PROBE_MODULES)], capture_output=True, text=True,
                           cwd=str(out))   # not the repo root: the installed package must be what imports
    try:
        data["probe"] = json.loads(probe.stdout.strip().splitlines()[-1])
    except Exception:
        data["probe"] = {"error": (probe.stdout + probe.stderr)[-2000:]}
        status = "fail"
        lines.append("import probe crashed")
    mods = data["probe"].get("modules", {})
    # What imports is the truth about the extension, whichever install path succeeded.
    data["extension"] = "built" if mods.get("axpo._C") == "ok" else "not built (pure-Python block manager)"
    required = {m for m, req in PROBE_MODULES if req}
    missing = [m for m in required if mods.get(m, "missing") != "ok"]
    absent = [m for m, req in PROBE_MODULES if not req and mods.get(m, "missing") != "ok"]
    if missing:
        status = "fail"
        lines.append("cannot import " + "; ".join(f"{m} ({mods.get(m, 'missing')})" for m in missing))
    v = data["probe"].get("versions", {})
    head = (f"torch {v.get('torch')} (CUDA {v.get('torch.version.cuda')}), triton {v.get('triton')}, "
            f"transformers {v.get('transformers')}, liger-kernel {v.get('liger-kernel') or 'absent'}; "
            f"extension {data['extension']}")
    if absent:
        head += "; optional absent: " + ", ".join(absent)
    line = head + ("; " + "; ".join(lines) if lines else "")
    check = {"name": "install", "status": status, "line": line, "wall_s": round(time.time() - t0, 1), "data": data}
    (out / "install.json").write_text(json.dumps(check, indent=1))
    say(f"{status.upper():4s} install: {line} [{check['wall_s']:.0f} s]")
    return 0 if status != "fail" else 1


# --------------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------------


def validate_summary(s: dict) -> None:
    """Raise ValueError unless `s` has the summary's schema (what the tests and readers rely on)."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"gpu_smoke summary: {what}")

    need(isinstance(s, dict), "not an object")
    need(s.get("schema") == SCHEMA, f"schema must be {SCHEMA!r}")
    need(s.get("mode") in ("gpu", "rehearse", "cpu-tiny", "gpu-tiny"), "mode")
    for k in ("started", "finished", "git"):
        need(k in s, f"missing {k}")
    need(isinstance(s.get("ok"), bool), "ok must be a bool")
    need(isinstance(s.get("wall_s"), (int, float)), "wall_s must be a number")
    need(isinstance(s.get("env"), dict), "env must be an object")
    need(isinstance(s.get("shapes"), dict), "shapes must be an object")
    checks = s.get("checks")
    need(isinstance(checks, list) and checks, "checks must be a non-empty list")
    for c in checks:
        need(isinstance(c, dict), "a check must be an object")
        need(isinstance(c.get("name"), str) and c["name"], "check name")
        need(c.get("status") in STATUSES, f"check {c.get('name')}: status must be one of {STATUSES}")
        need(isinstance(c.get("line"), str), f"check {c.get('name')}: line must be a string")
        need(isinstance(c.get("wall_s"), (int, float)), f"check {c.get('name')}: wall_s")
        need(isinstance(c.get("data"), dict), f"check {c.get('name')}: data must be an object")
    need(s["ok"] == all(c["status"] != "fail" for c in checks), "ok must say whether no check failed")


def _git_rev() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


class Summary:
    """The JSON summary, rewritten after every check so a run stopped by its time limit still
    leaves what it measured."""

    def __init__(self, out: Path, mode: str, shapes: dict, budget_s: float, t0: float):
        self.path = out / SUMMARY_NAME
        self.t0 = t0
        self.d = {"schema": SCHEMA, "mode": mode, "started": now_iso(), "finished": None, "git": _git_rev(),
                  "budget_s": budget_s, "wall_s": 0.0, "ok": True, "env": {}, "shapes": shapes, "checks": []}

    def add(self, check: dict) -> None:
        self.d["checks"].append(check)
        self.write()

    def write(self) -> None:
        self.d["wall_s"] = round(time.time() - self.t0, 1)
        self.d["finished"] = now_iso()
        self.d["ok"] = all(c["status"] != "fail" for c in self.d["checks"])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.d, indent=1, default=str, allow_nan=True))
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

# The tolerance rule of the kernel tests (tests/kernels/kernels_testlib.py, shared/design/kernels.md):
#     max|ours - ref64| <= max|torch_same_dtype - ref64| + TOL[dtype] * (1 + max|ref64|)
# tests/test_gpu_smoke.py keeps this table equal to the tests' own.
TOL_BY_NAME = {"float32": 2e-5, "float64": 1e-9, "bfloat16": 2e-2, "float16": 4e-3}


class ErrAcc:
    """max |ours - ref64|, max |same - ref64| and max |ref64| over chunks, on the finite entries of
    the reference, and whether ours is finite exactly where the reference is."""

    def __init__(self):
        self.err = self.base = self.scale = 0.0
        self.pattern_ok = True

    def add(self, ours, ref64, same):
        import torch

        ours, ref64, same = ours.detach().double(), ref64.detach().double(), same.detach().double()
        fin = torch.isfinite(ref64)
        if not torch.equal(torch.isfinite(ours), fin):
            self.pattern_ok = False
        if not bool(fin.any()):
            return
        self.err = max(self.err, float((ours - ref64)[fin].abs().max()))
        b = (same - ref64)[fin].abs()
        b = b[torch.isfinite(b)]
        if b.numel():
            self.base = max(self.base, float(b.max()))
        self.scale = max(self.scale, float(ref64[fin].abs().max()))

    def result(self, dtype_name: str) -> dict:
        tol = TOL_BY_NAME[dtype_name] * (1.0 + self.scale)
        ok = self.pattern_ok and math.isfinite(self.err) and self.err <= self.base + tol
        return {"err": self.err, "torch_same_dtype_err": self.base, "tol": tol, "finite_pattern_ok": self.pattern_ok,
                "ok": ok}


def time_op(fn, dev, *, setup=None, warmup=3, reps=10) -> dict:
    """Median seconds of fn(setup()) over `reps` calls after `warmup`: CUDA events around each call
    on CUDA (setup outside them), perf_counter elsewhere."""
    import torch

    times = []
    for i in range(warmup + reps):
        arg = setup() if setup is not None else None
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            fn(arg)
            dt = time.perf_counter() - t
        if i >= warmup:
            times.append(dt)
        del arg
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps,
            "warmup": warmup, "clock": "cuda events" if dev.type == "cuda" else "perf_counter"}


def peaks_for(name: str | None) -> tuple[float | None, float | None, str | None]:
    """(peak HBM bytes/s, peak dense bf16 FLOP/s, matched key) for a CUDA device name."""
    for key, bw, fl in PEAKS:
        if name and key.lower() in name.lower():
            return bw, fl, key
    return None, None, None


def _fmt_s(s):
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _bw(x):
    return f"{x / 1e12:.2f} TB/s" if x >= 1e11 else f"{x / 1e9:.2f} GB/s"


def _frac(x):
    return "n/a" if x is None else f"{x:.2f}"


class Ctx:
    def __init__(self, dev, s: dict, out: Path, work: Path, env: dict):
        self.dev, self.s, self.out, self.work, self.env = dev, s, out, work, env

    def gen(self, seed):
        import torch

        return torch.Generator(device=self.dev).manual_seed(seed)

    def rate(self, nbytes, seconds):
        bw = nbytes / seconds
        peak = self.env.get("peak_bw")
        copy = self.env.get("copy_bw")
        return {"bytes": nbytes, "bytes_per_s": bw, "frac_peak_bw": bw / peak if peak else None,
                "frac_copy_bw": bw / copy if copy else None}

    def flops(self, n, seconds):
        peak = self.env.get("peak_bf16_flops")
        return {"flops": n, "flops_per_s": n / seconds, "frac_peak_bf16": n / seconds / peak if peak else None}


def _errs_line(errs: dict) -> str:
    return ", ".join(f"{k} {v['err']:.1e} (torch {v['torch_same_dtype_err']:.1e})" for k, v in errs.items())


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def check_env(ctx: Ctx):
    import torch

    import common

    dev = ctx.dev
    data = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": str(dev)}
    try:
        import triton

        data["triton"] = triton.__version__
    except Exception as e:
        data["triton"] = f"absent ({type(e).__name__})"
    data["liger_kernel"] = common._version("liger_kernel")
    data["transformers"] = common._version("transformers")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        props = torch.cuda.get_device_properties(dev)
        bw, fl, key = peaks_for(name)
        data.update(gpu=name, sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", peak_key=key)
        ctx.env.update(peak_bw=bw, peak_bf16_flops=fl)
    else:
        data["gpu"] = None
    # Measured copy rate (read + write bytes / s), a second yardstick beside the data-sheet peak.
    nbytes = (1 << 30) if dev.type == "cuda" else (64 << 20)
    ctx.env["copy_bw"] = common.measure_copy_bandwidth(nbytes, device=dev)
    data.update(peak_bw=ctx.env.get("peak_bw"), peak_bf16_flops=ctx.env.get("peak_bf16_flops"),
                copy_bw=ctx.env["copy_bw"])
    peak = ctx.env.get("peak_bw")
    line = (f"{data.get('gpu') or dev}: torch {data['torch']} CUDA {data['cuda']}, triton {data['triton']}, "
            f"transformers {data['transformers']}, liger {data['liger_kernel'] or 'absent'}; peak "
            + (f"{peak / 1e12:.2f} TB/s, {ctx.env['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 ({data.get('peak_key')})"
               if peak else "unknown for this device")
            + f"; copy {_bw(ctx.env['copy_bw'])} measured")
    if dev.type == "cuda" and peak is None:
        line += " (not in the peak table: fractions of peak are n/a, fractions of the copy rate remain)"
    return "pass", line, data


def check_logprob_entropy(ctx: Ctx):
    import torch

    from axpo.kernels import logprob_entropy
    from axpo.kernels.reference import logprob_entropy_ref

    s, dev, bf16 = ctx.s, ctx.dev, torch.bfloat16
    N, V = s["N"], s["V"]
    g = ctx.gen(0)
    logits = (torch.randn(N, V, device=dev, generator=g) * 3.0).to(bf16)
    targets = torch.randint(0, V, (N,), device=dev, generator=g)
    targets[0] = V - 1   # a target in the last, partial vocabulary tile
    g_lp = torch.randn(N, device=dev, generator=g)
    g_ent = torch.randn(N, device=dev, generator=g)

    x = logits.detach().requires_grad_()
    lp, ent = logprob_entropy(x, targets)
    torch.autograd.backward([lp, ent], [g_lp, g_ent])
    grad = x.grad
    del x
    acc = {k: ErrAcc() for k in ("logp", "entropy", "dlogits")}
    # The references row by row in chunks (rows are independent): fp64 [N, V] with its softmax
    # temporaries would not fit an 80 GB card.
    for r0 in range(0, N, s["ref_rows"]):
        sl = slice(r0, min(N, r0 + s["ref_rows"]))
        outs = {}
        for key, dt in (("ref", torch.float64), ("same", bf16)):
            xc = logits[sl].to(dt).detach().requires_grad_()
            a, b = logprob_entropy_ref(xc, targets[sl], compute_dtype=dt)
            torch.autograd.backward([a, b], [g_lp[sl].to(a.dtype), g_ent[sl].to(b.dtype)])
            outs[key] = (a.detach(), b.detach(), xc.grad)
            del xc, a, b
        for i, k in enumerate(("logp", "entropy")):
            acc[k].add((lp, ent)[i][sl], outs["ref"][i], outs["same"][i])
        acc["dlogits"].add(grad[sl], outs["ref"][2], outs["same"][2])
        del outs
    del lp, ent, grad
    errs = {k: a.result("bfloat16") for k, a in acc.items()}

    def fwd(_):
        with torch.no_grad():
            logprob_entropy(logits, targets)

    def fwd_bwd(x):
        a, b = logprob_entropy(x, targets)
        torch.autograd.backward([a, b], [g_lp, g_ent])

    nbytes = N * V * logits.element_size()
    t_f = time_op(fwd, dev, warmup=s["warmup"], reps=s["reps"])
    t_fb = time_op(fwd_bwd, dev, setup=lambda: logits.detach().requires_grad_(), warmup=s["warmup"], reps=s["reps"])
    # Bytes the op must move at least: fwd reads the logits once; the backward reads them again
    # and writes dlogits (3x in all).
    r_f, r_fb = ctx.rate(nbytes, t_f["median_s"]), ctx.rate(3 * nbytes, t_fb["median_s"])
    ok = all(e["ok"] for e in errs.values())
    line = (f"bf16 N={N} V={V}: {_errs_line(errs)}; fwd {_fmt_s(t_f['median_s'])} "
            f"{_bw(r_f['bytes_per_s'])} = {_frac(r_f['frac_peak_bw'])} of peak; fwd+bwd "
            f"{_fmt_s(t_fb['median_s'])} {_bw(r_fb['bytes_per_s'])} = {_frac(r_fb['frac_peak_bw'])} of peak")
    return ("pass" if ok else "fail"), line, {"errors": errs, "fwd": {**t_f, **r_f}, "fwd_bwd": {**t_fb, **r_fb}}


def _policy_inputs(ctx: Ctx, seed: int):
    import torch

    B, T, dev = ctx.s["B"], ctx.s["T"], ctx.dev
    g = ctx.gen(seed)
    logp = -torch.rand(B, T, device=dev, generator=g) * 3
    old = logp + 0.3 * torch.randn(B, T, device=dev, generator=g)
    ref = logp + 0.1 * torch.randn(B, T, device=dev, generator=g)
    mask = (torch.rand(B, T, device=dev, generator=g) > 0.3).float()
    adv = torch.randn(B, device=dev, generator=g)
    rewards = torch.randint(0, 2, (B,), device=dev, generator=g).float()
    groups = (torch.arange(B, device=dev) // 4) * 7 + 3   # groups of 4, ids neither dense nor from 0
    return logp, old, ref, mask, adv, rewards, groups


def _check_policy(ctx: Ctx, which: str):
    import torch

    from axpo.kernels import clipped_policy_loss, grouped_policy_loss
    from axpo.kernels.reference import clipped_policy_loss_ref, grouped_policy_loss_ref

    logp, old, ref, mask, adv, rewards, groups = _policy_inputs(ctx, 2 if which == "clipped" else 3)
    kw = dict(clip_low=0.2, clip_high=0.28, ref_logp=ref, beta=0.05)
    N = logp.numel()

    def call(fn_ours, x, dt=None):
        o = (lambda t: t.to(dt)) if dt is not None else (lambda t: t)
        k = {**kw, "ref_logp": o(ref)}
        if which == "clipped":
            return fn_ours(x, o(old), o(adv), o(mask), **k)[0]
        return fn_ours(x, o(old), o(mask), o(rewards), groups, **k)[0]

    ours_fn = clipped_policy_loss if which == "clipped" else grouped_policy_loss
    ref_fn = clipped_policy_loss_ref if which == "clipped" else grouped_policy_loss_ref
    res = {}
    for key, fn, dt in (("ours", ours_fn, None), ("ref", ref_fn, torch.float64), ("same", ref_fn, None)):
        x = (logp.to(dt) if dt is not None else logp).detach().requires_grad_()
        loss = call(fn, x, dt)
        loss.backward()
        res[key] = (loss.detach(), x.grad)
    errs = {}
    for i, k in enumerate(("loss", "dlogp")):
        a = ErrAcc()
        a.add(res["ours"][i], res["ref"][i], res["same"][i])
        errs[k] = a.result("float32")

    def fwd_bwd(x):
        call(ours_fn, x).backward()

    t = time_op(fwd_bwd, ctx.dev, setup=lambda: logp.detach().requires_grad_(), warmup=ctx.s["warmup"],
                reps=ctx.s["reps"])
    # At least: read logp, old, ref, mask, write dlogp (fp32 each); at this size the op is bound by
    # kernel launches, not bandwidth, so the fraction is small by nature.
    r = ctx.rate(5 * N * 4, t["median_s"])
    ok = all(e["ok"] for e in errs.values())
    line = (f"fp32 B={logp.shape[0]} T={logp.shape[1]}: {_errs_line(errs)}; fwd+bwd {_fmt_s(t['median_s'])} "
            f"({_bw(r['bytes_per_s'])} = {_frac(r['frac_peak_bw'])} of peak: launch-bound at this size)")
    return ("pass" if ok else "fail"), line, {"errors": errs, "fwd_bwd": {**t, **r}}


def check_clipped_policy_loss(ctx):
    return _check_policy(ctx, "clipped")


def check_grouped_policy_loss(ctx):
    return _check_policy(ctx, "grouped")


def _head_inputs(ctx: Ctx, B, T, seed):
    import torch

    from axpo.kernels import linear_logprob_entropy

    H, V, dev = ctx.s["H"], ctx.s["V"], ctx.dev
    g = ctx.gen(seed)
    h = torch.randn(B, T, H, device=dev, generator=g).to(torch.bfloat16)
    # logits of std ~2, as in the kernel tests (kernels_testlib.check_linear)
    w = (torch.randn(V, H, device=dev, generator=g) * (2.0 / H ** 0.5)).to(torch.bfloat16)
    y = torch.randint(0, V, (B, T), device=dev, generator=g)
    y.view(-1)[0] = V - 1
    mask = torch.rand(B, T, device=dev, generator=g) > 0.1
    adv = torch.randn(B, device=dev, generator=g)
    with torch.no_grad():   # old / reference log-probs near the current ones, as in a real step
        lp0, _ = linear_logprob_entropy(h, w, y, return_entropy=False)
    old = (lp0 + 0.05 * torch.randn(B, T, device=dev, generator=g)).detach()
    ref = (lp0 + 0.05 * torch.randn(B, T, device=dev, generator=g)).detach()
    return h, w, y, mask, adv, old, ref


def _n_chunks(N, V, dev, chunk_tokens, defaults=None):
    import torch

    from axpo.kernels.linear_logprob_entropy import chunk_tokens_for

    c = chunk_tokens_for(N, V, torch.bfloat16, dev, chunk_tokens, defaults=defaults)
    return -(-N // c), c


def check_linear_logprob_entropy(ctx: Ctx):
    import torch

    from axpo.kernels import linear_logprob_entropy
    from axpo.kernels.reference import linear_logprob_entropy_ref

    s, dev, bf16 = ctx.s, ctx.dev, torch.bfloat16
    N, H, V = s["N"], s["H"], s["V"]
    h, w, y, *_ = _head_inputs(ctx, 1, N, 4)
    h, y = h.view(N, H), y.view(N)
    g = ctx.gen(5)
    g_lp = torch.randn(N, device=dev, generator=g)
    g_ent = torch.randn(N, device=dev, generator=g)
    n_chunks, chunk = _n_chunks(N, V, dev, s["chunk_tokens"])
    kw = {} if s["chunk_tokens"] is None else {"chunk_tokens": s["chunk_tokens"]}

    def grads(fn, hh, ww, **k):
        hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
        a, b = fn(hh, ww, y, **k)
        torch.autograd.backward([a, b], [g_lp.to(a.dtype), g_ent.to(b.dtype)])
        return a.detach(), b.detach(), hh.grad, ww.grad

    ours = grads(linear_logprob_entropy, h, w, **kw)
    # PyTorch in bf16, whole batch (so dW sums over all tokens in one GEMM, as PyTorch would).
    same = grads(linear_logprob_entropy_ref, h, w, compute_dtype=bf16)
    acc = {k: ErrAcc() for k in ("logp", "entropy", "dhidden", "dweight")}
    # fp64 reference in row chunks (dW accumulates over them in fp64, exact enough).
    w64 = w.double().requires_grad_()
    for r0 in range(0, N, s["ref_rows"]):
        sl = slice(r0, min(N, r0 + s["ref_rows"]))
        hc = h[sl].double().requires_grad_()
        a, b = linear_logprob_entropy_ref(hc, w64, y[sl], compute_dtype=torch.float64)
        torch.autograd.backward([a, b], [g_lp[sl].double(), g_ent[sl].double()])
        acc["logp"].add(ours[0][sl], a, same[0][sl])
        acc["entropy"].add(ours[1][sl], b, same[1][sl])
        acc["dhidden"].add(ours[2][sl], hc.grad, same[2][sl])
        del hc, a, b
    acc["dweight"].add(ours[3], w64.grad, same[3])
    del w64, ours, same
    errs = {k: a.result("bfloat16") for k, a in acc.items()}

    def fwd(_):
        with torch.no_grad():
            linear_logprob_entropy(h, w, y, **kw)

    def fwd_bwd(args):
        hh, ww = args
        a, b = linear_logprob_entropy(hh, ww, y, **kw)
        torch.autograd.backward([a, b], [g_lp, g_ent])

    t_f = time_op(fwd, dev, warmup=s["warmup"], reps=s["reps"])
    t_fb = time_op(fwd_bwd, dev, setup=lambda: (h.detach().requires_grad_(), w.detach().requires_grad_()),
                   warmup=s["warmup"], reps=s["gemm_reps"])
    # GEMM-bound: useful FLOPs are the unfused head's (fwd 2NHV; fwd+bwd 6NHV: logits, dX, dW);
    # this op spends a 4th GEMM recomputing the logits in the backward.
    f_f, f_fb = ctx.flops(2 * N * H * V, t_f["median_s"]), ctx.flops(6 * N * H * V, t_fb["median_s"])
    ok = all(e["ok"] for e in errs.values()) and n_chunks > 1
    line = (f"bf16 N={N} H={H} V={V}, {n_chunks} chunks of {chunk}: {_errs_line(errs)}; fwd {_fmt_s(t_f['median_s'])} "
            f"{f_f['flops_per_s'] / 1e12:.0f} TFLOP/s = {_frac(f_f['frac_peak_bf16'])} of peak; fwd+bwd "
            f"{_fmt_s(t_fb['median_s'])} {f_fb['flops_per_s'] / 1e12:.0f} TFLOP/s (useful 6NHV) = "
            f"{_frac(f_fb['frac_peak_bf16'])} of peak" + ("" if n_chunks > 1 else "; NOT multi-chunk"))
    return ("pass" if ok else "fail"), line, {"errors": errs, "chunks": n_chunks, "chunk_tokens": chunk,
                                              "fwd": {**t_f, **f_f}, "fwd_bwd": {**t_fb, **f_fb}}


def check_linear_policy_loss(ctx: Ctx):
    import torch

    from axpo.kernels import linear_policy_loss
    from axpo.kernels.linear_policy_loss import _DEFAULT_WORKSPACE_MIB
    from axpo.kernels.reference import clipped_policy_loss_ref, linear_logprob_entropy_ref

    s, dev, bf16 = ctx.s, ctx.dev, torch.bfloat16
    B, T, H, V = s["B"], s["T"], s["H"], s["V"]
    N = B * T
    h, w, y, mask, adv, old, ref = _head_inputs(ctx, B, T, 6)
    kw = dict(clip_high=0.28, ref_logp=ref, beta=0.04)
    ck = {} if s["chunk_tokens"] is None else {"chunk_tokens": s["chunk_tokens"]}
    n_chunks, chunk = _n_chunks(N, V, dev, s["chunk_tokens"], defaults=_DEFAULT_WORKSPACE_MIB)

    def run(hh, ww):
        hh, ww = hh.detach().requires_grad_(), ww.detach().requires_grad_()
        loss, _ = linear_policy_loss(hh, ww, y, old, adv, mask, **kw, **ck)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    ours = run(h, w)
    hs, ws = h.detach().requires_grad_(), w.detach().requires_grad_()
    lps, _ = linear_logprob_entropy_ref(hs, ws, y, compute_dtype=bf16, return_entropy=False)
    loss_s, _ = clipped_policy_loss_ref(lps, old, adv, mask, **kw)
    loss_s.backward()
    same = (loss_s.detach(), hs.grad, ws.grad)
    del hs, ws, lps, loss_s
    # fp64 reference by whole sequences, normalised by the global token count so chunk losses add.
    n_tok = mask.sum().double()
    w64 = w.double().requires_grad_()
    rows = max(1, s["ref_rows"] // T)
    loss64 = torch.zeros((), dtype=torch.float64, device=dev)
    acc = {k: ErrAcc() for k in ("loss", "dhidden", "dweight")}
    for b0 in range(0, B, rows):
        sl = slice(b0, min(B, b0 + rows))
        hc = h[sl].double().requires_grad_()
        lp64, _ = linear_logprob_entropy_ref(hc, w64, y[sl], compute_dtype=torch.float64, return_entropy=False)
        lc, _ = clipped_policy_loss_ref(lp64, old[sl].double(), adv[sl].double(), mask[sl],
                                        **{**kw, "ref_logp": ref[sl].double()}, normalizer=n_tok)
        lc.backward()
        loss64 += lc.detach()
        acc["dhidden"].add(ours[1][sl], hc.grad, same[1][sl])
        del hc, lp64, lc
    acc["loss"].add(ours[0], loss64, same[0])
    acc["dweight"].add(ours[2], w64.grad, same[2])
    del w64, ours, same
    errs = {k: a.result("bfloat16") for k, a in acc.items()}

    def fwd_bwd(args):
        hh, ww = args
        loss, _ = linear_policy_loss(hh, ww, y, old, adv, mask, **kw, **ck)
        loss.backward()

    t = time_op(fwd_bwd, dev, setup=lambda: (h.detach().requires_grad_(), w.detach().requires_grad_()),
                warmup=s["warmup"], reps=s["gemm_reps"])
    f = ctx.flops(6 * N * H * V, t["median_s"])
    ok = all(e["ok"] for e in errs.values()) and n_chunks > 1
    line = (f"bf16 N={N}({B}x{T}) H={H} V={V}, {n_chunks} chunks of {chunk}: {_errs_line(errs)}; fwd+bwd "
            f"{_fmt_s(t['median_s'])} {f['flops_per_s'] / 1e12:.0f} TFLOP/s = {_frac(f['frac_peak_bf16'])} of peak"
            + ("" if n_chunks > 1 else "; NOT multi-chunk"))
    return ("pass" if ok else "fail"), line, {"errors": errs, "chunks": n_chunks, "chunk_tokens": chunk,
                                              "fwd_bwd": {**t, **f}}


def check_head(ctx: Ctx):
    """linear_policy_loss at one 8B micro-batch (N=32768) against Liger's fused GRPO loss and the
    3-GEMM floor, in rounds (bench_kernels._interleaved: floor, provider, provider, ...)."""
    import torch

    import bench_kernels
    from axpo.kernels import clipped_policy_loss, linear_logprob_entropy, linear_policy_loss
    from axpo.kernels.linear_policy_loss import _DEFAULT_WORKSPACE_MIB

    s, dev = ctx.s, ctx.dev
    B, T, H, V = s["head_B"], s["head_T"], s["H"], s["V"]
    N = B * T
    X, W, y, mask, adv, old, ref = _head_inputs(ctx, B, T, 7)
    beta = 0.04
    ck = {} if s["head_chunk_tokens"] is None else {"chunk_tokens": s["head_chunk_tokens"]}
    n_chunks, chunk = _n_chunks(N, V, dev, s["head_chunk_tokens"], defaults=_DEFAULT_WORKSPACE_MIB)

    def leaves():
        return X.detach().requires_grad_(), W.detach().requires_grad_()

    def axpo_fused(args):
        x, w = args
        loss, _ = linear_policy_loss(x, w, y, old, adv, mask, ref_logp=ref, beta=beta, **ck)
        loss.backward()
        return loss

    def axpo_composed(args):   # two ops, 4 GEMMs (the head's backward recomputes the logits)
        x, w = args
        lp, _ = linear_logprob_entropy(x, w, y, return_entropy=False, **ck)
        loss, _ = clipped_policy_loss(lp, old, adv, mask, ref_logp=ref, beta=beta)
        loss.backward()
        return loss

    providers = {"axpo_fused": axpo_fused, "axpo_composed": axpo_composed}
    liger_note = None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # loss_type="dapo" is the same token mean; compiled as Liger ships it, except on CPU where
        # the compile would take longer than the tiny run itself.
        liger_mod = LigerFusedLinearGRPOLoss(beta=beta, loss_type="dapo", use_ref_model=True,
                                             compiled=dev.type == "cuda")

        def liger(args):
            x, w = args
            loss, _ = liger_mod(x, w, y, mask.float(), adv, ref_per_token_logps=ref, old_per_token_logps=old)
            loss.backward()
            return loss

        providers["liger_grpo"] = liger
    except Exception as e:
        liger_note = f"Liger skipped: liger_kernel not importable ({type(e).__name__}: {str(e)[:120]})"

    # Correctness at this size: same loss and gradients from every provider (relative norms).
    grads, first_call = {}, {}
    for name, fn in list(providers.items()):
        x, w = leaves()
        t0 = time.perf_counter()
        try:
            loss = fn((x, w))
        except Exception as e:
            if name != "liger_grpo":
                raise
            providers.pop(name)
            liger_note = f"Liger skipped: its call failed ({type(e).__name__}: {str(e)[:160]})"
            continue
        if dev.type == "cuda":
            torch.cuda.synchronize()
        first_call[name] = time.perf_counter() - t0   # includes Triton / torch.compile compilation
        grads[name] = (float(loss.detach()), x.grad, w.grad)
        del x, w, loss
    base = grads["axpo_fused"]
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))  # noqa: E731
    agree = {}
    for name, (l, dx, dw) in grads.items():
        if name == "axpo_fused":
            continue
        agree[name] = {"loss": l, "loss_fused": base[0], "rel_dX": rel(base[1], dx), "rel_dW": rel(base[2], dw)}
    finite = all(math.isfinite(g[0]) and bool(torch.isfinite(g[1]).all()) and bool(torch.isfinite(g[2]).all())
                 for g in grads.values())
    del grads, base

    # The floor: the three GEMMs of an unfused head alone, outputs preallocated (logits stored).
    Xf = X.reshape(N, H)
    buf = {"L": torch.empty(N, V, device=dev, dtype=X.dtype), "dX": torch.empty(N, H, device=dev, dtype=X.dtype),
           "dW": torch.empty(V, H, device=dev, dtype=X.dtype)}
    floor_bytes = sum(t.numel() * t.element_size() for t in buf.values())

    def floor():
        torch.mm(Xf, W.t(), out=buf["L"])
        torch.mm(buf["L"], W, out=buf["dX"])
        torch.mm(buf["L"].t(), Xf, out=buf["dW"])

    floor()
    rounds_log = io.StringIO()
    with contextlib.redirect_stdout(rounds_log):   # its per-round lines go to the JSON, not the screen
        res, tf = bench_kernels._interleaved(providers, floor, leaves, s["head_reps"], dev)
    buf.clear()
    flops = 6 * N * H * V
    out = {"shape": f"N={N}({B}x{T}),H={H},V={V}", "chunks": n_chunks, "chunk_tokens": chunk, "agreement": agree,
           "first_call_s": first_call, "floor": {**tf, "buffers_bytes": floor_bytes, **ctx.flops(flops, tf["median_s"])},
           "rounds": rounds_log.getvalue().splitlines(), "liger": liger_note or "compared"}
    parts = [f"floor {_fmt_s(tf['median_s'])} ({flops / tf['median_s'] / 1e12:.0f} TFLOP/s, "
             f"logits stored: {floor_bytes / 2**30:.1f} GiB)"]
    for name, t in res.items():
        out[name] = {k: v for k, v in t.items() if k != "times_s"} | {"times_s": t["times_s"],
                                                                      "ratio_to_floor": t["median_s"] / tf["median_s"]}
        parts.append(f"{name} {_fmt_s(t['median_s'])} x{t['median_s'] / tf['median_s']:.2f} floor, "
                     f"peak +{t['peak_bytes'] / 2**30:.2f} GiB")
    if "liger_grpo" in res:
        a, lg = res["axpo_fused"], res["liger_grpo"]
        out["fused_vs_liger"] = {"time": a["median_s"] / lg["median_s"], "peak": a["peak_bytes"] / max(1, lg["peak_bytes"])}
        parts.append(f"fused/Liger time x{out['fused_vs_liger']['time']:.2f}, peak x{out['fused_vs_liger']['peak']:.2f}")
    worst = max([v for a in agree.values() for k, v in a.items() if k.startswith("rel_")] or [0.0])
    ok = finite and n_chunks > 1 and worst < 2e-2
    line = (f"bf16 N={N}({B}x{T}) H={H} V={V}, {n_chunks} chunks: " + "; ".join(parts)
            + f"; grads agree within {worst:.1e} (rel. norm)" + ("" if finite else "; NON-FINITE")
            + ("" if n_chunks > 1 else "; NOT multi-chunk") + (f"; {liger_note}" if liger_note else ""))
    return ("pass" if ok else "fail"), line, out


def check_train(ctx: Ctx):
    """One copy-pretrain, SFT and RL step of the tiny model under torchrun (one process), in bf16;
    on CUDA that is the NCCL (+gloo for CPU tensors) process group."""
    run_dir = ctx.work / "train_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    probe = ctx.work / "train_probe.json"
    probe.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(Path(__file__).resolve()), "train-worker", "--probe", str(probe), "--",
           "--config", TRAIN_CONFIG, "--output-dir", str(run_dir), *TRAIN_OVERRIDES]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    # Nothing can be fetched there: never let a hub look-up wait for a network that is not there.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    # The interpreter settings of a CPU rehearsal are for the kernel checks; the trainer runs as a
    # user would run it.
    env.pop("TRITON_INTERPRET", None)
    env.pop("AXPO_KERNEL_BACKEND", None)
    log_path = ctx.out / "train.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               timeout=ctx.s.get("train_timeout_s", 300))
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.time() - t0
    data = {"cmd": cmd, "rc": rc, "wall_s": wall}
    if rc is None:
        return "fail", f"torchrun did not finish in {ctx.s.get('train_timeout_s', 300)} s (train.log)", data
    try:
        data["probe"] = json.loads(probe.read_text())
    except Exception:
        data["probe"] = None
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        shutil.copy(run_dir / "metrics.jsonl", ctx.out / "train_metrics.jsonl")
        for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
    if rc != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        return "fail", f"torchrun exited {rc}: {tail[0][:300]} (train.log)", data
    stage = {r["stage"]: r for r in rows if r.get("stage") in ("pretrain", "sft", "rl")}
    problems = []
    for name in ("pretrain", "sft", "rl"):
        r = stage.get(name)
        if r is None:
            problems.append(f"no {name} row")
            continue
        if not (isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])):
            problems.append(f"{name} loss {r.get('loss')}")
        if r.get("skipped"):
            problems.append(f"{name} step skipped (non-finite)")
    if "sft" in stage and not (math.isfinite(stage["sft"].get("grad_norm", float("nan")))
                               and stage["sft"].get("grad_norm", 0) > 0):
        problems.append(f"sft grad_norm {stage['sft'].get('grad_norm')}")
    if "rl" in stage and not stage["rl"].get("trained_tokens", 0) > 0:
        problems.append("rl trained no token")
    p = data["probe"] or {}
    if ctx.dev.type == "cuda":
        if not str(p.get("device", "")).startswith("cuda"):
            problems.append(f"trainer device {p.get('device')}, not CUDA")
        if "nccl" not in str(p.get("backend", "")):
            problems.append(f"process group backend {p.get('backend')}, not NCCL")
    data["metrics"] = {k: {m: v.get(m) for m in ("loss", "grad_norm", "skipped", "trained_tokens", "step_time",
                                                   "rollout_tokens") if m in v} for k, v in stage.items()}
    f = lambda x: "-" if x is None else f"{x:.3g}"   # noqa: E731
    line = (f"torchrun x1, {p.get('backend')} on {p.get('device')}, bf16: "
            + ", ".join(f"{k} loss {f(v.get('loss'))} grad_norm {f(v.get('grad_norm'))}"
                        for k, v in data["metrics"].items())
            + f"; rl trained {f(stage.get('rl', {}).get('trained_tokens'))} tokens (reward 0 for the untrained "
              f"model: zero advantages); "
            + (f"peak {p['max_memory_allocated'] / 2**20:.0f} MiB; " if p.get("max_memory_allocated") else "")
            + f"{wall:.0f} s")
    if problems:
        return "fail", line + "; " + "; ".join(problems), data
    return "pass", line, data


KERNEL_CHECKS = (
    ("kernel:logprob_entropy", check_logprob_entropy),
    ("kernel:clipped_policy_loss", check_clipped_policy_loss),
    ("kernel:grouped_policy_loss", check_grouped_policy_loss),
    ("kernel:linear_logprob_entropy", check_linear_logprob_entropy),
    ("kernel:linear_policy_loss", check_linear_policy_loss),
)
# Seconds a check needs at least (on an H100/H200, compiles included) to be started at all.
MIN_SECONDS = {"env": 5, "kernel": 20, "head": 60, "train": 120}
GROUPS = ("kernels", "head", "train")


def plan(s: dict) -> dict:
    """The shapes and the largest buffers of every check (what the rehearsal builds)."""
    b16, f64 = 2, 8
    N, V, H = s["N"], s["V"], s["H"]
    hN = s["head_B"] * s["head_T"]
    rows = min(s["ref_rows"], N)
    return {
        "kernel:logprob_entropy": {"logits": [N, V], "bytes": 2 * N * V * b16, "fp64_chunk": [rows, V],
                                   "fp64_chunk_bytes": rows * V * f64},
        "kernel:clipped_policy_loss": {"logp": [s["B"], s["T"]]},
        "kernel:grouped_policy_loss": {"logp": [s["B"], s["T"]], "groups": s["B"] // 4},
        "kernel:linear_logprob_entropy": {"hidden": [N, H], "weight": [V, H], "weight_fp64_bytes": 2 * V * H * f64,
                                          "bf16_reference_logits_bytes": N * V * b16},
        "kernel:linear_policy_loss": {"hidden": [s["B"], s["T"], H], "weight": [V, H]},
        "head:linear_policy_loss": {"hidden": [s["head_B"], s["head_T"], H], "weight": [V, H],
                                    "floor_logits_bytes": hN * V * b16, "fp32_dW_bytes": V * H * 4},
        "train:torchrun": {"config": TRAIN_CONFIG, "overrides": list(TRAIN_OVERRIDES)},
    }


def check_train_config() -> dict:
    """The train check's config through axpo's loader and all its checks (no CUDA needed)."""
    from axpo.config import load_config

    cfg = load_config(ROOT / TRAIN_CONFIG, list(TRAIN_OVERRIDES))
    return {"pretrain_steps": cfg.pretrain.steps, "sft_steps": cfg.sft.steps, "rl_steps": cfg.rl.steps,
            "dtype": cfg.model.dtype, "tasks": cfg.data.tasks, "tools": cfg.tools.enabled}


def run(args) -> int:
    t_start = float(os.environ.get("GPU_SMOKE_T0") or time.time())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / "axpo_gpu_smoke_work"
    work.mkdir(parents=True, exist_ok=True)
    shapes = dict(TINY if args.tiny else FULL)
    mode = "rehearse" if args.rehearse else ("cpu-tiny" if args.device == "cpu" else
                                             ("gpu-tiny" if args.tiny else "gpu"))
    summary = Summary(out, mode, shapes, args.budget_s, t_start)
    installed = out / "install.json"
    if installed.exists():   # the install step of benchmarks/gpu_smoke.sh, first in the list
        summary.add(json.loads(installed.read_text()))
    skip = {g.strip() for g in (args.skip or "").split(",") if g.strip()}
    names = set(GROUPS) | {n for n, _ in KERNEL_CHECKS}
    unknown = skip - names
    if unknown:
        raise SystemExit(f"--skip: unknown {sorted(unknown)}; choose from {', '.join(sorted(names))}")

    def record(name, status, line, data, t0):
        c = {"name": name, "status": status, "line": line, "wall_s": round(time.time() - t0, 2), "data": data}
        summary.add(c)
        say(f"{status.upper():4s} {name}: {line} [{c['wall_s']:.1f} s]")
        return c

    # -- everything before the first CUDA call: imports, shapes, the train config ---------------
    t0 = time.time()
    sys.path.insert(0, str(HERE))
    import warnings

    import torch

    import bench_kernels  # noqa: F401  (the head check reuses its interleaved timing)
    import common  # noqa: F401
    from axpo.kernels import (clipped_policy_loss, grouped_policy_loss, linear_logprob_entropy,  # noqa: F401
                              linear_policy_loss, logprob_entropy)

    warnings.filterwarnings("ignore", message=".*TF32.*")
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        liger = "importable"
    except Exception as e:
        liger = f"absent ({type(e).__name__})"
    try:
        cfg_info = check_train_config()
        status, cfg_line = "pass", f"train overrides accepted by axpo's config loader and checks: {cfg_info}"
    except Exception as e:
        cfg_info, status, cfg_line = {"error": str(e)}, "fail", f"train overrides rejected: {e}"
    p = plan(shapes)
    summary.d["plan"] = p
    record("prepare", status, f"imports ok (torch {torch.__version__}, liger {liger}); {cfg_line}",
           {"train_config": cfg_info, "plan": p}, t0)
    if args.rehearse:
        big = max(v.get("bytes", 0) + v.get("fp64_chunk_bytes", 0) for v in p.values() if isinstance(v, dict))
        record("rehearse", "pass",
               f"stopping before the first CUDA call (torch.cuda.is_available() comes next); largest planned "
               f"buffers {big / 2**30:.1f} GiB", {"stopped_before": "torch.cuda.is_available()"}, time.time())
        return 0 if summary.d["ok"] else 1

    # -- the first CUDA call ---------------------------------------------------------------------
    if args.device == "cuda" and not torch.cuda.is_available():
        record("env", "fail", "torch.cuda.is_available() is False: no GPU visible to this torch "
               f"({torch.__version__})", {}, time.time())
        return 1
    dev = torch.device(args.device if args.device == "cpu" else "cuda:0")
    ctx = Ctx(dev, shapes, out, work, {})
    t_train_left = MIN_SECONDS["train"] if "train" not in skip else 0

    def left():
        return args.budget_s - (time.time() - t_start)

    def guarded(name, fn, group, reserve=0.0):
        t = time.time()
        need = MIN_SECONDS[group]
        if left() - reserve < need:
            return record(name, "skip", f"time budget: {left():.0f} s left of {args.budget_s:.0f} s "
                          f"(needs ~{need} s{f', {reserve:.0f} s kept for the train step' if reserve else ''})", {}, t)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            status, line, data = fn(ctx)
        except Exception as e:   # the traceback goes to the JSON: the screen keeps one line a check
            status, line, data = "fail", f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}", {
                "traceback": traceback.format_exc()[-4000:]}
        if dev.type == "cuda":
            data["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()
        return record(name, status, line, data, t)

    env_check = guarded("env", check_env, "env")
    summary.d["env"] = env_check["data"]
    if "kernels" not in skip:
        for name, fn in KERNEL_CHECKS:
            if name not in skip:
                guarded(name, fn, "kernel", reserve=t_train_left)
    if "head" not in skip:
        guarded("head:linear_policy_loss", check_head, "head", reserve=t_train_left)
    if "train" not in skip:
        # torchrun's own limit: what is left of the budget (a hang must not eat the whole lease)
        shapes["train_timeout_s"] = int(min(300, max(60, left() - 15)))
        guarded("train:torchrun", check_train, "train")
    summary.write()
    n = {s: sum(c["status"] == s for c in summary.d["checks"]) for s in STATUSES}
    say(f"{'PASS' if summary.d['ok'] else 'FAIL'} gpu_smoke ({mode}): {n['pass']} passed, {n['fail']} failed, "
        f"{n['skip']} skipped in {summary.d['wall_s']:.0f} s; summary {summary.path}")
    return 0 if summary.d["ok"] else 1


def train_worker(args) -> int:
    """What torchrun runs: axpo/train.py's main() with the given arguments, plus a record of the
    device and process-group backend the trainer really got (rank 0 writes it to --probe)."""
    import torch

    import axpo.distributed as ad

    info = {}
    orig = ad.init

    def init():
        d = orig()
        import torch.distributed as dist

        info.update(device=str(d.device), world=d.world, backend=None)
        if dist.is_available() and dist.is_initialized():
            try:   # "cuda:nccl,cpu:gloo" for the two-backend group axpo.distributed builds on CUDA
                info["backend"] = str(dist.get_backend_config() if hasattr(dist, "get_backend_config")
                                      else dist.get_backend())
            except Exception as e:
                info["backend"] = f"unknown ({type(e).__name__}: {e})"
        return d

    ad.init = init
    from axpo.train import main

    rc = main(list(args.train_args))
    if torch.cuda.is_available():
        info["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    info["rc"] = rc
    if os.environ.get("RANK", "0") == "0":
        Path(args.probe).write_text(json.dumps(info))
    return rc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_out = os.environ.get("OUT") or str(ROOT / "runs" / "gpu_smoke")
    p = sub.add_parser("install", help="install the carried wheels and the project (no network)")
    p.add_argument("--out", default=default_out)
    p.add_argument("--python", default=None, help="interpreter to install into (default: this one)")
    p.add_argument("--keep-image-transformers", action="store_true",
                   help="do not install the carried transformers wheel (probe the image's own)")
    p = sub.add_parser("run", help="the checks")
    p.add_argument("--out", default=default_out, help="folder of gpu_smoke.json and the logs ($OUT there)")
    p.add_argument("--work", default=None, help="scratch folder (the train run's checkpoints)")
    p.add_argument("--rehearse", action="store_true", help="stop right before the first CUDA call")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (seconds; numbers not meaningful)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--skip", default="", help=f"comma-separated groups ({', '.join(GROUPS)}) or kernel check "
                   "names (kernel:logprob_entropy, ...) to leave out")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_SMOKE_BUDGET_S", DEFAULT_BUDGET_S)),
                   help="seconds for the whole smoke, counted from GPU_SMOKE_T0 (set by gpu_smoke.sh)")
    sub.add_parser("fetch-wheels", help="download the wheels of gpu_smoke_wheels/wheels.txt (here)")
    p = sub.add_parser("train-worker", help=argparse.SUPPRESS)
    p.add_argument("--probe", required=True)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "run" and args.tiny is False and args.device == "cpu" and not args.rehearse:
        raise SystemExit("--device cpu needs --tiny (the full shapes take hours on a CPU)")
    if args.cmd == "train-worker" and args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return {"install": install, "run": run, "fetch-wheels": fetch_wheels, "train-worker": train_worker}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
