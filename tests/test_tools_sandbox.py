"""The python tool: its output format and error kinds, and the basics of its bubblewrap sandbox
(every escape attempt is contained, reported as a tool error, and the next ordinary call still
works). tests/test_sandbox_hostile.py has the full hostile-code suite. Short limits keep each
test ~1-2 s. Without a usable bubblewrap the tests that run code skip, naming it; the ones that
check the tool's behaviour without it still run."""

import os
import socket
import struct
import threading
import time

import pytest

from axpo.tools import PythonSandboxTool, SandboxConfig, ToolContext, build_tools
from axpo.tools.python_sandbox import SandboxUnavailable, seccomp_program


def _sandbox_reason():
    try:
        PythonSandboxTool(SandboxConfig()).check()
    except SandboxUnavailable as e:
        return str(e)
    return None


_REASON = _sandbox_reason()
needs_sandbox = pytest.mark.skipif(_REASON is not None, reason=f"no usable sandbox: {_REASON}")


@pytest.fixture(scope="module")
def tool():
    if _REASON is not None:
        pytest.skip(f"no usable sandbox: {_REASON}")
    return PythonSandboxTool(SandboxConfig(wall_timeout_s=2.0, cpu_time_s=1, memory_mb=512))


def _assert_still_works(tool):
    r = tool.run("print(6 * 7)")
    assert r.error is None and r.text.strip() == "42"


def test_normal_code_and_echo(tool):
    r = tool.run("x = 4837 * 296\nprint(x)\nx + 1")
    assert r.error is None
    assert r.text.split() == ["1431752", "1431753"]


def test_numpy_is_preloaded_only_when_named(tool):
    from axpo.tools.python_sandbox import DEFAULT_PRELOAD, preload_for

    assert "numpy" not in preload_for("print(37 * 41)", DEFAULT_PRELOAD)
    assert "math" in preload_for("print(37 * 41)", DEFAULT_PRELOAD)
    assert "numpy" in preload_for("import numpy as np\nnp.ones(2)", DEFAULT_PRELOAD)
    # Named or not, numpy code runs.
    r = tool.run("import numpy as np\nprint(int(np.arange(5).sum()))")
    assert r.error is None and r.text.strip() == "10"
    r = tool.run("m = __import__('nu' + 'mpy')\nprint(int(m.arange(5).sum()))")
    assert r.error is None and r.text.strip() == "10"


def test_infinite_loop_hits_cpu_limit(tool):
    r = tool.run("while True:\n    pass")
    assert r.error == "timeout"
    _assert_still_works(tool)


def test_sleep_hits_wall_clock_timeout(tool):
    r = tool.run("import time\ntime.sleep(60)")
    assert r.error == "timeout"
    _assert_still_works(tool)


def test_fork_bomb_is_blocked(tool):
    r = tool.run("import os\nwhile True:\n    os.fork()")
    assert r.error == "sandbox_violation"
    assert "fork" in r.text
    _assert_still_works(tool)


def test_subprocess_is_blocked(tool):
    r = tool.run("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])")
    assert r.error == "sandbox_violation"
    _assert_still_works(tool)


@needs_sandbox
def test_memory_hog_is_contained():
    # Zero-filling 500 MB takes about a second of (system) CPU on a loaded 2-core box: more room.
    tool = PythonSandboxTool(SandboxConfig(wall_timeout_s=8, cpu_time_s=5, memory_mb=512))
    r = tool.run("x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))")
    assert r.error == "memory"
    _assert_still_works(tool)


