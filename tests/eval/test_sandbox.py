"""The sandbox contains each kind of harmful program, scores it as a failure, and the evaluator survives.

Where a layer can be switched off (namespaces, audit hook) a case runs with each layer alone, to
show each one holds by itself rather than only in combination.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from hm3.errors import ConfigError, SandboxUnavailableError
from hm3.eval import sandbox
from hm3.eval.sandbox import check_program, namespaces_available, run_untrusted

IS_ROOT = os.geteuid() == 0
HAS_NS = namespaces_available()
needs_ns = pytest.mark.skipif(not HAS_NS, reason="needs root and a working `unshare --net --pid`")
needs_root = pytest.mark.skipif(
    not IS_ROOT, reason="the unprivileged-user layer exists only when run as root"
)
BOTH_MODES = [pytest.param(True, marks=needs_ns, id="namespaces"), pytest.param(False, id="fallback")]

PRINT_CWD = "import os\nprint(os.getcwd(), flush=True)\n"


def _live_processes_in(directory: str) -> list[psutil.Process]:
    """Processes that are not zombies and whose working directory is ``directory`` (deleted or not)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.cwd().startswith(directory):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _assert_evaluator_healthy() -> None:
    """The test process can still fork, and a clean program still passes in the sandbox."""
    assert subprocess.run(["true"], timeout=30).returncode == 0
    assert run_untrusted("print(6 * 7)").stdout == "42\n"


def test_correct_program_passes_and_reports_output():
    result = run_untrusted("import sys\nprint(input()[::-1])\nprint('warn', file=sys.stderr)", stdin="abc\n")
    assert result.passed and result.returncode == 0 and result.reason == "ok"
    assert (result.stdout, result.stderr) == ("cba\n", "warn\n")
    assert result.killed_by is None and not result.timed_out


def test_check_program_runs_tests_against_program():
    program = "def add(a, b):\n    return a + b\n"
    assert check_program(program, "assert add(2, 3) == 5", timeout_s=10)
    assert not check_program(program, "assert add(2, 3) == 6", timeout_s=10)
    assert not check_program("def add(a, b)\n    return a + b\n", "assert add(2, 3) == 5", timeout_s=10)


