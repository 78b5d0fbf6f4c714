"""The sandbox contains each kind of harmful program, scores it as a failure, and the evaluator survives.

Where a layer can be switched off (namespaces, audit hook) a case runs with each layer alone, to
show each one holds by itself rather than only in combination. The malicious programs are built
here: a bypass of the in-process audit hook, writes to host paths, host sockets, host ``/proc``,
a disk filler spread over many files, fork bombs, and every way to exit 0 without passing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

import psutil
import pytest

from hm3.errors import ConfigError, SandboxUnavailableError
from hm3.eval import sandbox
from hm3.eval.sandbox import check_program, mode_available, run_untrusted, sandbox_mode

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="the unprivileged-user layer exists only when run as root")


def _mode(name: str) -> pytest.param:
    reason = f"sandbox mode {name} is not available here (bwrap: bubblewrap; unshare: root)"
    return pytest.param(name, marks=pytest.mark.skipif(not mode_available(name), reason=reason), id=name)


CONTAINED = [_mode("bwrap"), _mode("unshare")]
ALL_MODES = [*CONTAINED, _mode("none")]

PRINT_CWD = "import os\nprint(os.getcwd(), flush=True)\n"
# Switches the audit hook off from inside, as a hostile program would: find the hook's closure
# through the garbage collector and set its re-entrancy guard, so every event passes unchecked.
HOOK_BYPASS = """
import gc
for obj in gc.get_objects():
    if getattr(obj, "__name__", "") == "hook" and getattr(obj, "__closure__", None):
        for cell in obj.__closure__:
            if isinstance(cell.cell_contents, list):
                cell.cell_contents.append(1)
import ctypes  # refused by the hook (ctypes.dlopen) unless the bypass worked
print("hook bypassed", flush=True)
"""
_run_mark = ""  # set per test by own_sandbox_mark: in the argv of every sandbox process the test starts


@pytest.fixture(autouse=True)
def own_sandbox_mark():
    """Every sandbox this test starts carries a mark of its own in its argv (a comment after the bootstrap's
    source, which the sandbox passes with ``-c``), so the 'nothing left' checks count only this test's
    processes: another pytest-xdist worker's sandboxed runs (HumanEval objectives) may be alive meanwhile.
    A process that escapes its group and is reparented keeps its argv, so it is still found."""
    global _run_mark
    mark = f"hm3-test-sandbox-{uuid.uuid4().hex}"
    source = sandbox._bootstrap_source()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sandbox, "_bootstrap_source", lambda: f"{source}\n# {mark}\n")
        _run_mark = mark
        yield mark
    _run_mark = ""


def _live_sandbox_processes() -> list[psutil.Process]:
    """Processes still running this test's sandbox code (its mark is in their argv), zombies excluded."""
    assert _run_mark, "own_sandbox_mark is not active"
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and _run_mark in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(autouse=True, scope="module")
def private_temporary_folder():
    """The sandbox's folders are made in a temporary folder of this module's own: another pytest-xdist
    worker's sandboxed runs (HumanEval objectives) make and remove theirs in the shared one meanwhile, which
    the 'nothing left' checks would count. World-traversable, as the sandbox user must reach its folder."""
    folder = tempfile.mkdtemp(prefix="hm3-test-tmp-")
    os.chmod(folder, 0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", folder)
        yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("hm3-sandbox-*")}


def _assert_evaluator_healthy() -> None:
    """The test process can still fork, and a clean program still passes in the sandbox."""
    assert subprocess.run(["true"], timeout=30).returncode == 0
    assert run_untrusted("print(6 * 7)").stdout == "42\n"


def _present() -> tuple[set[str], set[int]]:
    """The sandbox folders and this process's child processes before a run. Children that other tests
    started can live as long as this process (a multiprocessing resource tracker, after an engine's worker
    processes): a run must add none."""
    return _sandbox_dirs(), {p.pid for p in psutil.Process().children(recursive=True)}


def _assert_nothing_left(before: tuple[set[str], set[int]]) -> None:
    dirs_before, children_before = before
    assert [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before] == []
    assert _live_sandbox_processes() == []
    assert _sandbox_dirs() <= dirs_before


