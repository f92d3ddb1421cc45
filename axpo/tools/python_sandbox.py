"""`python`: run model-written code in a sandboxed subprocess; return its output and figures.

Containment, outermost first (each layer catches what the one inside it misses):
- a fresh process group, killed as a whole on the wall-clock timeout;
- a network namespace with no interfaces (`unshare --net`, when we are root and it works);
- an unprivileged uid (nobody) when we are root, so the kernel enforces RLIMIT_NPROC and file
  permissions (RLIMIT_NPROC is not enforced for root);
- rlimits: CPU time, address space (memory), processes/threads, file size, open files, no core;
- a scrubbed environment and a per-call temporary working directory;
- an audit hook (`sys.addaudithook`) in the child blocking fork/exec/subprocess/kill, sockets,
  ctypes, and writes outside the working directory.
See `_sandbox_child.py` for the child side. Every containment event comes back as a
`ToolResult` with an error kind; the parent never raises for anything the code did.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from axpo.tools.base import ToolContext, ToolResult, function_schema
from axpo.tools.image_zoom import ZoomConfig, fit_to_grid

_CHILD = Path(__file__).with_name("_sandbox_child.py")

# Loaded before the uid drop (see _sandbox_child.py). Cheap (~0.1 s with numpy) next to Python's
# start-up, and covers what arithmetic and plotting code imports.
DEFAULT_PRELOAD = (
    "math", "cmath", "decimal", "fractions", "statistics", "random", "itertools", "functools",
    "operator", "collections", "heapq", "bisect", "re", "string", "json", "datetime", "time",
    "calendar", "textwrap", "copy", "pprint", "typing", "dataclasses", "enum", "numbers", "array",
    "struct", "io", "csv", "hashlib", "base64", "zlib", "unicodedata", "traceback", "warnings",
    "contextlib", "ast", "difflib", "pathlib", "glob", "fnmatch", "tempfile", "shutil",
    "encodings.latin_1", "encodings.ascii", "numpy", "numpy.linalg", "numpy.random",
)
# Preloaded only when the code names them: numpy's import is ~80 ms of a ~120 ms call, and most
# calls are plain arithmetic. Code that imports them without naming them (e.g. through
# __import__ of a computed string) still works where the sandbox user can read site-packages.
ON_MENTION = {"numpy": ("numpy", "np")}


def preload_for(code: str, preload) -> list[str]:
    """The preload modules worth loading for this code (see ON_MENTION)."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code))
    out = []
    for name in preload:
        top = name.split(".")[0]
        if top not in ON_MENTION or words & set(ON_MENTION[top]):
            out.append(name)
    return out


@dataclass
class SandboxConfig:
    wall_timeout_s: float = 5.0
    cpu_time_s: int = 5
    memory_mb: int = 512             # RLIMIT_AS; Python + numpy + matplotlib need ~300 MB of address space
    max_processes: int = 1           # RLIMIT_NPROC for the child's uid: 1 = no fork, no threads
    max_file_mb: int = 16            # RLIMIT_FSIZE: bounds stdout/stderr files and figures
    max_open_files: int = 256
    max_output_chars: int = 1000     # stdout+stderr shown to the model (head and tail kept)
    max_figures: int = 2
    figure_dpi: int = 72
    figure_max_pixels: int = 224 * 224  # figures are fitted to the processor grid like zoom crops
    echo_last_expression: bool = True   # print a bare final expression, notebook-style
    drop_to_user: str = "nobody"     # when running as root; "" keeps root (not recommended)
    network_namespace: bool = True   # `unshare --net` when available (root)
    python_executable: str = ""      # default: this interpreter
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    tmp_root: str = ""               # parent folder of per-call temp dirs (default: system temp)
    extra_env: dict[str, str] = field(default_factory=dict)


_unshare_ok: bool | None = None
_unshare_lock = threading.Lock()