def test_exit_status_and_signals_are_reported():
    assert run_untrusted("import sys; sys.exit(3)").reason == "exit 3"
    assert run_untrusted("raise ValueError('x')").reason == "exit 1"
    killed = run_untrusted("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert (killed.returncode, killed.killed_by, killed.passed) == (-15, "SIGTERM", False)


@pytest.mark.parametrize("namespaces", BOTH_MODES)
def test_infinite_loop_times_out_promptly(namespaces):
    started = time.monotonic()
    result = run_untrusted("while True:\n    pass", timeout_s=1.0, cpu_s=30, namespaces=namespaces)
    assert result.timed_out and not result.passed
    assert result.reason == "timeout" and result.killed_by == "SIGKILL"
    assert time.monotonic() - started < 1.0 + 5.0  # slack: a loaded, shared 2-core machine


def test_sleeping_program_is_stopped_by_wall_clock_not_cpu():
    result = run_untrusted("import time\ntime.sleep(60)", timeout_s=0.5)
    assert result.reason == "timeout" and result.seconds < 5


def test_cpu_limit_kills_busy_program():
    result = run_untrusted("while True:\n    pass", timeout_s=30, cpu_s=1)
    assert not result.timed_out and result.killed_by == "SIGXCPU" and result.reason == "cpu"


@pytest.mark.parametrize("namespaces", BOTH_MODES)
def test_fork_bomb_is_contained_and_leaves_nothing_behind(namespaces):
    bomb = PRINT_CWD + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_untrusted(bomb, timeout_s=2.0, max_processes=16, namespaces=namespaces)
    assert not result.passed and result.reason == "timeout"
    workdir = result.stdout.splitlines()[0]
    assert not Path(workdir).exists()
    assert psutil.Process().children(recursive=True) == []
    assert _live_processes_in(workdir) == []
    _assert_evaluator_healthy()


@needs_ns
def test_child_that_leaves_the_process_group_still_dies_with_the_namespace():
    escape = (
        PRINT_CWD + "import time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nos._exit(0)\n"
    )
    result = run_untrusted(escape, timeout_s=5.0, namespaces=True)
    assert result.passed  # the parent exited at once; its escaped child must not outlive it
    assert _live_processes_in(result.stdout.splitlines()[0]) == []


@pytest.mark.parametrize("namespaces", BOTH_MODES)
def test_memory_hog_fails_with_memory_reason(namespaces):
    result = run_untrusted(
        "block = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256, namespaces=namespaces
    )
    assert not result.passed and result.reason == "memory"
    assert "allocated" not in result.stdout
    _assert_evaluator_healthy()


@pytest.mark.parametrize(
    ("namespaces", "audit_hook"),
    [
        pytest.param(True, True, marks=needs_ns, id="all-layers"),
        pytest.param(False, True, id="hook-only"),
        pytest.param(True, False, marks=[needs_ns, needs_root], id="unprivileged-user-only"),
    ],
)
def test_write_outside_workdir_fails_and_leaves_no_file(tmp_path, namespaces, audit_hook):
    target = tmp_path / "escaped.txt"
    result = run_untrusted(
        f"open({str(target)!r}, 'w').write('pwned')", namespaces=namespaces, audit_hook=audit_hook
    )
    assert not result.passed and not target.exists()
    assert result.reason == ("blocked" if audit_hook else "exit 1")


def test_writes_inside_workdir_are_allowed():
    program = (
        "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
    )
    program += "tempfile.NamedTemporaryFile(delete=False).write(b'y')\nprint(sorted(os.listdir('.')))\n"
    result = run_untrusted(program)
    assert result.passed, result.stderr
    assert "'d'" in result.stdout


@pytest.mark.parametrize(
    ("namespaces", "audit_hook"),
    [
        pytest.param(True, True, marks=needs_ns, id="all-layers"),
        pytest.param(False, True, id="hook-only"),
        pytest.param(True, False, marks=needs_ns, id="network-namespace-only"),
    ],
)
def test_socket_connection_fails_and_server_sees_nothing(namespaces, audit_hook):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        client = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')"
        )
        result = run_untrusted(client, namespaces=namespaces, audit_hook=audit_hook)
        assert not result.passed
        with pytest.raises(BlockingIOError):
            server.accept()


def test_network_true_allows_connections():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_untrusted(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)", network=True
        )
        assert result.passed, result.stderr
        server.settimeout(5)
        server.accept()[0].close()


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("HM3_TEST_SECRET", "s3cr3t-token")
    result = run_untrusted("import os\nprint(sorted(os.environ))\nprint(os.environ.get('HM3_TEST_SECRET'))")
    assert result.passed
    assert "HM3_TEST_SECRET" not in result.stdout and "s3cr3t" not in result.stdout


def test_workdir_is_home_and_is_removed_afterwards():
    result = run_untrusted(PRINT_CWD + "print(os.environ['HOME'])\nopen('left.txt', 'w').write('x')")
    workdir, home = result.stdout.split()
    assert result.passed and workdir == home
    assert Path(workdir).name.startswith("hm3-sandbox-") and not Path(workdir).exists()


def test_output_is_capped():
    result = run_untrusted("print('x' * 100_000)", output_cap_bytes=1000)
    assert result.passed
    assert result.stdout.startswith("x" * 1000) and "more bytes cut by the sandbox" in result.stdout
    assert len(result.stdout) < 1100


def test_file_size_limit_stops_a_disk_filler():
    result = run_untrusted("f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * 65536)", file_size_mb=1)
    assert not result.passed and result.reason == "file size"


@pytest.mark.parametrize("limit", ["timeout_s", "cpu_s", "memory_mb", "file_size_mb", "max_processes"])
def test_non_positive_limits_are_refused_by_name(limit):
    with pytest.raises(ConfigError, match=limit):
        run_untrusted("pass", **{limit: 0})


def test_namespaces_required_but_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox, "namespaces_available", lambda: False)
    with pytest.raises(SandboxUnavailableError, match="unshare"):
        run_untrusted("pass", namespaces=True)
