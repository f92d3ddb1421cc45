"""`python`: run model-written code in an OS-isolated sandbox; return its output and figures.

Isolation is done by the kernel, through bubblewrap (`bwrap`), never by code running inside the
sandbox. Every call gets a fresh sandbox:

- new user, mount, pid, network, ipc, uts and cgroup namespaces (`--unshare-all --unshare-user`),
  no nested user namespaces (`--disable-userns`), no capabilities, `no_new_privs`, a new session,
  and `--die-with-parent`;
- a read-only root made of read-only binds of only what the interpreter needs: /usr (and the
  /bin, /lib* links), a few /etc files for the dynamic loader, the interpreter's prefixes and
  site-packages; its own /proc (its own pid namespace: the trainer is not visible), a minimal
  /dev, no /sys, no host sockets, a network namespace with only a loopback interface;
- a private tmpfs working folder capped by the kernel in bytes (`size=`) and in files and folders
  (`nr_inodes=`), gone when the call ends. bwrap cannot pass `nr_inodes`, so a launcher mounts
  the tmpfs in a private mount namespace first (`unshare --mount`, plus `--user --map-root-user`
  when the trainer is not root) and bwrap binds it. Where that launcher cannot run (a host that
  refuses `unshare --user` to unprivileged users but allows bwrap), the folder falls back to
  bwrap's own `--tmpfs --size` with the file count polled by the parent, and a warning says so;
- rlimits (CPU, address space, file size, open files, processes: `max_processes=1` = no fork, no
  threads), a seccomp filter on x86-64 (ptrace, keyrings, bpf, perf, io_uring, userfaultfd,
  memfd, mount API, namespace flags, ...), and an environment cleared to a short whitelist;
- when the trainer is root, bwrap itself runs as `drop_to_user` (nobody): the sandbox's processes
  then have no host privileges even in the kernel's eyes (a uid-0 process without capabilities
  can still write root-owned /proc/sys files). Interpreter folders under private parents (a venv
  or pyenv under /root, mode 0700) are made reachable for that user by binding them into a
  private mount namespace of the launcher (`unshare --mount`), never by changing the host.

Results come back only through pipes: stdout and stderr, and one pipe of framed messages
(status JSON, figure PNGs) from the child runner. The parent reads them with size caps and a hard
wall-clock deadline, and never opens a file the sandbox could have written, so symlinks and FIFOs
planted by the code cannot reach it. On the deadline, or when a cap is hit, bwrap and the
sandbox's init are killed; with the pid namespace gone, every process of the call is gone.

Without a usable bubblewrap, the tool does not run code: each call returns an error result of kind
`sandbox_unavailable` whose text names bubblewrap and how to install it, and `check()` raises
`SandboxUnavailable` with the same message (call it at start-up to fail fast). Construction never
raises, so building the tool set for its schemas (e.g. the tokenizer corpus) works anywhere.
See `_sandbox_child.py` for the runner inside the sandbox.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import platform
import pwd
import re
import selectors
import shutil
import signal
import site
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from axpo.tools.base import ToolContext, ToolResult, function_schema
from axpo.tools.image_zoom import ZoomConfig, fit_to_grid

log = logging.getLogger(__name__)

_CHILD = Path(__file__).with_name("_sandbox_child.py")

INSTALL_HINT = (
    "the python tool runs code only inside a bubblewrap sandbox. Install bubblewrap "
    "(`apt-get install bubblewrap` on Debian/Ubuntu, `dnf install bubblewrap` on Fedora, "
    "`apk add bubblewrap` on Alpine); it needs unprivileged user namespaces "
    "(sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 where that exists, "
    "and no AppArmor restrict_unprivileged_userns for bwrap)"
)

# Imported before the limits go in. Kept short: the sandbox can import anything from the bound
# interpreter later, and every preloaded module costs each call start-up time.
DEFAULT_PRELOAD = ("math", "numpy")
# Preloaded only when the code names them: numpy's import is most of a plain call's time, and most
# calls are plain arithmetic. Code that imports them without naming them still works (the
# interpreter's site-packages are bound into the sandbox).
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
    max_processes: int = 1           # RLIMIT_NPROC inside the sandbox's user namespace: 1 = no fork, no threads
    max_file_mb: int = 16            # RLIMIT_FSIZE per file, and the cap on stdout+stderr together
    max_open_files: int = 256
    max_output_chars: int = 1000     # stdout+stderr shown to the model (head and tail kept)
    max_figures: int = 2
    figure_dpi: int = 72
    figure_max_pixels: int = 224 * 224  # figures are fitted to the processor grid like zoom crops
    echo_last_expression: bool = True   # print a bare final expression, notebook-style
    drop_to_user: str = "nobody"     # when the trainer is root, bwrap runs as this user (required: "" = unavailable)
    python_executable: str = ""      # default: this interpreter
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    tmp_root: str = ""               # parent folder of the tool's own temp dirs (default: system temp)
    extra_env: dict[str, str] = field(default_factory=dict)
    work_mb: int = 64                # tmpfs size of the sandbox's working folder
    max_files: int = 2000            # files + folders in the working folder (tmpfs nr_inodes: a kernel limit)
    bwrap: str = ""                  # path of bwrap (default: found on PATH)
    seccomp: bool = True             # the syscall filter (x86-64 only; elsewhere namespaces and rlimits only)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox here."""