def test_mode_is_reported_and_best_available_is_chosen():
    mode = sandbox_mode()
    assert mode in sandbox.MODES and mode_available(mode)
    assert all(not mode_available(better) for better in sandbox.MODES[: sandbox.MODES.index(mode)])
    assert run_untrusted("pass").mode == mode
    assert mode in sandbox.describe_sandbox()


@pytest.fixture
def fresh_mode_probe():
    """Forget the probed modes before and after the test, so a patched host is probed anew."""
    for cached in (sandbox.sandbox_mode, sandbox.mode_available):
        cached.cache_clear()
    yield
    for cached in (sandbox.sandbox_mode, sandbox.mode_available):
        cached.cache_clear()


def test_without_bubblewrap_the_next_mode_is_used(monkeypatch, fresh_mode_probe):
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None if name == "bwrap" else which(name))
    expected = "unshare" if IS_ROOT and which("unshare") else "none"
    assert sandbox_mode() == expected and not mode_available("bwrap")
    result = run_untrusted("print(6 * 7)")
    assert result.passed and result.mode == expected and result.stdout == "42\n"


def test_objectives_command_names_the_sandbox_mode(capsys):
    from hm3.cli import main

    assert main(["objectives"]) == 0
    assert f"sandbox for generated code: {sandbox_mode()} (" in capsys.readouterr().out


def test_correct_program_passes_and_reports_output():
    result = run_untrusted("import sys\nprint(input()[::-1])\nprint('warn', file=sys.stderr)", stdin="abc\n")
    assert result.passed and result.completed and result.returncode == 0 and result.reason == "ok"
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


# Every way a program can end with status 0 before its tests ran; the tests below would fail.
ADD = "def add(a, b):\n    return a - b\n"
FAKE_PASSES = {
    "sys.exit(0) in the body": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "raise SystemExit in the body": "def add(a, b):\n    raise SystemExit\n",
    "raise SystemExit(0) at top level": ADD + "raise SystemExit(0)\n",
    "os._exit(0) in the body": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "os._exit(0) at top level": ADD + "import os\nos._exit(0)\n",
    "os._exit(0) from a thread": "import os, threading\ndef add(a, b):\n"
    "    t = threading.Thread(target=os._exit, args=(0,))\n    t.start()\n    t.join()\n",
    "os._exit(0) from a thread started at top level": ADD + "import os, threading, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0)), daemon=True).start()\n"
    "def add(a, b):\n    time.sleep(5)\n",
    "atexit handler": ADD + "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(1)\n",
    "SIGKILL to itself": "def add(a, b):\n    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n",
    "SIGTERM to its process group": ADD + "import os, signal\nos.killpg(0, signal.SIGTERM)\n",
    "closes stdout and stderr, then exits 0": ADD + "import os\nos.close(1)\nos.close(2)\nos._exit(0)\n",
    "prints and writes guesses of the token": ADD + "import os\nguess = b'0' * 32\nprint(guess.decode())\n"
    "for fd in range(3, 256):\n    try:\n        os.write(fd, guess)\n    except OSError:\n        pass\n"
    "os._exit(0)\n",
    "patches builtins the tests use": ADD + "import builtins\nbuiltins.abs = lambda x: 0\n",
    "rebinds __builtins__": ADD + "__builtins__ = {'abs': lambda x: 0, '__build_class__': None}\n",
    "defines its own check": ADD + "def check(candidate):\n    pass\n",
    "shadows a builtin with a global": ADD + "abs = lambda x: 0\n",
    "patches builtins from a thread while the tests run": ADD + "import builtins, sys, threading\n"
    "sys.setswitchinterval(1e-6)\ndef spoil():\n    while True:\n        builtins.abs = lambda x: 0\n"
    "threading.Thread(target=spoil, daemon=True).start()\n",
    "patches builtins from an audit hook as the tests are compiled": ADD + "import builtins, sys\n"
    "sys.addaudithook(lambda event, args: setattr(builtins, 'abs', lambda x: 0))\n",
    "replaces the harness's exec through __main__": ADD + "import __main__\n"
    "__main__._exec = lambda code, namespace: None\n",
}
TESTS = "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n\ncheck(add)\n"


