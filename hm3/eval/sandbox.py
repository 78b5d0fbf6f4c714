"""Run untrusted, model-generated Python (HumanEval completions, code objectives) without harming the evaluator.

Threat model. The code is produced by a model that may have been fine-tuned on anything: it may loop
forever, fork without end, allocate all memory, fill the disk, delete or overwrite files, open
connections, read other processes' command lines, or game its score (exit 0 before its tests ran).
The evaluator must survive every one of these, score the attempt as a failure, and leave no process
or file behind. A deliberate attacker with a kernel exploit is out of scope (use a VM or gVisor).

The operating system contains the program; :func:`sandbox_mode` says which way, chosen once per
process, best first (``docs/SECURITY.md`` has the full account):

``bwrap``
    bubblewrap (Debian's ``bubblewrap``) started as the sandbox user (``nobody`` when we are root):
    new user, mount, PID, network, IPC and UTS namespaces; a read-only bind of ``/usr`` (plus the
    interpreter's prefix if it lies elsewhere) and of ``/etc/ld.so.cache``; a fresh ``/proc`` that
    shows only the sandbox's processes; a minimal ``/dev``; one size-limited tmpfs (``disk_mb``) that
    is ``/tmp``, ``/dev/shm`` (a link to it), the working directory and ``HOME``; everything else
    read-only or absent (no ``/run``, no host ``/tmp``: no host AF_UNIX socket to connect to;
    abstract sockets belong to the empty network namespace). Nested user namespaces are refused.
``unshare``
    the same file system, PID, network, IPC and UTS namespaces made by ``unshare`` (util-linux) as
    root, the mounts done by :mod:`hm3.eval.sandbox_child` before it drops to ``nobody``; no user
    namespace, so the program could create one of its own (and in it an unbounded tmpfs in RAM).
``none``
    no namespaces (no working bubblewrap, and not root or no ``unshare``): the program sees the
    host's file system, processes and network; only the layers below protect the evaluator.

Layers common to every mode:

- **An unprivileged user** (``nobody``) whenever we run as root: RLIMIT_NPROC binds only for
  non-root users, so this is what caps a fork bomb.
- **Resource limits** set before ``exec``: RLIMIT_CPU (SIGXCPU, then SIGKILL), RLIMIT_AS (a memory
  hog gets MemoryError), RLIMIT_FSIZE (also bounds the captured stdout/stderr), RLIMIT_NPROC,
  RLIMIT_CORE=0.
- **A wall-clock timeout** that SIGKILLs the whole process group (``os.killpg``); with a PID
  namespace the kernel then kills every process left in it, ``setsid`` or not.
- **A scrubbed environment**: the parent's variables (tokens, keys) are not passed on.
- **A completion proof**: a run counts as complete only if the program process writes back a
  per-run random token, which it does after the program (and its tests) returned; see
  :mod:`hm3.eval.sandbox_child`. ``sys.exit(0)``, ``os._exit(0)``, signals and closed streams fail.
- **An audit hook** in the child refusing writes outside the working directory, ``exec``,
  ``subprocess``, ``ctypes`` and, unless ``network=True``, socket connect/bind/send. Defence in
  depth only: a program that finds the hook's closure through ``gc`` switches it off.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hm3.errors import ConfigError, SandboxUnavailableError
from hm3.eval import sandbox_child

_MIB = 1024 * 1024
MODES = ("bwrap", "unshare", "none")  # best first
_UNSHARE_FLAGS = ("--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--propagation", "private")
_INTERPRETER_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_STDERR_TAIL_BYTES = 4096  # enough to see the last traceback line that names the failure
_INSIDE_WORKDIR = "/tmp"  # in bwrap/unshare mode: the one writable tmpfs
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_DEV_NODES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = (
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
    (_INSIDE_WORKDIR, "/dev/shm"),  # shared memory comes out of the same bounded tmpfs
)


@dataclass(frozen=True)
class SandboxResult:
    """How one untrusted run ended. ``reason`` is a short label for reports: ok, timeout, memory, cpu, ..."""

    returncode: int  # negative: killed by that signal, as in subprocess
    stdout: str
    stderr: str
    timed_out: bool
    killed_by: str | None
    seconds: float
    reason: str
    completed: bool  # the program (and its harness) ran to the end: proved by the per-run token
    mode: str  # bwrap, unshare or none

    @property
    def passed(self) -> bool:
        """True iff the program provably ran to its end and exited 0 (an early ``exit(0)`` does not count)."""
        return self.completed and self.returncode == 0 and not self.timed_out


def check_program(program: str, test_code: str, *, timeout_s: float = 5.0) -> bool:
    """Run ``program``, then ``test_code`` (asserts), in the sandbox; True iff the tests ran to their end.

    This is the pass/fail of HumanEval-style scoring. Before the tests run, builtins the program
    patched are restored and trace hooks removed; a program that exits, kills itself or closes its
    streams during its tests cannot pass, because only reaching the end produces the run's token.
    """
    return run_untrusted(program, harness=test_code, timeout_s=timeout_s).passed


def run_untrusted(
    code: str,
    *,
    harness: str | None = None,
    stdin: str = "",
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_size_mb: int = 10,
    disk_mb: int = 64,
    max_processes: int = 32,
    network: bool = False,
    output_cap_bytes: int = 64 * 1024,
    mode: str | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Execute ``code`` (then ``harness``, in the same namespace) as ``__main__`` of an isolated interpreter.

    ``mode``: None uses :func:`sandbox_mode`; a name from :data:`MODES` requires that mode (to test
    each). ``disk_mb`` bounds all the program may write (bwrap/unshare modes: the size of its one
    tmpfs); ``file_size_mb`` bounds each file, stdout and stderr included. ``audit_hook=False``
    exists so tests can prove the OS layers hold on their own. Stdout and stderr keep their first
    ``output_cap_bytes`` bytes.
    """
    limits = _Limits(timeout_s, cpu_s, memory_mb, file_size_mb, disk_mb, max_processes, output_cap_bytes)
    for name, value in vars(limits).items():  # a zero limit would fail every program for no fault of its own
        if not value > 0:
            raise ConfigError(f"sandbox limit {name} must be positive, got {value!r}")
    return _run(code, harness, stdin, limits, _choose_mode(mode), network=network, audit_hook=audit_hook)