# ---- seccomp ----------------------------------------------------------------------------------

# x86-64 syscall numbers (asm/unistd_64.h) refused with EPERM. None of them is needed by Python,
# numpy or matplotlib; each is kernel attack surface or a way around the other limits.
_X86_64_DENY = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153,
    "pivot_root": 155, "chroot": 161, "acct": 163, "mount": 165, "umount2": 166, "swapon": 167,
    "swapoff": 168, "reboot": 169, "iopl": 172, "ioperm": 173, "create_module": 174,
    "init_module": 175, "delete_module": 176, "get_kernel_syms": 177, "query_module": 178,
    "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "unshare": 272, "move_pages": 279, "perf_event_open": 298,
    "fanotify_init": 300, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "memfd_create": 319, "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "pidfd_getfd": 438, "mount_setattr": 442,
}
_X86_64_CLONE, _X86_64_CLONE3, _X86_64_IOCTL = 56, 435, 16
_AUDIT_ARCH_X86_64 = 0xC000003E
_CLONE_NS_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C


def seccomp_program() -> bytes | None:
    """A classic-BPF seccomp program (the bytes bwrap --seccomp reads), or None off x86-64.

    Other architectures (and the x32 ABI) are killed; listed syscalls fail with EPERM; clone3 fails
    with ENOSYS so glibc falls back to clone, whose flags (unlike clone3's) can be checked: any
    new-namespace flag is refused; ioctl TIOCSTI / TIOCLINUX (typing into a terminal) is refused."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    EPERM, ENOSYS = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    prog: list[list] = []  # [code, jt, jf, k]; jt/jf may be labels resolved below

    def op(code, k=0, jt=0, jf=0):
        prog.append([code, jt, jf, k])

    op(LD, 4)                                   # seccomp_data.arch
    op(JEQ, _AUDIT_ARCH_X86_64, 0, "kill")
    op(LD, 0)                                   # seccomp_data.nr
    op(JGE, 0x40000000, "kill", 0)              # x32 ABI
    for nr in sorted(set(_X86_64_DENY.values())):
        op(JEQ, nr, "eperm", 0)
    op(JEQ, _X86_64_CLONE3, "enosys", 0)
    op(JEQ, _X86_64_CLONE, "clone", 0)
    op(JEQ, _X86_64_IOCTL, "ioctl", 0)
    op(RET, ALLOW)
    labels = {"clone": len(prog)}
    op(LD, 16)                                  # args[0], low 32 bits: clone flags
    op(JSET, _CLONE_NS_FLAGS, "eperm", 0)
    op(RET, ALLOW)
    labels["ioctl"] = len(prog)
    op(LD, 24)                                  # args[1], low 32 bits: the request
    op(JEQ, _TIOCSTI, "eperm", 0)
    op(JEQ, _TIOCLINUX, "eperm", 0)
    op(RET, ALLOW)
    labels["eperm"] = len(prog)
    op(RET, EPERM)
    labels["enosys"] = len(prog)
    op(RET, ENOSYS)
    labels["kill"] = len(prog)
    op(RET, KILL)
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        assert 0 <= jt < 256 and 0 <= jf < 256
        out += struct.pack("=HBBI", code, jt, jf, k)
    return out


# ---- helpers ----------------------------------------------------------------------------------

def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{text[-tail:]}"


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_RUNNER_DIR = "/.axpo"  # job.json, child.py and the matplotlib font cache, read-only in the sandbox
_FRAME = struct.Struct(">cI")  # result frames from the runner: tag (b"S" status, b"F" figure), length
_FIGURE_CAP = 4 << 20          # bytes per figure PNG
_STAGE_SCRIPT = r"""set -e
stage=$1; uid=$2; gid=$3; size=$4; inodes=$5; n=$6; shift 6
mount -t tmpfs -o mode=0755,size=64k axpo-stage "$stage"
mkdir "$stage/work"
mount -t tmpfs -o "mode=0700,uid=$uid,gid=$gid,size=$size,nr_inodes=$inodes" axpo-work "$stage/work"
i=0
while [ "$i" -lt "$n" ]; do
  if [ -d "$1" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
  mount --rbind "$1" "$stage/$i"
  shift; i=$((i + 1))
done
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
"""
# The trainer is not root: a user namespace of its own (its uid mapped to 0 there), whose root
# mounts the working tmpfs with its caps over an empty folder of the tool's temp dir, in a private
# mount namespace, then runs bwrap (without capabilities: exec as uid 0 of that namespace keeps
# them, so bwrap is told --cap-drop ALL and nests its own user namespace as usual).
_WORK_SCRIPT = r"""set -e
mount -t tmpfs -o "mode=0700,size=$2,nr_inodes=$3" axpo-work "$1"
shift 3
exec "$@"
"""


@dataclass
class _Layout:
    """What the sandbox is made of for one interpreter; computed once per tool."""
    python: str
    binds: list[str]            # host folders bound read-only at the same path
    work: str                   # the working folder inside the sandbox
    bwrap: str
    run_as: tuple[int, int] | None  # (uid, gid) bwrap runs as (trainer is root), or None
    stage_dir: str | None       # mount point for the launcher's private binds (trainer is root)
    work_mount: str | None = None   # trainer not root: the empty folder the launcher mounts the
                                    # working tmpfs over; None = bwrap's own --tmpfs (polled count)


class PythonSandboxTool:
    name = "python"
    # The registry's per-call wall-clock limit is not needed: every call here is bounded by its own
    # deadline (wall_timeout_s, then a kill and at most a few seconds of draining; the first
    # plotting call also builds matplotlib's font cache, bounded at 120 s).
    timeout_s = None

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self._mpl_cache: Path | None = None
        self._mpl_lock = threading.Lock()
        self._layout: _Layout | None = None
        self._unavailable: str | None = None
        self._ready_lock = threading.Lock()
        self._child_src = _CHILD.read_bytes()
        self._seccomp = seccomp_program() if self.cfg.seccomp else None
        self._tmp: Path | None = None

    def schema(self) -> dict:
        return function_schema(
            self.name,
            "Run Python 3 code and return what it prints (stdout and stderr). A bare last expression "
            "is printed. matplotlib figures are returned as images. No network, no files outside the "
            f"working directory, {self.cfg.wall_timeout_s:g} s time limit.",
            {"code": {"type": "string", "description": "The Python code to run."}},
            ["code"],
        )

    # -- set-up ------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise SandboxUnavailable (naming bubblewrap and how to install it) unless a sandboxed
        call works here. Probes once per tool (one sandboxed `print`)."""
        self._ensure_ready()
        if self._unavailable:
            raise SandboxUnavailable(self._unavailable)

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="axpo-sandbox-", dir=self.cfg.tmp_root or None))
            # Traversable by the sandbox user; it holds only the stage mount point and the
            # matplotlib font cache, nothing private.
            os.chmod(self._tmp, 0o755)
            weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        return self._tmp

    def _ensure_ready(self) -> None:
        with self._ready_lock:
            if self._layout is not None or self._unavailable is not None:
                return
            try:
                layout = self._make_layout()
            except SandboxUnavailable as e:
                self._unavailable = str(e)
                return
            self._layout = layout
            probe = self._execute("print('ok')", (), probe=True)
            if (probe.error or probe.text.strip() != "ok") and layout.work_mount is not None:
                # This host refuses the launcher's user namespace (e.g. an AppArmor policy that
                # allows bwrap only): keep the sandbox, with the file count polled instead.
                first = probe.text.strip()[:300]
                self._layout = dataclasses.replace(layout, work_mount=None)
                probe = self._execute("print('ok')", (), probe=True)
                if not probe.error and probe.text.strip() == "ok":
                    log.warning("python sandbox: the working folder's file cap is polled, not a kernel "
                                "limit (`unshare --user --map-root-user --mount` failed here: %s)", first)
            if probe.error or probe.text.strip() != "ok":
                self._layout = None
                self._unavailable = (f"{INSTALL_HINT}. A test sandbox failed here: "
                                     f"{probe.text.strip()[:400]}")

    def _make_layout(self) -> _Layout:
        cfg = self.cfg
        bwrap = cfg.bwrap or shutil.which("bwrap") or ("/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap") else "")
        if not bwrap or not os.access(bwrap, os.X_OK):
            raise SandboxUnavailable(f"{INSTALL_HINT}. `bwrap` was not found.")
        python = cfg.python_executable or sys.executable
        if cfg.python_executable:
            query = ("import sys, site, json; print(json.dumps([sys.prefix, sys.base_prefix, "
                     "sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()]))")
            try:
                out = subprocess.run([python, "-I", "-c", query], capture_output=True, text=True,
                                     timeout=30, env={"PATH": os.defpath})
                paths = json.loads(out.stdout)
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                raise SandboxUnavailable(f"cannot inspect {python}: {e}") from e
        else:
            paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                     *site.getsitepackages()]
        paths += [os.path.dirname(python), os.path.dirname(os.path.realpath(python))]
        binds: list[str] = []
        for p in sorted({os.path.abspath(q) for p in paths for q in (p, os.path.realpath(p))}, key=len):
            if os.path.isdir(p) and not _under(p, _SYSTEM_DIRS) and not _under(p, binds) and p != "/":
                binds.append(p)
        work = "/sandbox"
        if any(_under(b, [work]) or _under(work, [b]) for b in binds):
            work = f"/sandbox-{os.urandom(4).hex()}"
        run_as = stage = None
        if os.geteuid() == 0 and not cfg.drop_to_user:
            raise SandboxUnavailable(
                "the trainer runs as root and drop_to_user is empty: a sandbox whose processes are "
                "uid 0 on the host can write root-owned /proc/sys files even without capabilities; "
                "set drop_to_user to an unprivileged user (default nobody)")
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(cfg.drop_to_user)
            except KeyError as e:
                raise SandboxUnavailable(f"drop_to_user {cfg.drop_to_user!r} does not exist") from e
            run_as = (pw.pw_uid, pw.pw_gid)
            missing = [t for t in ("unshare", "setpriv", "mount") if not shutil.which(t, path=os.defpath)]
            if missing:
                raise SandboxUnavailable(f"running as root, the sandbox launcher needs {', '.join(missing)} "
                                         "(util-linux and mount packages)")
            stage = str(self._tmpdir() / "stage")
            os.makedirs(stage, exist_ok=True)
        work_mount = None
        if stage is None and shutil.which("unshare", path=os.defpath) and shutil.which("mount", path=os.defpath):
            work_mount = str(self._tmpdir() / "work")
            os.makedirs(work_mount, exist_ok=True)
        return _Layout(python=python, binds=binds, work=work, bwrap=bwrap, run_as=run_as,
                       stage_dir=stage, work_mount=work_mount)

    def _matplotlib_cache(self) -> Path | None:
        """Build matplotlib's font list once per tool; each plotting call gets a copy (without it
        every plotting call rebuilds the font cache, about a second)."""
        with self._mpl_lock:
            if self._mpl_cache is None:
                cache = self._tmpdir() / "mplcache"
                cache.mkdir(exist_ok=True)
                env = {"PATH": os.defpath, "MPLCONFIGDIR": str(cache), "MPLBACKEND": "Agg", "HOME": str(cache)}
                try:
                    subprocess.run([self._layout.python, "-I", "-B", "-c", "import matplotlib.font_manager"],
                                   env=env, capture_output=True, timeout=120)
                except (OSError, subprocess.SubprocessError):
                    pass
                # Readable by the sandbox user (nobody when the trainer is root).
                os.chmod(cache, 0o755)
                for f in cache.iterdir():
                    if f.is_file():
                        os.chmod(f, 0o644)
                self._mpl_cache = cache
            return self._mpl_cache

    # -- run ---------------------------------------------------------------------------------

    def __call__(self, arguments: dict, ctx: ToolContext) -> ToolResult:
        return self.run(arguments["code"])

    def run(self, code: str) -> ToolResult:
        self._ensure_ready()
        if self._unavailable:
            return ToolResult(text=f"Error: the python sandbox is unavailable: {self._unavailable}.",
                              error="sandbox_unavailable")
        return self._execute(code, preload_for(code, self.cfg.preload))

    def _command(self, lay: _Layout, fds: dict[str, int], want_mpl: bool) -> list[str]:
        cfg = self.cfg
        sources: list[str] = []   # host paths the root launcher binds into its stage first

        def src(path: str) -> str:
            if lay.stage_dir is None:
                return path
            sources.append(path)
            return f"{lay.stage_dir}/{len(sources) - 1}"

        a = [lay.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
             "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                a += ["--ro-bind", d, d]
        for f in _ETC_FILES:
            a += ["--ro-bind-try", f, f]
        for b in lay.binds:
            a += ["--ro-bind", src(b), b]
        if want_mpl and (cache := self._matplotlib_cache()):
            a += ["--ro-bind", src(str(cache)), f"{_RUNNER_DIR}/mpl"]
        a += ["--proc", "/proc", "--dev", "/dev"]
        if lay.stage_dir is not None:
            a += ["--bind", f"{lay.stage_dir}/work", lay.work]
        elif lay.work_mount is not None:
            # The sandbox keeps the trainer's uid and gid numbers (bwrap runs as 0 of the launcher's
            # namespace, which is the trainer's uid on the host).
            a += ["--uid", str(os.getuid()), "--gid", str(os.getgid()), "--bind", lay.work_mount, lay.work]
        else:
            a += ["--size", str(cfg.work_mb << 20), "--tmpfs", lay.work]
        # /tmp points into the private working folder, unless an interpreter path is bound under
        # /tmp (a venv or checkout there): then /tmp already exists in the sandbox, read-only, and
        # TMPDIR alone sends temporary files to the working folder.
        if not any(b == "/tmp" or b.startswith("/tmp/") for b in lay.binds):
            a += ["--symlink", lay.work, "/tmp"]
        a += [
              "--ro-bind-data", str(fds["job"]), f"{_RUNNER_DIR}/job.json",
              "--ro-bind-data", str(fds["child"]), f"{_RUNNER_DIR}/child.py",
              "--json-status-fd", str(fds["status"]), "--chdir", lay.work, "--clearenv"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": lay.work, "LANG": "C.UTF-8",
               "MPLBACKEND": "Agg", "MPLCONFIGDIR": f"{lay.work}/.mpl", "TMPDIR": lay.work,
               # One BLAS/OpenMP thread: threads count against RLIMIT_NPROC.
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               **cfg.extra_env}
        for k, v in env.items():
            a += ["--setenv", k, v]
        if "seccomp" in fds:
            a += ["--seccomp", str(fds["seccomp"])]
        a += ["--remount-ro", "/", "--remount-ro", "/dev",
              "--", lay.python, "-I", "-B", "-X", "utf8", f"{_RUNNER_DIR}/child.py"]
        size, inodes = str(cfg.work_mb << 20), str(cfg.max_files + 1)  # + 1: the folder itself
        unshare = shutil.which("unshare", path=os.defpath)
        if lay.stage_dir is not None:
            uid, gid = lay.run_as
            return [unshare, "--mount", "--propagation", "private", "--",
                    "/bin/sh", "-c", _STAGE_SCRIPT, "axpo-sandbox", lay.stage_dir, str(uid), str(gid),
                    size, inodes, str(len(sources)), *sources, *a]
        if lay.work_mount is not None:
            return [unshare, "--user", "--map-root-user", "--mount", "--propagation", "private", "--",
                    "/bin/sh", "-c", _WORK_SCRIPT, "axpo-sandbox", lay.work_mount, size, inodes, *a]
        return a

    def _execute(self, code: str, preload, probe: bool = False) -> ToolResult:
        cfg, lay = self.cfg, self._layout
        want_mpl = not probe and ("matplotlib" in code or "pyplot" in code or "plt." in code)
        res_r, res_w = os.pipe()
        st_r, st_w = os.pipe()
        job = {
            "code": code, "workdir": lay.work, "result_fd": res_w, "preload": list(preload),
            "want_matplotlib": want_mpl, "memory_bytes": cfg.memory_mb << 20,
            "cpu_seconds": max(1, int(cfg.cpu_time_s)), "max_processes": cfg.max_processes,
            "max_file_bytes": cfg.max_file_mb << 20, "max_open_files": cfg.max_open_files,
            "max_figures": cfg.max_figures, "figure_dpi": cfg.figure_dpi,
            "echo_last_expression": cfg.echo_last_expression, "mpl_cache": f"{_RUNNER_DIR}/mpl",
        }
        fds = {"job": _memfd("axpo-job", json.dumps(job).encode()),
               "child": _memfd("axpo-child", self._child_src), "status": st_w, "result": res_w}
        if self._seccomp is not None:
            fds["seccomp"] = _memfd("axpo-seccomp", self._seccomp)
        parent_ends = [res_r, st_r]
        try:
            cmd = self._command(lay, fds, want_mpl)
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, pass_fds=list(fds.values()),
                                        env={"PATH": os.defpath}, cwd="/", start_new_session=True,
                                        close_fds=True)
            except OSError as e:
                return ToolResult(text=f"Error: the sandbox could not start ({e}).", error="sandbox_error")
        finally:
            for fd in fds.values():
                os.close(fd)
        try:
            run = _Watch(proc, st_r, res_r, cfg, lay.work).wait()
        finally:
            for fd in parent_ends:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return self._collect(run)

    # -- results -----------------------------------------------------------------------------

    def _collect(self, run: "_Watch") -> ToolResult:
        cfg = self.cfg
        limit = cfg.max_output_chars
        stdout = run.out["stdout"].decode("utf-8", errors="replace")
        stderr = run.out["stderr"].decode("utf-8", errors="replace")
        status, pngs = {}, []
        for tag, payload in run.frames():
            if tag == b"S":
                try:
                    obj = json.loads(payload.decode("utf-8", errors="replace"))
                    if isinstance(obj, dict):
                        status = obj
                except ValueError:
                    pass
            elif tag == b"F" and len(pngs) < cfg.max_figures:
                pngs.append(payload)
        kind = status.get("kind") if isinstance(status.get("kind"), str) else None
        message = str(status.get("message", ""))[:2000]
        rc = run.exit_code
        images = self._figures(pngs)

        error, note = None, ""
        bw = stderr.strip().splitlines()
        if run.setup_failed or (not status and rc == 1 and bw and bw[-1].startswith("bwrap: ")):
            error, note = "sandbox_error", f"the sandbox could not start ({bw[-1][:300] if bw else f'status {rc}'})"
            stderr = ""
        elif run.timed_out:
            error, note = "timeout", f"the code ran longer than {cfg.wall_timeout_s:g} s and was stopped"
        elif run.too_many_files or status.get("files_full") is True:
            # The kernel refused file max_files + 1 (ENOSPC); the runner reports the full folder
            # (its word only labels the error: the cap itself is the kernel's).
            error, note = "output_limit", f"the code created more than {cfg.max_files} files and was stopped"
        elif run.output_overflow:
            error, note = "output_limit", f"the code wrote more than {cfg.max_file_mb} MB of output and was stopped"
        elif run.result_overflow:
            error, note = "output_limit", "the code sent more figure data than allowed and was stopped"
        elif kind is None and rc in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
            error, note = "timeout", f"the code used more than {cfg.cpu_time_s} s of CPU time and was stopped"
        elif rc == 128 + signal.SIGXFSZ or "[Errno 27]" in message:
            # Python ignores SIGXFSZ, so hitting RLIMIT_FSIZE surfaces as EFBIG (errno 27).
            error, note = "output_limit", f"the code wrote a file larger than {cfg.max_file_mb} MB"
        elif "[Errno 28]" in message:
            error, note = "output_limit", f"the working directory is full ({cfg.work_mb} MB)"
        elif kind == "memory" or (kind is None and "MemoryError" in stderr):
            error, note = "memory", f"the code ran out of memory (limit {cfg.memory_mb} MB)"
        elif kind == "syntax_error":
            error, note = "syntax_error", "the code has a syntax error"
        elif kind == "runtime_error" and _blocked(message):
            error, note = "sandbox_violation", (f"blocked by the sandbox ({message[:160]}); no network, "
                                                "no new processes or threads, no files outside the working directory")
        elif kind == "runtime_error" or rc != 0 or kind is None:
            error, note = "runtime_error", message or f"the code exited with status {rc}"

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

    def _figures(self, pngs: list[bytes]) -> list[Image.Image]:
        images = []
        budget = ZoomConfig(max_pixels=self.cfg.figure_max_pixels)
        for data in pngs:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    if im.format != "PNG" or im.width * im.height > 4096 * 4096:  # not from savefig: ignore
                        continue
                    im = im.convert("RGB")
                images.append(fit_to_grid(im, budget, upscale=False))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
        return images