@pytest.mark.parametrize("program", FAKE_PASSES.values(), ids=FAKE_PASSES.keys())
def test_early_exits_and_tampering_never_pass(program):
    result = run_untrusted(program, harness=TESTS, timeout_s=10)
    assert not result.passed and not result.completed, result
    assert not check_program(program, TESTS, timeout_s=10)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_token_proves_completion_in_every_mode(mode):
    assert run_untrusted("def add(a, b):\n    return a + b\n", harness=TESTS, mode=mode).passed
    early = run_untrusted("import sys\nsys.exit(0)", mode=mode)
    assert (early.returncode, early.completed, early.passed, early.reason) == (0, False, False, "exit 0 before the end")


def test_correct_program_that_uses_builtins_and_threads_still_passes():
    program = "import threading\ndef add(a, b):\n    out = []\n"
    program += "    t = threading.Thread(target=lambda: out.append(abs(a + b)))\n    t.start()\n    t.join()\n"
    program += "    return out[0] if a + b >= 0 else a + b\n"
    assert check_program(program, TESTS, timeout_s=10)


def test_program_is_its_own_main_module():
    # as under `python program.py`: __main__ is the program, so pickle finds its functions by name
    program = "import __main__, pickle\ndef add(a, b):\n    return a + b\n"
    program += "assert __main__.add is add and pickle.loads(pickle.dumps(add)) is add\n"
    assert check_program(program, TESTS, timeout_s=10)


def test_program_functions_keep_their_own_globals_that_shadow_builtins():
    # the tests see the real abs; the program's add still sees its own
    program = "def abs(x):\n    return -x\ndef add(a, b):\n    return abs(-(a + b))\n"
    assert check_program(program, TESTS, timeout_s=10)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_infinite_loop_times_out_promptly(mode):
    started = time.monotonic()
    result = run_untrusted("while True:\n    pass", timeout_s=1.0, cpu_s=30, mode=mode)
    assert result.timed_out and not result.passed
    assert result.reason == "timeout" and result.killed_by == "SIGKILL"
    assert time.monotonic() - started < 1.0 + 5.0  # slack: a loaded, shared 2-core machine


def test_sleeping_program_is_stopped_by_wall_clock_not_cpu():
    result = run_untrusted("import time\ntime.sleep(60)", timeout_s=0.5)
    assert result.reason == "timeout" and result.seconds < 5


def test_cpu_limit_kills_busy_program():
    result = run_untrusted("while True:\n    pass", timeout_s=30, cpu_s=1)
    assert not result.timed_out and result.killed_by == "SIGXCPU" and result.reason == "cpu"


@pytest.mark.parametrize("mode", ALL_MODES)
def test_fork_bomb_is_contained_and_leaves_nothing_behind(mode):
    before = _present()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_untrusted(bomb, timeout_s=2.0, max_processes=16, mode=mode)
    assert not result.passed and result.reason == "timeout"
    _assert_nothing_left(before)
    _assert_evaluator_healthy()


@pytest.mark.parametrize("mode", CONTAINED)
def test_child_that_leaves_the_process_group_still_dies_with_the_namespace(mode):
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\n"
    result = run_untrusted(escape, timeout_s=5.0, mode=mode)
    assert result.passed  # the parent ended at once; its escaped child must not outlive it
    assert _live_sandbox_processes() == []


