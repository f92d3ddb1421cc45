"""Runner inside the `python` tool's bubblewrap sandbox (see axpo.tools.python_sandbox).

Run as `python -I -B -X utf8 /.axpo/child.py` inside the sandbox; reads /.axpo/job.json, sets
resource limits, runs the model's code, then sends a status and the figures to the parent as
frames (tag byte, 4-byte big-endian length, payload) on the result pipe `job["result_fd"]`.

This file is not a security boundary: the sandbox (namespaces, read-only mounts, seccomp, no
capabilities) is. Once the model's code runs it can change anything in this process, including
what is sent back; the parent treats every byte it receives as untrusted and caps its size.
Standard library only: this file must not import axpo (axpo is not inside the sandbox).
"""

import ast
import importlib
import io
import json
import linecache
import os
import resource
import struct
import sys
import traceback

JOB = json.load(open("/.axpo/job.json"))
WORKDIR = JOB["workdir"]
_RESULT_FD = JOB["result_fd"]
os.chdir(WORKDIR)

# matplotlib's font list, built once by the parent, copied so that plotting does not rebuild it.
_mpl_dir = os.path.join(WORKDIR, ".mpl")
os.makedirs(_mpl_dir, exist_ok=True)
if JOB["want_matplotlib"] and os.path.isdir(JOB["mpl_cache"]):
    for _f in os.listdir(JOB["mpl_cache"]):
        if _f.startswith("fontlist") and _f.endswith(".json"):
            try:
                with open(os.path.join(JOB["mpl_cache"], _f), "rb") as _src, \
                        open(os.path.join(_mpl_dir, _f), "wb") as _dst:
                    _dst.write(_src.read())
            except OSError:
                pass

for _name in JOB["preload"]:
    try:
        importlib.import_module(_name)
    except Exception:  # an optional library that is not installed
        pass
_plt = None
if JOB["want_matplotlib"]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as _plt
    except Exception:
        _plt = None


def _limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    value = int(value)
    new_hard = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (min(value, new_hard), new_hard))


_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_AS, JOB["memory_bytes"])
_limit(resource.RLIMIT_FSIZE, JOB["max_file_bytes"])
_limit(resource.RLIMIT_NOFILE, JOB["max_open_files"])
# CPU: SIGXCPU at the soft limit, SIGKILL one second later.
_soft_cpu = int(JOB["cpu_seconds"])
resource.setrlimit(resource.RLIMIT_CPU, (_soft_cpu, _soft_cpu + 1))
# Processes and threads of this uid in the sandbox's own user namespace (bwrap's init is one):
# enforced by the kernel, since nothing in the sandbox has CAP_SYS_RESOURCE.
_limit(resource.RLIMIT_NPROC, JOB["max_processes"])
sys.dont_write_bytecode = True


def _send(tag: bytes, payload: bytes) -> None:
    data = struct.pack(">cI", tag, len(payload)) + payload
    try:
        while data:
            data = data[os.write(_RESULT_FD, data):]
    except OSError:
        pass


# ---- run -----------------------------------------------------------------------------------
_figure_count = 0


def _save_figures():
    global _figure_count
    plt = _plt or sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    for num in plt.get_fignums():
        if _figure_count < JOB["max_figures"]:
            buf = io.BytesIO()
            plt.figure(num).savefig(buf, format="png", dpi=JOB["figure_dpi"])
            _send(b"F", buf.getvalue())
            _figure_count += 1
    plt.close("all")


if _plt is not None:
    _plt.show = lambda *a, **k: _save_figures()  # under Agg show() is a no-op: keep the figure


def _run(code: str):
    # Tracebacks show the failing lines of the code, as they would for a file.
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    tree = ast.parse(code, filename="<code>")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    last = None
    # Notebook-style echo: a bare final expression is printed, as models often end with one.
    if JOB["echo_last_expression"] and tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<code>", "exec"), namespace)
    if last is not None:
        value = eval(compile(last, "<code>", "eval"), namespace)
        if value is not None:
            print(repr(value))


try:
    _run(JOB["code"])
    kind, message = "ok", ""
except SystemExit as e:
    kind, message = ("ok", "") if e.code in (None, 0) else ("runtime_error", f"SystemExit: {e.code}")
except SyntaxError as e:
    traceback.print_exception(type(e), e, None, limit=0)
    kind, message = "syntax_error", f"{type(e).__name__}: {e}"
except MemoryError:
    kind, message = "memory", "MemoryError"
except BaseException as e:  # the model's exception: show it the way Python would
    # Show only the model's own frames and the libraries it called, not this runner.
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename != __file__]
    print("Traceback (most recent call last):", file=sys.stderr)
    print("".join(traceback.format_list(frames)), end="", file=sys.stderr)
    print("".join(traceback.format_exception_only(type(e), e)), end="", file=sys.stderr)
    kind, message = "runtime_error", f"{type(e).__name__}: {e}"
try:
    _save_figures()
except BaseException as e:
    print(f"could not save figures: {type(e).__name__}: {e}", file=sys.stderr)
for _stream in (sys.stdout, sys.stderr):
    try:
        _stream.flush()
    except (OSError, ValueError):
        pass
try:  # the working folder's inode cap was reached (its tmpfs has no free inode left)
    _files_full = os.statvfs(WORKDIR).f_ffree == 0
except OSError:
    _files_full = False
_send(b"S", json.dumps({"kind": kind, "message": message[-2000:], "files_full": _files_full}).encode())
os._exit(0)  # skip interpreter teardown: nothing left to flush, and it could fail the same way
