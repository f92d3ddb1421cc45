"""Generic benchmark helpers: time a callable, measure its peak memory, describe the machine,
append JSON rows. Used by bench_kernels.py and meant for the other benchmarks too.

Timing: `time_fn` runs warm-up calls, then `repeats` timed calls (CUDA synchronised around each)
and reports the median with p20/p80, as Liger's benchmark rows do.

Peak memory, *incremental* over what was allocated before the call:
- CUDA: `torch.cuda.reset_peak_memory_stats` + `max_memory_allocated` - the caching allocator's
  exact high-water mark of live tensors.
- CPU: tracemalloc is blind to torch (its allocations bypass Python's allocator), and sampling RSS
  from a thread misses short spikes. Linux keeps the exact resident high-water mark (VmHWM) and
  lets a process reset it by writing "5" to /proc/self/clear_refs; so: reset, read VmRSS as the
  base, run, read VmHWM. This counts every page the call touched (tensors, allocator slack, any
  compile-time memory), which is the figure that decides an OOM. Where clear_refs is not
  writable, a 1 ms RSS-sampling thread is the fallback (and the row says which method was used).
  Freed memory must actually return to the OS for the base to be right; glibc does that for the
  large (mmap'd) blocks that matter here, and `gc.collect()` runs first.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import threading
import time
from datetime import datetime, timezone

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(device=None):
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def _percentile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def time_fn(fn, *, warmup=1, repeats=5, device=None, setup=None, memory=False):
    """Median / p20 / p80 seconds of `fn()` over `repeats` runs after `warmup` runs.

    `setup()` (untimed) runs before each call and its result is passed to `fn`, e.g. fresh leaf
    tensors for a forward+backward. With `memory=True` every timed call is also wrapped by the
    peak-memory probe of `peak_memory` (its cost is two /proc reads, not measurable at these
    run times) and the largest incremental peak is reported as `peak_bytes`.
    """
    times, peaks, method = [], [], None
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
        call = (lambda a=arg: fn(a)) if setup is not None else fn
        probe = _MemoryProbe(device) if (memory and i >= warmup) else None
        _sync(device)
        if probe:
            probe.start()
        t0 = time.perf_counter()
        call()
        _sync(device)
        dt = time.perf_counter() - t0
        if probe:
            peaks.append(probe.stop())
            method = probe.method
        if i >= warmup:
            times.append(dt)
        del arg, call
    out = {
        "median_s": statistics.median(times),
        "p20_s": _percentile(times, 0.2),
        "p80_s": _percentile(times, 0.8),
        "repeats": repeats,
        "warmup": warmup,
    }
    if memory:
        out["peak_bytes"] = max(peaks)
        out["mem_method"] = method
    return out


def _proc_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _can_reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_kib("VmHWM")
        return True
    except OSError:
        return False


class _MemoryProbe:
    """Incremental peak memory of whatever runs between start() and stop() (see module doc)."""

    def __init__(self, device=None):
        self.dev = torch.device(device) if device is not None else torch.device("cpu")
        self.method = None

    def start(self):
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda.max_memory_allocated"
            return
        if _can_reset_hwm():
            self.base = _proc_kib("VmRSS")
            self.method = "linux VmHWM after clear_refs"
            return
        self.method = "RSS sampled every 1 ms"
        self.base = _proc_kib("VmRSS")
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _proc_kib("VmRSS"))
                time.sleep(0.001)

        self._th = threading.Thread(target=sample, daemon=True)
        self._th.start()

    def stop(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("linux"):
            return max(0, _proc_kib("VmHWM") - self.base) * 1024
        self._stop.set()
        self._th.join()
        return max(0, max(self.peak, _proc_kib("VmRSS")) - self.base) * 1024


def peak_memory(fn, *, device=None, setup=None):
    """(incremental peak bytes, method) of one call of `fn` (or `fn(setup())`)."""
    arg = setup() if setup is not None else None
    probe = _MemoryProbe(device)
    probe.start()
    fn(arg) if setup is not None else fn()
    return probe.stop(), probe.method


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist):
    """Installed version of a distribution (liger_kernel has no __version__ attribute)."""
    try:
        from importlib.metadata import version

        return version(dist.replace("_", "-"))
    except Exception:
        try:
            return __import__(dist).__version__
        except Exception:
            return None


def _git_rev():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def env_info(device=None):
    """Hardware and software description stored with every row."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    info = {
        "host": socket.gethostname(),
        "device": str(dev),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger_kernel"),
        "git": _git_rev(),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def timestamp():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append_row(path, row):
    """Append one JSON object as a line to `path` (created with its folder if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + "\n")


def measure_copy_bandwidth(nbytes=1 << 30, repeats=5, device=None):
    """Achieved copy bandwidth (bytes read + written per second) for a `nbytes` buffer."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    t = time_fn(lambda: dst.copy_(src), warmup=1, repeats=repeats, device=dev)
    return 2 * nbytes / t["median_s"]


def format_table(rows, columns):
    """Plain fixed-width table of `rows` (dicts) over `columns` [(key, header, fmt)]."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for k, _, fmt in columns:
            v = r.get(k)
            line.append("-" if v is None else (fmt.format(v) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.rjust(w) if j and i > 1 else s.ljust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