def test_network_to_localhost_is_blocked(tool):
    # A real listener on 127.0.0.1 (never any other address): the child must not reach it.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(_accept(server)))
    t.start()
    try:
        r = tool.run(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')")
    finally:
        t.join()
        server.close()
    assert r.error == "sandbox_violation"
    assert "connected" not in r.text.splitlines()
    assert accepted == [False]
    _assert_still_works(tool)


def _accept(server):
    try:
        conn, _ = server.accept()
        conn.close()
        return True
    except OSError:
        return False


def test_write_outside_temp_dir_is_blocked(tool, tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # even where file permissions would allow it
    r = tool.run(f"open({str(target)!r}, 'w').write('pwned')")
    assert r.error is not None  # the host folder does not exist in the sandbox
    assert not target.exists()
    r = tool.run("open('/usr/escaped.txt', 'w').write('pwned')")  # a bound folder: read-only
    assert r.error == "sandbox_violation" and "Read-only file system" in r.text
    assert not os.path.exists("/usr/escaped.txt")
    ok = tool.run("open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())")
    assert ok.error is None and ok.text.strip() == "fine"


def test_environment_secrets_are_not_visible(tool, monkeypatch):
    monkeypatch.setenv("AXPO_FAKE_SECRET", "s3cr3t-value")
    r = tool.run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('AXPO_FAKE_SECRET'))")
    assert r.error is None
    assert "s3cr3t-value" not in r.text and "AXPO_FAKE_SECRET" not in r.text
    # The parent in the sandbox's pid namespace is bwrap's init, started with PATH only; the
    # trainer is not visible at all.
    r = tool.run("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n"
                 "print(open(f'/proc/{os.getppid()}/cmdline').read())\nprint(os.listdir('/proc'))")
    assert "s3cr3t-value" not in r.text and "AXPO_FAKE_SECRET" not in r.text
    assert str(os.getpid()) not in r.text.split("\n")[-1]


def test_exceptions_and_syntax_errors_are_reported(tool):
    r = tool.run("1 / 0")
    assert r.error == "runtime_error" and "ZeroDivisionError" in r.text
    r = tool.run("print(")
    assert r.error == "syntax_error"


@needs_sandbox
def test_output_flood_hits_the_file_size_limit():
    tool = PythonSandboxTool(SandboxConfig(wall_timeout_s=5, cpu_time_s=5, max_file_mb=1))
    r = tool.run("while True:\n    print('x' * 10000)")
    assert r.error == "output_limit" and len(r.text) < 1200


def test_output_is_truncated(tool):
    r = tool.run("print('x' * 100000)")
    assert r.error is None
    assert len(r.text) <= tool.cfg.max_output_chars + 60 and "cut" in r.text


@needs_sandbox
def test_matplotlib_plot_returns_image():
    tool = PythonSandboxTool(SandboxConfig(wall_timeout_s=20, cpu_time_s=20))
    r = tool.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()")
    assert r.error is None, r.text
    assert len(r.images) == 1
    w, h = r.images[0].size
    assert w % 32 == 0 and h % 32 == 0 and w * h <= tool.cfg.figure_max_pixels
    assert "figure" in r.text


def test_through_registry_never_raises(tool):
    reg = build_tools(["python"], None)
    reg.tools["python"] = tool
    call, r = reg.execute('{"name": "python", "arguments": {"code": "while True: pass"}}', ToolContext())
    assert call.name == "python" and r.error == "timeout"
    assert reg.error_counts["timeout"] == 1


def test_without_bubblewrap_the_tool_says_so(tmp_path):
    tool = PythonSandboxTool(SandboxConfig(bwrap=str(tmp_path / "no-bwrap")))
    r = tool.run("print(1)")
    assert r.error == "sandbox_unavailable"
    assert "bubblewrap" in r.text and "apt-get install bubblewrap" in r.text
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        tool.check()
    # Through the registry it is an ordinary error result, never a crash.
    reg = build_tools(["python"], None)
    reg.tools["python"] = tool
    _, r = reg.execute('{"name": "python", "arguments": {"code": "1"}}', ToolContext())
    assert r.error == "sandbox_unavailable"


def test_broken_bwrap_is_reported_not_run():
    import shutil
    import tempfile
    from pathlib import Path

    folder = tempfile.mkdtemp(prefix="axpo-fake-bwrap-")  # readable by nobody (runs it when we are root)
    try:
        os.chmod(folder, 0o755)
        fake = Path(folder, "bwrap")
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        tool = PythonSandboxTool(SandboxConfig(bwrap=str(fake)))
        r = tool.run("print(1)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert r.error == "sandbox_unavailable" and "bubblewrap" in r.text
    assert "No permissions to create new namespace" in r.text


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root trainer keeps root out of the sandbox")
def test_root_refuses_to_sandbox_as_root():
    r = PythonSandboxTool(SandboxConfig(drop_to_user="")).run("print(1)")
    assert r.error == "sandbox_unavailable" and "/proc/sys" in r.text


def test_seccomp_program_is_well_formed():
    prog = seccomp_program()
    if prog is None:
        pytest.skip("the seccomp filter is x86-64 only")
    assert len(prog) % 8 == 0 and 8 < len(prog) // 8 < 256
    last = struct.unpack("=HBBI", prog[-8:])
    assert last == (0x06, 0, 0, 0x80000000)  # the final instruction kills (foreign architecture)


def _descendant_uids(root):
    """{pid: (uid, comm)} of the processes below `root`."""
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat", "rb") as f:
                    stat = f.read()
                parent[int(p)] = int(stat.rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out = {}
    for pid in parent:
        q = pid
        while q in parent and q not in (0, 1, root):
            q = parent[q]
        if q == root and pid != root:
            try:
                status = open(f"/proc/{pid}/status").read()
                uid = int(status.split("\nUid:")[1].split()[1])  # effective uid
                out[pid] = (uid, status.split("\n", 1)[0].split()[-1])
            except (OSError, IndexError, ValueError):
                pass
    return out


@needs_sandbox
def test_sandbox_processes_are_unprivileged_on_the_host_and_gone_after(tool):
    """Seen from the host while a call runs: bwrap and the code run as `nobody` when we are
    root (as us otherwise), never as root; after the call nothing of it is left."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", tool.run("import time\ntime.sleep(30)")))
    t.start()
    seen = {}
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        seen.update(_descendant_uids(os.getpid()))
        time.sleep(0.05)
    t.join()
    assert box["r"].error == "timeout"
    sandboxed = {pid: v for pid, v in seen.items() if v[1].startswith(("bwrap", "python"))}
    assert sandboxed, seen
    want = 65534 if os.geteuid() == 0 else os.geteuid()
    assert {uid for uid, _ in sandboxed.values()} == {want}, seen
    assert not _descendant_uids(os.getpid())


@needs_sandbox
def test_concurrent_calls_do_not_wait_for_each_other(tool):
    box = {}
    slow = threading.Thread(target=lambda: box.setdefault("slow", tool.run("import time\ntime.sleep(30)")))
    slow.start()
    time.sleep(0.1)
    start = time.monotonic()
    r = tool.run("print(sum(range(1000)))")
    took = time.monotonic() - start
    slow.join()
    assert r.error is None and r.text.strip() == "499500"
    assert took < 1.5 and box["slow"].error == "timeout"


@needs_sandbox
def test_files_written_by_the_code_stay_in_its_call(tool):
    r = tool.run("open('notes.txt', 'w').write('first call')\nimport os\nprint(os.getcwd())")
    assert r.error is None
    r2 = tool.run("import os\nprint(os.path.exists('notes.txt'), sorted(os.listdir('.')))")
    assert r2.error is None and r2.text.startswith("False")


@needs_sandbox
def test_working_folder_is_capped(tool):
    r = tool.run("n = 0\nwhile True:\n    open(f'f{n}', 'wb').write(b'0' * (4 << 20)); n += 1")
    assert r.error == "output_limit" and "full" in r.text
    r = tool.run("n = 0\nwhile True:\n    open(f'f{n}', 'w').close(); n += 1")
    assert r.error == "output_limit" and "files" in r.text


@needs_sandbox
def test_working_folder_file_cap_is_a_kernel_limit(tool):
    # tmpfs nr_inodes: file 2001 is refused by the kernel (ENOSPC), however fast the code is.
    r = tool.run("import os\nst = os.statvfs('.')\nprint(st.f_files)")
    assert r.error is None and r.text.strip() == str(tool.cfg.max_files + 1)
    r = tool.run("n = 0\ntry:\n    while n < 100000:\n        open(f'f{n}', 'w').close(); n += 1\n"
                 "except OSError as e:\n    print(e)\nprint('made', n)")
    assert r.error == "output_limit" and "No space left" in r.text
    made = int(r.text.rsplit("made", 1)[1])
    assert made < tool.cfg.max_files


@needs_sandbox
def test_refused_launcher_falls_back_to_a_polled_file_cap(caplog, monkeypatch):
    # A host whose policy refuses `unshare --user` (but allows bwrap): the launcher's mount fails;
    # the tool keeps working with bwrap's own tmpfs and says that its file cap is only polled.
    import dataclasses
    tool = PythonSandboxTool(SandboxConfig(wall_timeout_s=2.0))
    real = tool._make_layout

    def refused():
        lay = real()
        return dataclasses.replace(lay, stage_dir=None, run_as=None, work_mount="/nonexistent/axpo-work")

    monkeypatch.setattr(tool, "_make_layout", refused)
    with caplog.at_level("WARNING", logger="axpo.tools.python_sandbox"):
        tool.check()
    assert tool._layout.work_mount is None
    assert any("polled" in m for m in caplog.messages)
    r = tool.run("n = 0\nwhile True:\n    open(f'f{n}', 'w').close(); n += 1")
    assert r.error == "output_limit" and "files" in r.text