_BLOCKED_MARKERS = ("PermissionError", "BlockingIOError", "can't start new thread", "gaierror",
                    "[Errno 1]", "[Errno 11]", "[Errno 13]", "[Errno 30]", "[Errno 97]", "[Errno 99]",
                    "[Errno 101]", "[Errno 111]", "[Errno 113]")


def _blocked(message: str) -> bool:
    """The code's exception comes from the sandbox refusing something (a permission, a process or
    thread, the network, a read-only file system), not from a bug in the code."""
    return any(m in message for m in _BLOCKED_MARKERS)


class _Watch:
    """Waits for one sandbox under a hard deadline, reading its pipes with caps, polling the file
    count of its working folder, and killing it on any limit."""

    def __init__(self, proc: subprocess.Popen, status_fd: int, result_fd: int, cfg: SandboxConfig, work: str):
        self.proc, self.cfg, self.work = proc, cfg, work
        self.out = {"stdout": b"", "stderr": b""}
        self.keep = 8 * cfg.max_output_chars          # bytes kept per stream (head)
        self.output_total = 0
        self.result = bytearray()
        self.result_cap = cfg.max_figures * (_FIGURE_CAP + 64) + (64 << 10)
        self.status_text = b""
        self.child_pid: int | None = None
        self._pidfd: int | None = None
        self._done = False
        self.exit_code: int | None = None
        self.timed_out = self.output_overflow = self.too_many_files = self.result_overflow = False
        self.setup_failed = False
        self._fds = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr",
                     status_fd: "status", result_fd: "result"}

    def wait(self) -> "_Watch":
        cfg = self.cfg
        deadline = time.monotonic() + cfg.wall_timeout_s
        sel = selectors.DefaultSelector()
        for fd in self._fds:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        next_poll = 0.0
        killed = False
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    if not killed:
                        self.timed_out = True
                        self._kill()
                        killed = True
                        deadline = now + 2.0  # let the pipes drain after the kill
                        continue
                    break  # the pipes stayed open after the kill: give up on them
                for key, _ in sel.select(timeout=min(0.05, max(0.0, deadline - now))):
                    if not self._read(key.fd):
                        sel.unregister(key.fd)
                if not killed and (self.output_overflow or self.result_overflow):
                    self._kill()
                    killed = True
                    deadline = time.monotonic() + 2.0
                if not killed and self.child_pid and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + 0.05
                    if self._files_used() > cfg.max_files:
                        self.too_many_files = True
                        self._kill()
                        killed = True
                        deadline = time.monotonic() + 2.0
        finally:
            sel.close()
            self._kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # cannot happen after SIGKILL, but never hang here
                pass
            self.proc.stdout.close()
            self.proc.stderr.close()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self._done = True
        self._parse_status()
        rc = self.proc.returncode
        if self.exit_code is None:
            self.exit_code = rc if rc is not None and rc >= 0 else 128 + (-(rc or 0))
        if self.child_pid is None and not killed:
            self.setup_failed = True  # bwrap never started the command
        return self

    def _read(self, fd: int) -> bool:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        name = self._fds[fd]
        if name in ("stdout", "stderr"):
            self.output_total += len(data)
            have = self.out[name]
            if len(have) < self.keep:
                self.out[name] = have + data[: self.keep - len(have)]
            if self.output_total > self.cfg.max_file_mb << 20:
                self.output_overflow = True
        elif name == "result":
            if len(self.result) + len(data) > self.result_cap:
                self.result_overflow = True
            else:
                self.result += data
        else:
            if len(self.status_text) < 1 << 16:
                self.status_text += data
                self._parse_status()
        return True

    def _parse_status(self) -> None:
        # bwrap writes JSON objects, one per line: {"child-pid": N, ...} first, {"exit-code": N}
        # last. Only the first child-pid counts, and only if that process is bwrap's own child.
        for line in self.status_text.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if self.child_pid is None and isinstance(obj.get("child-pid"), int):
                self.child_pid = obj["child-pid"]
                if not self._done:
                    self._open_pidfd()
            if isinstance(obj.get("exit-code"), int):
                self.exit_code = obj["exit-code"]

    def _open_pidfd(self) -> None:
        """A pidfd for the sandbox's init, so that killing it later cannot hit a recycled pid;
        kept only if the process really is bwrap's child."""
        try:
            fd = os.pidfd_open(self.child_pid)
        except OSError:
            return
        try:
            with open(f"/proc/{self.child_pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            ppid = -1
        if ppid == self.proc.pid:
            self._pidfd = fd
        else:
            os.close(fd)

    def _files_used(self) -> int:
        try:
            st = os.statvfs(f"/proc/{self.child_pid}/root{self.work}")
        except OSError:
            return 0
        return st.f_files - st.f_ffree

    def _kill(self) -> None:
        # bwrap's child is the sandbox's init: with it gone, the kernel kills the whole pid
        # namespace. bwrap is killed too (its --die-with-parent would do the same). bwrap is our
        # child and not yet waited for, so its pid (and process group) cannot have been reused.
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def frames(self):
        data, i = bytes(self.result), 0
        while i + _FRAME.size <= len(data):
            tag, n = _FRAME.unpack_from(data, i)
            i += _FRAME.size
            if n > _FIGURE_CAP + 64 or i + n > len(data):
                return
            yield tag, data[i:i + n]
            i += n