def _unshare_available() -> bool:
    """`unshare --net` needs CAP_SYS_ADMIN; probe once instead of failing every call."""
    global _unshare_ok
    with _unshare_lock:
        if _unshare_ok is None:
            exe = shutil.which("unshare")
            try:
                _unshare_ok = bool(exe) and subprocess.run(
                    [exe, "--net", "true"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                _unshare_ok = False
        return _unshare_ok


def _read_head(path: Path, limit: int) -> tuple[str, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return "", 0
    return data.decode("utf-8", errors="replace"), size


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"


class PythonSandboxTool:
    name = "python"

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self._mpl_cache: Path | None = None
        self._mpl_lock = threading.Lock()
        self._interp: tuple[str, list[str]] | None = None
        self._interp_lock = threading.Lock()

    def schema(self) -> dict:
        return function_schema(
            self.name,
            "Run Python 3 code and return what it prints (stdout and stderr). A bare last expression "
            "is printed. matplotlib figures are returned as images. No network, no files outside the "
            f"working directory, {self.cfg.wall_timeout_s:g} s time limit.",
            {"code": {"type": "string", "description": "The Python code to run."}},
            ["code"],
        )

    # -- helpers ---------------------------------------------------------------------------

    def _target_ids(self) -> tuple[int | None, int | None]:
        if os.geteuid() != 0 or not self.cfg.drop_to_user:
            return None, None
        pw = pwd.getpwnam(self.cfg.drop_to_user)
        return pw.pw_uid, pw.pw_gid

    def _matplotlib_cache(self) -> Path | None:
        """Build matplotlib's font list once per tool and copy it into each call's config dir:
        without it every plotting call rebuilds the font cache (about a second)."""
        with self._mpl_lock:
            if self._mpl_cache is None:
                cache = Path(tempfile.mkdtemp(prefix="axpo-mplcache-"))
                weakref.finalize(self, shutil.rmtree, cache, True)  # removed with the tool (or at exit)
                env = {"PATH": os.defpath, "MPLCONFIGDIR": str(cache), "MPLBACKEND": "Agg", "HOME": str(cache)}
                try:
                    python, extra = self._interpreter()
                    setup = f"import sys; sys.path[:0] = {extra!r}; import matplotlib.font_manager"
                    subprocess.run([python, "-I", "-B", "-c", setup],
                                   env=env, capture_output=True, timeout=120)
                except (OSError, subprocess.SubprocessError):
                    pass
                self._mpl_cache = cache
            return self._mpl_cache

    def _python(self) -> str:
        return self.cfg.python_executable or sys.executable

    # -- run -------------------------------------------------------------------------------

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        return self.run(arguments["code"])

    def run(self, code: str) -> ToolResult:
        python, extra_path = self._interpreter()
        return self._execute(code, python, extra_path, self.cfg.preload)

    def _execute(self, code: str, python: str, extra_path: list[str], preload) -> ToolResult:
        workdir = Path(tempfile.mkdtemp(prefix="axpo-py-", dir=self.cfg.tmp_root or None)).resolve()
        try:
            return self._run_in(workdir, code, python, extra_path, preload)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _interpreter(self) -> tuple[str, list[str]]:
        """Pick an interpreter whose standard library the unprivileged user can read.

        A pyenv Python under /root (mode 0700) cannot import anything new once the child has
        dropped to nobody. Then a system Python of the same major.minor version is used with
        this environment's site-packages on its path (same ABI, so numpy etc. load). Probed once
        with a real sandboxed import; if nothing works, only preloaded modules are importable."""
        with self._interp_lock:
            if self._interp is None:
                own = (self._python(), [])
                self._interp = own
                if self._target_ids()[0] is not None and not self.cfg.python_executable:
                    version = f"{sys.version_info.major}.{sys.version_info.minor}"
                    extra = [p for p in site.getsitepackages() if os.path.isdir(p)]
                    candidates = [own]
                    for exe in (shutil.which(f"python{version}", path=os.defpath),
                                f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
                        if exe and os.path.exists(exe):
                            candidates.append((os.path.realpath(exe), extra))
                    probe = "import fractions, decimal, statistics, numpy\nprint('ok')"
                    for python, path in candidates:
                        if self._execute(probe, python, path, ()).text.strip() == "ok":
                            self._interp = (python, path)
                            break
                    else:
                        warnings.warn("python sandbox: the unprivileged user cannot read this "
                                      "interpreter's standard library; only preloaded modules "
                                      "can be imported by tool code", stacklevel=2)
            return self._interp

    def _run_in(self, workdir: Path, code: str, python: str, extra_path: list[str], preload) -> ToolResult:
        cfg = self.cfg
        uid, gid = self._target_ids()
        want_mpl = "matplotlib" in code or "pyplot" in code or "plt." in code
        mpl_dir = workdir / ".mpl"
        mpl_dir.mkdir()
        (workdir / "figures").mkdir()
        if want_mpl and (cache := self._matplotlib_cache()):
            for f in cache.glob("fontlist*.json"):
                shutil.copy(f, mpl_dir / f.name)
        job = {
            "code": code, "uid": uid, "gid": gid, "preload": preload_for(code, preload), "extra_sys_path": extra_path,
            "want_matplotlib": want_mpl, "memory_bytes": cfg.memory_mb * 2**20,
            "cpu_seconds": max(1, int(cfg.cpu_time_s)), "max_processes": cfg.max_processes,
            "max_file_bytes": cfg.max_file_mb * 2**20, "max_open_files": cfg.max_open_files,
            "max_figures": cfg.max_figures, "figure_dpi": cfg.figure_dpi,
            "echo_last_expression": cfg.echo_last_expression,
        }
        (workdir / "job.json").write_text(json.dumps(job))
        if uid is not None:
            for p in [workdir, workdir / "figures", mpl_dir, *mpl_dir.iterdir()]:
                os.chown(p, uid, gid)
        os.chmod(workdir, 0o700)

        env = {"PATH": os.defpath, "HOME": str(workdir), "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
               "MPLCONFIGDIR": str(mpl_dir), "TMPDIR": str(workdir),
               # One BLAS/OpenMP thread: threads count against RLIMIT_NPROC.
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               **cfg.extra_env}
        cmd = [python, "-I", "-B", "-X", "utf8", str(_CHILD), str(workdir)]
        if cfg.network_namespace and os.geteuid() == 0 and _unshare_available():
            cmd = [shutil.which("unshare"), "--net", "--", *cmd]  # unshare execs: same pid, same group

        out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
        timed_out = False
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                        env=env, cwd=workdir, start_new_session=True, close_fds=True)
            except OSError as e:
                return ToolResult(text=f"Error: the sandbox could not start ({e}).", error="sandbox_error")
            try:
                proc.wait(timeout=cfg.wall_timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Kill the whole group, also after a normal exit, in case something was left behind.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        return self._collect(workdir, proc.returncode, timed_out)

    def _collect(self, workdir: Path, returncode: int, timed_out: bool) -> ToolResult:
        cfg = self.cfg
        limit = cfg.max_output_chars
        stdout, _ = _read_head(workdir / "stdout.txt", 8 * limit)
        stderr, _ = _read_head(workdir / "stderr.txt", 8 * limit)
        violations, _ = _read_head(workdir / "violations.log", 4000)
        status_text, _ = _read_head(workdir / "status.json", 4000)
        try:
            status = json.loads(status_text) if status_text else {}
        except json.JSONDecodeError:
            status = {}
        kind = status.get("kind")
        images = self._figures(workdir / "figures")

        error, note = None, ""
        if timed_out:
            error, note = "timeout", f"the code ran longer than {cfg.wall_timeout_s:g} s and was stopped"
        elif returncode in (-signal.SIGXCPU, -signal.SIGKILL) and kind is None:
            error, note = "timeout", f"the code used more than {cfg.cpu_time_s} s of CPU time and was stopped"
        elif returncode == -signal.SIGXFSZ or "[Errno 27]" in status.get("message", ""):
            # Python ignores SIGXFSZ, so hitting RLIMIT_FSIZE usually surfaces as EFBIG (errno 27).
            error, note = "output_limit", f"the code wrote more than {cfg.max_file_mb} MB and was stopped"
        elif violations.strip():
            first = violations.strip().splitlines()[0]
            error, note = "sandbox_violation", f"blocked by the sandbox ({first}); no processes, network, " \
                                               "or file writes outside the working directory"
        elif kind == "memory" or (kind is None and "MemoryError" in stderr):
            error, note = "memory", f"the code ran out of memory (limit {cfg.memory_mb} MB)"
        elif kind == "syntax_error":
            error, note = "syntax_error", "the code has a syntax error"
        elif kind == "runtime_error" or returncode != 0:
            error, note = "runtime_error", status.get("message") or f"the code exited with status {returncode}"

        parts = []
        if error:
            parts.append(f"Error ({error}): {note}.")
        if stdout.strip():
            parts.append(stdout.rstrip("\n"))
        if stderr.strip() and error not in ("memory",):
            parts.append("[stderr]\n" + stderr.rstrip("\n"))
        if images:
            parts.append(f"[{len(images)} figure{'s' if len(images) > 1 else ''} returned as image"
                         f"{'s' if len(images) > 1 else ''}]")
        if not parts:
            parts.append("(no output)")
        return ToolResult(text=_clip("\n".join(parts), limit), images=images, error=error)

    def _figures(self, fig_dir: Path) -> list[Image.Image]:
        images = []
        budget = ZoomConfig(max_pixels=self.cfg.figure_max_pixels)
        for path in sorted(fig_dir.glob("fig_*.png"))[: self.cfg.max_figures]:
            try:
                with Image.open(path) as im:
                    if im.width * im.height > 4096 * 4096:  # not from savefig at our dpi: ignore
                        continue
                    im = im.convert("RGB")
                images.append(fit_to_grid(im, budget, upscale=False))
            except (OSError, ValueError, Image.DecompressionBombError):
                continue
        return images