@pytest.mark.parametrize("mode", ALL_MODES)
def test_memory_hog_fails_with_memory_reason(mode):
    result = run_untrusted("block = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256, mode=mode)
    assert not result.passed and result.reason == "memory"
    assert "allocated" not in result.stdout
    _assert_evaluator_healthy()


@pytest.mark.parametrize(
    ("mode", "audit_hook"),
    [
        *[pytest.param(*p.values, True, marks=p.marks, id=f"{p.id}+hook") for p in CONTAINED],
        *[pytest.param(*p.values, False, marks=p.marks, id=f"{p.id}-only") for p in CONTAINED],
        pytest.param("none", True, id="hook-only"),
        pytest.param("none", False, marks=needs_root, id="unprivileged-user-only"),
    ],
)
def test_write_outside_workdir_fails_and_leaves_no_file(tmp_path, mode, audit_hook):
    tmp_path.chmod(0o777)  # writable by the sandbox user: only the sandbox may stop the write
    target = tmp_path / "escaped.txt"
    result = run_untrusted(f"open({str(target)!r}, 'w').write('pwned')", mode=mode, audit_hook=audit_hook)
    assert not result.passed and not target.exists()
    if audit_hook and mode == "none":  # contained, the path is inside the sandbox's own /tmp: not found
        assert result.reason == "blocked"


@pytest.mark.parametrize("mode", CONTAINED)
def test_hook_bypass_then_writes_to_tmp_and_shm_leave_no_host_file(tmp_path, mode):
    tmp_path.chmod(0o777)
    names = [f"/tmp/hm3-escape-{uuid.uuid4().hex}", f"/dev/shm/hm3-escape-{uuid.uuid4().hex}"]
    names.append(str(tmp_path / "escaped.txt"))
    program = HOOK_BYPASS + "for name in %r:\n" % names  # noqa: UP031 - a literal list in generated code
    program += "    try:\n        open(name, 'w').write('pwned')\n        print('wrote', name)\n"
    program += "    except OSError as exc:\n        print('failed', name, exc)\n"
    result = run_untrusted(program, mode=mode)
    assert result.passed and "hook bypassed" in result.stdout, result.stderr
    assert [name for name in names if os.path.exists(name)] == []


@pytest.mark.parametrize("mode", CONTAINED)
def test_hook_bypass_cannot_reach_host_unix_sockets(tmp_path, mode):
    tmp_path.chmod(0o777)
    path = str(tmp_path / "host.sock")
    abstract = f"\0hm3-test-{uuid.uuid4().hex}"
    servers = []
    for address in (path, abstract):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen()
        server.setblocking(False)
        servers.append(server)
    os.chmod(path, 0o777)
    program = HOOK_BYPASS + "import socket\nfor address in %r:\n" % [path, abstract]  # noqa: UP031
    program += "    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(address)\n"
    program += "        s.sendall(b'hi')\n        print('CONNECTED')\n    except OSError as exc:\n"
    program += "        print('REFUSED', exc)\n"
    try:
        result = run_untrusted(program, mode=mode)
        assert result.passed and "hook bypassed" in result.stdout, result.stderr
        assert "CONNECTED" not in result.stdout and result.stdout.count("REFUSED") == 2
        for server in servers:
            with pytest.raises(BlockingIOError):
                server.accept()
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize("mode", CONTAINED)
def test_host_processes_are_invisible(mode):
    marker = f"hm3-host-secret-{uuid.uuid4().hex}"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        program = "import os\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        program += "    try:\n        print(pid, open(f'/proc/{pid}/cmdline').read())\n"
        program += "    except OSError:\n        pass\n"
        program += f"for pid in ({host.pid}, {os.getpid()}):\n    print(pid, os.path.exists(f'/proc/{{pid}}'))\n"
        result = run_untrusted(program, mode=mode)
        assert result.passed, result.stderr
        assert marker not in result.stdout and "pytest" not in result.stdout
        assert f"{host.pid} True" not in result.stdout and f"{os.getpid()} True" not in result.stdout
        assert len([line for line in result.stdout.splitlines() if line[:1].isdigit()]) <= 6
    finally:
        host.kill()
        host.wait()


@pytest.mark.parametrize("mode", CONTAINED)
def test_total_disk_use_is_bounded_across_files(mode):
    program = "import os\nwritten = 0\nfor i in range(20):\n"
    program += "    for d in ('/tmp', '/dev/shm'):\n        try:\n"
    program += "            with open(f'{d}/{d[-3:]}{i}', 'wb', buffering=0) as f:\n"
    program += "                for _ in range(3 * 16):\n                    written += f.write(b'0' * 65536)\n"
    program += "        except OSError:\n            pass\n"
    program += "print(written, sum(os.path.getsize(f'/tmp/{name}') for name in os.listdir('/tmp')))\n"
    result = run_untrusted(program, disk_mb=8, file_size_mb=4, mode=mode, timeout_s=30)
    assert result.passed, result.stderr
    written, stored = map(int, result.stdout.split())
    assert 4 * 1024**2 <= stored <= written <= 8 * 1024**2  # 40 files of 3 MiB asked for, 8 MiB allowed


def test_nested_user_namespace_is_refused_under_bwrap():
    if not mode_available("bwrap"):
        pytest.skip("bubblewrap is not available here")
    program = HOOK_BYPASS + "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    program += "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
    result = run_untrusted(program, mode="bwrap")
    assert result.passed, result.stderr
    assert "unshare -1" in result.stdout


def test_writes_inside_workdir_are_allowed():
    program = (
        "import os, tempfile\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
    )
    program += "tempfile.NamedTemporaryFile(delete=False).write(b'y')\nprint(sorted(os.listdir('.')))\n"
    result = run_untrusted(program)
    assert result.passed, result.stderr
    assert "'d'" in result.stdout


@pytest.mark.parametrize(
    ("mode", "audit_hook"),
    [
        *[pytest.param(*p.values, True, marks=p.marks, id=f"{p.id}+hook") for p in CONTAINED],
        *[pytest.param(*p.values, False, marks=p.marks, id=f"{p.id}-only") for p in CONTAINED],
        pytest.param("none", True, id="hook-only"),
    ],
)
def test_socket_connection_fails_and_server_sees_nothing(mode, audit_hook):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        client = (
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'hi')"
        )
        result = run_untrusted(client, mode=mode, audit_hook=audit_hook)
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