@dataclass(frozen=True)
class _Limits:
    """The per-run limits, checked once by :func:`run_untrusted` and then passed around as one value."""

    timeout_s: float
    cpu_s: int
    memory_mb: int
    file_size_mb: int
    disk_mb: int
    max_processes: int
    output_cap_bytes: int


_PROBE_LIMITS = _Limits(30, 5, 512, 10, 8, 32, 4096)  # generous: a probe must not fail for lack of time


def _run(
    code: str, harness: str | None, stdin: str, limits: _Limits, mode: str, *, network: bool, audit_hook: bool
) -> SandboxResult:
    """One run in ``mode`` (already known to be available)."""
    user = _sandbox_user() if os.geteuid() == 0 else None
    python, prefix = _interpreter_for(user)
    token = secrets.token_hex(16).encode("ascii")
    with contextlib.ExitStack() as stack:
        host_dir = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="hm3-sandbox-", ignore_cleanup_errors=True)
        )
        spec_file, stdin_file, out, err = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(4))
        fds = _Pipes(stack)
        status_r, status_w = fds.pipe()
        token_r, token_w = fds.pipe()
        proof_r, proof_w = fds.pipe()
        os.write(token_w, token)  # 32 bytes: fits any pipe buffer, so this never blocks
        fds.close(token_w)
        if user is not None:
            os.chown(host_dir, user.pw_uid, user.pw_gid)
        workdir = host_dir if mode == "none" else _INSIDE_WORKDIR
        spec = {
            "mode": mode,
            "workdir": workdir,
            "root": host_dir,
            "layout": _layout(prefix, limits.disk_mb),
            "uid": user.pw_uid if user else os.getuid(),
            "gid": user.pw_gid if user else os.getgid(),
            "audit": audit_hook,
            "block_network": not network,
            "program": code,
            "harness": harness,
            "status_fd": status_w,
            "token_fd": token_r,
            "proof_fd": proof_w,
        }
        spec_file.write(json.dumps(spec).encode("utf-8"))
        stdin_file.write(stdin.encode("utf-8"))
        for f in (spec_file, stdin_file):
            f.seek(0)
        argv = _command(mode, python, prefix, limits.disk_mb, network=network, spec_fd=spec_file.fileno())
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=stdin_file,
            stdout=out,
            stderr=err,
            cwd=host_dir,
            env=_scrubbed_env(workdir),
            pass_fds=(spec_file.fileno(), status_w, token_r, proof_w),
            start_new_session=True,
            close_fds=True,
            preexec_fn=_limit_resources(limits),
            **_drop_privileges_kwargs(user, mode),
        )
        for fd in (status_w, token_r, proof_w):
            fds.close(fd)
        timed_out = _wait_then_kill_group(proc, limits.timeout_s)
        seconds = time.monotonic() - started
        verdict = _read_available(status_r, 64)
        completed = _read_available(proof_r, 256) == token.decode("ascii")
        _await_group_gone(proc.pid)
        stdout = _read_head(out, limits.output_cap_bytes)
        stderr = _read_head(err, limits.output_cap_bytes)
        stderr_tail = _read_tail(err, _STDERR_TAIL_BYTES)
    returncode = _returncode(verdict, proc.returncode)
    killed_by = "SIGKILL" if timed_out else _signal_name(-returncode) if returncode < 0 else None
    return SandboxResult(
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
        killed_by=killed_by,
        seconds=seconds,
        reason=_reason(returncode, timed_out, killed_by, stderr_tail, completed),
        completed=completed,
        mode=mode,
    )


