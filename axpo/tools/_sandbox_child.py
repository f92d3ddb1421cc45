"""Child side of the `python` tool sandbox. Run as `python -I -B this_file WORKDIR` by
axpo.tools.python_sandbox; reads WORKDIR/job.json, locks itself down, then runs the model's code.

Order matters: everything that needs privileges or files outside the sandbox (reading the job,
importing libraries from an interpreter the unprivileged user cannot read, opening the report
files) happens first; then the uid is dropped, resource limits are set, the audit hook goes in,
and only then does untrusted code run. Standard library only: this file must not import axpo.
"""

import ast
import importlib
import json
import os
import resource
import sys
import traceback

WORKDIR = os.path.realpath(sys.argv[1])
JOB = json.load(open(os.path.join(WORKDIR, "job.json")))

# Report channels, opened before the lock-down so they survive it. Writes go through os.write,
# which the audit hook does not see, so the hook itself can report.
_VIOL_FD = os.open(os.path.join(WORKDIR, "violations.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
_STATUS_FD = os.open(os.path.join(WORKDIR, "status.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
FIG_DIR = os.path.join(WORKDIR, "figures")  # made (and given to the sandbox user) by the parent
sys.path[:0] = JOB["extra_sys_path"]  # site-packages when running another interpreter of the same version

# Pre-import: after the uid drop the interpreter's own files may be unreadable (e.g. a pyenv
# Python under /root, mode 0700), so modules the code is likely to need are loaded now.
# ctypes dlopen()s at import (numpy imports it), which the hook would block later; subprocess and
# socket are loaded so that using them reaches the hook's events and is reported as a violation.
for _name in ["ctypes", "subprocess", "socket", *JOB["preload"]]:
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

# ---- lock-down ---------------------------------------------------------------------------
if JOB["uid"] is not None and os.geteuid() == 0:
    os.setgroups([])
    os.setgid(JOB["gid"])
    os.setuid(JOB["uid"])  # irreversible: real, effective and saved uid all change


def _limit(kind, value):
    if value is None:
        return
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
# Processes (threads count too). Enforced by the kernel only for unprivileged users, hence the
# uid drop above; the audit hook below is the first line of defence either way.
_limit(resource.RLIMIT_NPROC, JOB["max_processes"])

os.chdir(WORKDIR)
sys.dont_write_bytecode = True


class SandboxViolation(PermissionError):
    """Raised by the audit hook. A PermissionError (OSError) so library code that already copes
    with an unwritable cache (e.g. importlib's .pyc writes) keeps working."""


_BLOCKED = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "os.setsid", "subprocess.Popen", "pty.spawn", "signal.pthread_kill",
    "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.gethostname", "socket.sendto", "socket.sendmsg",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata", "ctypes.addressof",
    "sys.remote_exec", "resource.setrlimit", "resource.prlimit", "winreg.OpenKey",
}
_PATH_EVENTS = {  # event -> indices of path arguments that must stay inside WORKDIR
    "os.remove": (0,), "os.rename": (0, 1), "os.replace": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,),
    "os.chmod": (0,), "os.chown": (0,), "os.symlink": (0, 1), "os.link": (0, 1),
    "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,), "os.mkfifo": (0,),
    "os.mknod": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_in_hook = False


def _inside(path) -> bool:
    if isinstance(path, int):
        return True  # an fd: it was opened (and checked) before
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == WORKDIR or real.startswith(WORKDIR + os.sep)


def _violation(what: str):
    try:
        os.write(_VIOL_FD, (what.replace("\n", " ")[:200] + "\n").encode())
    except OSError:
        pass
    return SandboxViolation(f"sandbox: {what} is not allowed")


def _proc_of_other(path) -> bool:
    if isinstance(path, int):
        return False
    p = os.fsdecode(path)
    if not p.startswith("/proc/"):
        return False
    part = p.split("/")[2] if len(p.split("/")) > 2 else ""
    return part.isdigit() and int(part) != os.getpid()


def _hook(event, args):
    global _in_hook
    if _in_hook:
        return
    _in_hook = True
    try:
        if event in _BLOCKED:
            raise _violation(event)
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not _inside(path):
                raise _violation(f"writing {os.fsdecode(path) if not isinstance(path, int) else path}")
            if _proc_of_other(path):
                raise _violation(f"reading {os.fsdecode(path)}")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and args[i] is not None and not _inside(args[i]):
                    raise _violation(f"{event} on {os.fsdecode(args[i])}")
    finally:
        _in_hook = False


# ---- run -----------------------------------------------------------------------------------
_figure_count = 0


def _save_figures():
    global _figure_count
    plt = _plt or sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    for num in plt.get_fignums():
        if _figure_count < JOB["max_figures"]:
            plt.figure(num).savefig(os.path.join(FIG_DIR, f"fig_{_figure_count:03d}.png"), dpi=JOB["figure_dpi"])
            _figure_count += 1
    plt.close("all")


if _plt is not None:
    _plt.show = lambda *a, **k: _save_figures()  # under Agg show() is a no-op: keep the figure


def _report(kind, message=""):
    os.write(_STATUS_FD, json.dumps({"kind": kind, "message": message[-2000:]}).encode())


def _run(code: str):
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


sys.addaudithook(_hook)
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
    # Show only the model's own frames and the libraries it called, not this runner or the hook.
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
    except (OSError, ValueError):  # e.g. EFBIG after the output hit RLIMIT_FSIZE
        pass
_report(kind, message)
os._exit(0)  # skip interpreter teardown: nothing left to flush, and it could fail the same way