@pytest.mark.parametrize("mode", ALL_MODES)
def test_workdir_is_home_and_nothing_is_left_afterwards(mode):
    before = _present()
    name = f"hm3-left-{uuid.uuid4().hex}"
    result = run_untrusted(PRINT_CWD + f"print(os.environ['HOME'])\nopen({name!r}, 'w').write('x')", mode=mode)
    workdir, home = result.stdout.split()
    assert result.passed and workdir == home
    assert workdir == "/tmp" if mode != "none" else Path(workdir).name.startswith("hm3-sandbox-")
    assert not Path("/tmp", name).exists() and not Path(workdir, name).exists()
    _assert_nothing_left(before)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_an_interrupted_run_leaves_no_process_behind(mode, monkeypatch):
    before = _present()

    def interrupt(seconds: float) -> None:  # Ctrl-C while the evaluator waits for the program
        raise KeyboardInterrupt

    monkeypatch.setattr(sandbox, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=interrupt))
    with pytest.raises(KeyboardInterrupt):
        run_untrusted("import time\ntime.sleep(60)", timeout_s=30, mode=mode)
    monkeypatch.undo()
    deadline = time.monotonic() + 5  # killed processes may take a moment to be reaped
    while _live_sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    _assert_nothing_left(before)


def test_output_is_capped():
    result = run_untrusted("print('x' * 100_000)", output_cap_bytes=1000)
    assert result.passed
    assert result.stdout.startswith("x" * 1000) and "more bytes cut by the sandbox" in result.stdout
    assert len(result.stdout) < 1100


def test_file_size_limit_stops_a_disk_filler():
    result = run_untrusted("f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * 65536)", file_size_mb=1)
    assert not result.passed and result.reason == "file size"


@pytest.mark.parametrize(
    "limit", ["timeout_s", "cpu_s", "memory_mb", "file_size_mb", "disk_mb", "max_processes"]
)
def test_non_positive_limits_are_refused_by_name(limit):
    with pytest.raises(ConfigError, match=limit):
        run_untrusted("pass", **{limit: 0})


def test_unavailable_or_unknown_mode_is_a_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown sandbox mode 'chroot'"):
        run_untrusted("pass", mode="chroot")
    monkeypatch.setattr(sandbox, "mode_available", lambda mode: False)
    with pytest.raises(SandboxUnavailableError, match="bubblewrap"):
        run_untrusted("pass", mode="bwrap")
