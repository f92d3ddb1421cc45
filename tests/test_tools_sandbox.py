"""The python tool's sandbox against hostile code: every escape attempt is contained, reported as
a tool error, and the next ordinary call still works. Short limits keep each test ~1-2 s."""

import os
import socket
import threading

import pytest

from axpo.tools import PythonSandboxTool, SandboxConfig, ToolContext, build_tools


@pytest.fixture(scope="module")
def tool():
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
    assert {"numpy", "numpy.linalg"} <= set(preload_for("import numpy as np\nnp.ones(2)", DEFAULT_PRELOAD))
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


def test_memory_hog_is_contained(tool):
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
    os.chmod(tmp_path, 0o777)  # even where the OS would allow it, the sandbox refuses
    r = tool.run(f"open({str(target)!r}, 'w').write('pwned')")
    assert r.error == "sandbox_violation"
    assert not target.exists()
    ok = tool.run("open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())")
    assert ok.error is None and ok.text.strip() == "fine"


def test_environment_secrets_are_not_visible(tool, monkeypatch):
    monkeypatch.setenv("AXPO_FAKE_SECRET", "s3cr3t-value")
    r = tool.run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('AXPO_FAKE_SECRET'))")
    assert r.error is None
    assert "s3cr3t-value" not in r.text and "AXPO_FAKE_SECRET" not in r.text
    r = tool.run("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())")
    assert "s3cr3t-value" not in r.text
    assert r.error is not None


def test_exceptions_and_syntax_errors_are_reported(tool):
    r = tool.run("1 / 0")
    assert r.error == "runtime_error" and "ZeroDivisionError" in r.text
    r = tool.run("print(")
    assert r.error == "syntax_error"


def test_output_flood_hits_the_file_size_limit():
    tool = PythonSandboxTool(SandboxConfig(wall_timeout_s=5, cpu_time_s=5, max_file_mb=1))
    r = tool.run("while True:\n    print('x' * 10000)")
    assert r.error == "output_limit" and len(r.text) < 1200


def test_output_is_truncated(tool):
    r = tool.run("print('x' * 100000)")
    assert r.error is None
    assert len(r.text) <= tool.cfg.max_output_chars + 60 and "cut" in r.text


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