class _Pipes:
    """Pipe ends that are closed when the run ends, or earlier (once) by :meth:`close`."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._open: set[int] = set()
        stack.callback(lambda: [self.close(fd) for fd in list(self._open)])

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self._open.update((r, w))
        return r, w

    def close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)


@functools.cache
def sandbox_mode() -> str:
    """The best containment that works on this host: ``bwrap``, ``unshare`` or ``none`` (probed once).

    Each candidate is probed by running a trivial program through it, so a mode is reported only
    if it works end to end here (bubblewrap installed but user namespaces disabled, for instance,
    falls through to the next).
    """
    return next(mode for mode in MODES if mode_available(mode))


@functools.cache
def mode_available(mode: str) -> bool:
    """True iff ``mode`` can run a program here; ``none`` always can."""
    if mode == "none":
        return True
    if mode == "bwrap" and shutil.which("bwrap") is None:
        return False
    if mode == "unshare" and (os.geteuid() != 0 or shutil.which("unshare") is None):
        return False
    try:
        probe = _run("pass", None, "", _PROBE_LIMITS, mode, network=False, audit_hook=True)
    except (OSError, SandboxUnavailableError):
        return False
    return probe.passed


def describe_sandbox() -> str:
    """One line for users: which containment runs generated code here, and what that means."""
    mode = sandbox_mode()
    contained = "private file system, /proc, network and tmpfs; no host files or sockets"
    what = {
        "bwrap": f"bubblewrap: {contained}",
        "unshare": f"unshare namespaces: {contained}",
        "none": "no namespaces: host files, processes and network visible; "
        "install bubblewrap (see docs/SECURITY.md)",
    }[mode]
    return f"sandbox for generated code: {mode} ({what})"


def _choose_mode(requested: str | None) -> str:
    """Resolve the ``mode`` argument against what the host allows."""
    if requested is None:
        return sandbox_mode()
    if requested not in MODES:
        raise ConfigError(f"unknown sandbox mode {requested!r}; known: {', '.join(MODES)}")
    if not mode_available(requested):
        raise SandboxUnavailableError(
            f"sandbox mode {requested!r} requested but unavailable here: bwrap needs bubblewrap and user "
            f"namespaces, unshare needs root and util-linux `unshare` (uid {os.geteuid()}, "
            f"bwrap at {shutil.which('bwrap')!r}, unshare at {shutil.which('unshare')!r})"
        )
    return requested


def _sandbox_user() -> pwd.struct_passwd:
    """The unprivileged account that runs untrusted code when we are root."""
    try:
        return pwd.getpwnam("nobody")
    except KeyError as exc:
        raise SandboxUnavailableError(
            "running as root but there is no `nobody` user to run untrusted code as"
        ) from exc


@functools.cache
def _interpreter_for(user: pwd.struct_passwd | None) -> tuple[str, str]:
    """A Python that ``user`` can execute with its standard library (ours if possible), and its prefix.

    The path is resolved (a virtualenv's ``python`` is a link into a prefix the sandbox binds).
    """
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable), *_INTERPRETER_CANDIDATES]
    for candidate in dict.fromkeys(candidates):
        if Path(candidate).exists() and (prefix := _prefix_as(candidate, user)) is not None:
            return os.path.realpath(candidate), prefix
    who = "us" if user is None else f"user {user.pw_name!r}"
    raise SandboxUnavailableError(
        f"no Python interpreter is executable by {who} (tried {', '.join(candidates)}); "
        "install a system python3 or make the interpreter's directories world-readable"
    )


def _prefix_as(python: str, user: pwd.struct_passwd | None) -> str | None:
    """``sys.base_prefix`` of ``python`` run as ``user`` with its standard library; None if it cannot run."""
    as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    try:
        probe = subprocess.run(
            [python, "-I", "-B", "-c", "import json, traceback, sys; print(sys.base_prefix)"],
            cwd="/",
            env=_scrubbed_env("/"),
            capture_output=True,
            text=True,
            timeout=60,
            **as_user,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return os.path.realpath(probe.stdout.strip()) if probe.returncode == 0 else None


def _scrubbed_env(home: str) -> dict[str, str]:
    """Only what Python needs: nothing of the parent's environment (tokens, keys) reaches the program."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


def _layout(prefix: str, disk_mb: int) -> list[list[object]]:
    """The sandbox's file system as operations in order: bubblewrap options, or mounts in ``unshare`` mode.

    Only what the interpreter needs is bound, read-only; ``/`` and ``/dev`` end read-only, so the
    tmpfs ``/tmp`` (``disk_mb``) is the only place the program can write.
    """
    ops: list[list[object]] = [["ro-bind", "/usr", "/usr"]]
    for name in _ROOT_LINKS:
        host = Path("/", name)
        if host.is_symlink():
            ops.append(["symlink", os.readlink(host), str(host)])
        elif host.is_dir():
            ops.append(["ro-bind", str(host), str(host)])
    bound = [str(op[1]) for op in ops if op[0] == "ro-bind"]
    if not any(prefix == root or prefix.startswith(root + "/") for root in bound):
        ops.append(["ro-bind", prefix, prefix])  # an interpreter outside /usr (pyenv, conda, a user's own)
    ops += [["ro-bind", path, path] for path in _ETC_FILES if os.path.exists(path)]
    ops.append(["tmpfs", 64 * 1024, "/dev"])
    nodes = [f"/dev/{node}" for node in _DEV_NODES if os.path.exists(f"/dev/{node}")]
    ops += [["dev-bind", node, node] for node in nodes]
    ops += [["symlink", target, link] for target, link in _DEV_LINKS]
    ops += [["proc", "/proc"], ["tmpfs", disk_mb * _MIB, _INSIDE_WORKDIR], ["remount-ro", "/dev"]]
    ops.append(["remount-ro", "/"])
    return ops


def _bwrap_options(layout: list[list[object]]) -> Iterator[str]:
    """The bubblewrap options that perform ``layout``."""
    for op, *args in layout:
        if op == "tmpfs":
            yield from ("--size", str(args[0]), "--tmpfs", str(args[1]))
        else:
            yield f"--{op}"
            yield from map(str, args)


@functools.cache
def _bootstrap_source() -> str:
    """The child's supervisor code, passed with ``-c`` so the child needs no access to this package."""
    return Path(sandbox_child.__file__).read_text(encoding="utf-8")


def _command(mode: str, python: str, prefix: str, disk_mb: int, *, network: bool, spec_fd: int) -> list[str]:
    """argv for ``mode``: the bootstrap, wrapped in bubblewrap or ``unshare`` (which makes the namespaces)."""
    child = [python, "-I", "-B", "-c", _bootstrap_source(), str(spec_fd)]
    if mode == "bwrap":
        # --disable-userns: no nested user namespace, whose root could mount an unbounded tmpfs
        wrapper = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--disable-userns"]
        wrapper += [*(["--share-net"] if network else []), "--die-with-parent", "--as-pid-1"]
        return [*wrapper, *_bwrap_options(_layout(prefix, disk_mb)), "--chdir", _INSIDE_WORKDIR, "--", *child]
    if mode == "unshare":  # root: the bootstrap mounts, then drops to the sandbox user itself
        unshare = shutil.which("unshare") or "unshare"
        return [unshare, *([] if network else ["--net"]), *_UNSHARE_FLAGS, "--", *child]
    return child


def _drop_privileges_kwargs(user: pwd.struct_passwd | None, mode: str) -> dict[str, object]:
    """Popen's own privilege drop: bubblewrap and the bare child start as ``user``; ``unshare`` needs root."""
    if user is None or mode == "unshare":
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _limit_resources(limits: _Limits) -> Callable[[], None]:
    """A ``preexec_fn`` that sets the rlimits in the child between fork and exec (inherited by all its forks)."""
    cpu_s, nproc = limits.cpu_s, limits.max_processes
    memory, file_size = limits.memory_mb * _MIB, limits.file_size_mb * _MIB

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to ``timeout_s``; then SIGKILL the process group (always, to catch leftovers). True on timeout.

    The leader is waited on with WNOWAIT so it stays a zombie while we signal its group: its
    process-group id cannot be reused by an unrelated process before ``killpg``. The group is
    killed however the wait ends, an exception (Ctrl-C) included.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.002
    timed_out = True
    try:
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                timed_out = False
                break
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 2, 0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return timed_out


def _await_group_gone(pgid: int, grace_s: float = 2.0) -> None:
    """Give killed members of the group (now orphans, reaped by init) a moment to disappear.

    Until they are reaped they still count against the sandbox user's RLIMIT_NPROC, which would
    make the next run's forks fail for a reason that is not its own. With a PID namespace, its
    first process is in this group and ends only after every process in the namespace has.
    """
    deadline = time.monotonic() + grace_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_members(pgid: int) -> list[int]:
    """PIDs whose process group is ``pgid``, zombies included, read from /proc (empty where there is none)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            members.append(int(stat.parent.name))
    return members


def _read_available(fd: int, size: int) -> str:
    """What a pipe holds now (its writers are gone), decoded; '' if nothing was written."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, size).decode("ascii", "replace")
    except BlockingIOError:
        return ""


def _returncode(verdict: str, outer: int) -> int:
    """The program's own status as the supervisor reported it, else the outer process's (killed before that)."""
    kind, _, number = verdict.partition(" ")
    if kind == "exit" and number.isdigit():
        return int(number)
    if kind == "signal" and number.isdigit():
        return -int(number)
    return outer


def _signal_name(number: int) -> str:
    """``SIGKILL`` for 9; a plain label for numbers Python does not know."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _reason(
    returncode: int, timed_out: bool, killed_by: str | None, stderr_tail: str, completed: bool
) -> str:
    """A short label saying why the run failed, for reports and for aggregating failure kinds."""
    if timed_out:
        return "timeout"
    if killed_by is not None:
        return {"SIGXCPU": "cpu", "SIGXFSZ": "file size"}.get(killed_by, killed_by)
    if returncode == 0:
        return "ok" if completed else "exit 0 before the end"
    if "MemoryError" in stderr_tail:
        return "memory"
    if "File too large" in stderr_tail:  # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as EFBIG
        return "file size"
    if "No space left on device" in stderr_tail:
        return "disk"
    if sandbox_child.BLOCKED in stderr_tail:
        return "blocked"
    return f"exit {returncode}"


def _read_head(f: IO[bytes], cap: int) -> str:
    """The first ``cap`` bytes of a captured stream, decoded, with a note when more was cut off."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    text = f.read(cap).decode("utf-8", "replace")
    return text + (f"\n[... {size - cap} more bytes cut by the sandbox]" if size > cap else "")


def _read_tail(f: IO[bytes], size: int) -> str:
    """The last ``size`` bytes of a captured stream: where an uncaught exception's name is printed."""
    end = f.seek(0, os.SEEK_END)
    f.seek(max(end - size, 0))
    return f.read().decode("utf-8", "replace")
