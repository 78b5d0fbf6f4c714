"""Run untrusted, model-generated Python (HumanEval completions, code objectives) without harming the evaluator.

Threat model. The code is not malicious by design but is produced by a model that may have been
fine-tuned on anything: it may loop forever, fork without end, allocate all memory, fill the disk,
delete or overwrite files, or open network connections. The evaluator must survive every one of
these, score the attempt as a failure, and leave no process or file behind. A deliberate attacker
with a kernel exploit is out of scope (use a VM or gVisor for that).

Layers, outermost first:

1. **Namespaces** (when running as root and ``unshare`` from util-linux works): a new network
   namespace, whose only interface (loopback) is down, so every connection fails, 127.0.0.1
   included; and a new PID namespace whose first process is the supervisor of
   :mod:`hm3.eval.sandbox_child`: when it exits or is killed, the kernel kills every process left
   in the namespace, so even children that left the process group with ``setsid`` die.
2. **An unprivileged user** (``nobody``) whenever we run as root: it cannot write the evaluator's
   files, and RLIMIT_NPROC binds only for non-root users, so this is what caps a fork bomb. The
   project's interpreter often lives where ``nobody`` cannot read it (``/root/.pyenv``), so the
   child runs the first interpreter that ``nobody`` can execute (the standard library suffices).
3. **Resource limits** set before ``exec``: RLIMIT_CPU (SIGXCPU, then SIGKILL), RLIMIT_AS (a memory
   hog gets MemoryError), RLIMIT_FSIZE (writes fail with EFBIG; also bounds the captured output),
   RLIMIT_NPROC, RLIMIT_CORE=0.
4. **A wall-clock timeout** that SIGKILLs the whole process group (``os.killpg``), which catches
   sleeping or I/O-bound code that the CPU limit does not see.
5. **A fresh working directory**, ``HOME`` and ``TMPDIR`` (deleted afterwards) and a scrubbed
   environment: the parent's variables (tokens, keys) are not passed on.
6. **An audit hook** in the child (``sys.addaudithook``) refusing writes outside the working
   directory, ``exec``/``system``/``subprocess``, ``ctypes`` and, unless ``network=True``, socket
   connect/bind/send. Defence in depth: a determined program can get around it.

Fallback, weaker: when not root, or ``unshare`` is missing or refused (containers without
CAP_SYS_ADMIN), there are no namespaces. The network is then blocked only by the audit hook,
and a process that calls ``setsid`` escapes the process-group kill (it still dies of its own
CPU limit, or lives on if it sleeps). RLIMIT_NPROC counts *all* processes of the user, so under a
normal account it bounds a fork bomb but a low ``max_processes`` can also refuse the program's forks
because of the user's other processes. In every mode, writes into world-writable directories
(``/tmp``, ``/dev/shm``) are stopped only by the audit hook: there is no mount namespace.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hm3.errors import ConfigError, SandboxUnavailableError
from hm3.eval import sandbox_child

_MIB = 1024 * 1024
_UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child")
_INTERPRETER_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_STDERR_TAIL_BYTES = 4096  # enough to see the last traceback line that names the failure


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

    @property
    def passed(self) -> bool:
        """True iff the program ran to completion and exited 0."""
        return self.returncode == 0 and not self.timed_out


def check_program(program: str, test_code: str, *, timeout_s: float = 5.0) -> bool:
    """Run ``program`` followed by ``test_code`` (asserts) in the sandbox; True iff it exits 0.

    This is the pass/fail of HumanEval-style scoring: the completion counts only if its tests pass.
    """
    return run_untrusted(f"{program}\n\n{test_code}\n", timeout_s=timeout_s).passed


def run_untrusted(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    file_size_mb: int = 10,
    max_processes: int = 32,
    network: bool = False,
    output_cap_bytes: int = 64 * 1024,
    namespaces: bool | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Execute ``code`` as ``__main__`` of a fresh isolated interpreter under every layer the host allows.

    ``namespaces``: None uses them when available, True requires them, False disables them (to test
    the fallback). ``audit_hook=False`` exists so tests can prove the OS layers hold on their own.
    Stdout and stderr keep their first ``output_cap_bytes`` bytes.
    """
    _check_limits(
        timeout_s=timeout_s,
        cpu_s=cpu_s,
        memory_mb=memory_mb,
        file_size_mb=file_size_mb,
        max_processes=max_processes,
        output_cap_bytes=output_cap_bytes,
    )
    use_ns = _choose_namespaces(namespaces)
    user = _sandbox_user() if os.geteuid() == 0 else None
    python = _interpreter_for(user)
    with (
        tempfile.TemporaryDirectory(prefix="hm3-sandbox-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryFile() as source,
        tempfile.TemporaryFile() as stdin_file,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        if user is not None:
            os.chown(workdir, user.pw_uid, user.pw_gid)
        for f, text in ((source, code), (stdin_file, stdin)):
            f.write(text.encode("utf-8"))
            f.seek(0)
        status_r, status_w = os.pipe()
        try:
            argv = _command(python, use_ns=use_ns, network=network, user=user) + [
                workdir,
                str(source.fileno()),
                str(status_w),
                "1" if audit_hook else "0",
                "0" if network else "1",
            ]
            started = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=stdin_file,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=_scrubbed_env(workdir),
                pass_fds=(source.fileno(), status_w),
                start_new_session=True,
                close_fds=True,
                preexec_fn=_limit_resources(cpu_s, memory_mb, file_size_mb, max_processes),
                **_drop_privileges_kwargs(user, use_ns),
            )
            os.close(status_w)
            status_w = -1
            timed_out = _wait_then_kill_group(proc, timeout_s)
            seconds = time.monotonic() - started
            verdict = _read_verdict(status_r)
            _await_group_gone(proc.pid)
        finally:
            for fd in (status_r, status_w):
                if fd >= 0:
                    os.close(fd)
        stdout = _read_head(out, output_cap_bytes)
        stderr = _read_head(err, output_cap_bytes)
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
        reason=_reason(returncode, timed_out, killed_by, stderr_tail),
    )


def _check_limits(**limits: float) -> None:
    """Refuse non-positive limits: a zero limit would make every program fail for a reason unrelated to it."""
    for name, value in limits.items():
        if not value > 0:
            raise ConfigError(f"sandbox limit {name} must be positive, got {value!r}")


@functools.cache
def namespaces_available() -> bool:
    """True iff we are root and ``unshare`` can create network and PID namespaces here (probed once)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return False
    probe = subprocess.run([unshare, "--net", *_UNSHARE_FLAGS, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def _choose_namespaces(requested: bool | None) -> bool:
    """Resolve the ``namespaces`` argument against what the host allows."""
    if requested is None:
        return namespaces_available()
    if requested and not namespaces_available():
        raise SandboxUnavailableError(
            "sandbox namespaces requested but unavailable: need root and a working `unshare --net --pid` "
            f"(running as uid {os.geteuid()}, unshare at {shutil.which('unshare')!r})"
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
def _interpreter_for(user: pwd.struct_passwd | None) -> str:
    """A Python that ``user`` can execute with its standard library: ours if possible, else the system one."""
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable), *_INTERPRETER_CANDIDATES]
    if user is None:
        return sys.executable
    for candidate in dict.fromkeys(candidates):
        if Path(candidate).exists() and _runs_as(candidate, user):
            return candidate
    raise SandboxUnavailableError(
        f"no Python interpreter is executable by user {user.pw_name!r} (tried {', '.join(candidates)}); "
        "install a system python3 or make the interpreter's directories world-readable"
    )


def _runs_as(python: str, user: pwd.struct_passwd) -> bool:
    """Probe that ``python`` starts and imports its standard library as ``user``."""
    try:
        probe = subprocess.run(
            [python, "-I", "-B", "-c", "import json, traceback"],
            cwd="/",
            env=_scrubbed_env("/"),
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _scrubbed_env(home: str) -> dict[str, str]:
    """Only what Python needs: nothing of the parent's environment (tokens, keys) reaches the program."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


@functools.cache
def _bootstrap_source() -> str:
    """The child's supervisor code, passed with ``-c`` so the child needs no access to this package."""
    return Path(sandbox_child.__file__).read_text(encoding="utf-8")


def _command(python: str, *, use_ns: bool, network: bool, user: pwd.struct_passwd | None) -> list[str]:
    """argv up to the bootstrap's own arguments: optionally wrapped in ``unshare``, which also drops to ``user``."""
    child = [python, "-I", "-B", "-c", _bootstrap_source()]
    if not use_ns:
        return child
    wrapper = [shutil.which("unshare") or "unshare", *([] if network else ["--net"]), *_UNSHARE_FLAGS]
    if user is not None:  # after the namespaces are made (that needs root), before the program starts
        wrapper += ["--setgid", str(user.pw_gid), "--setuid", str(user.pw_uid)]
    return [*wrapper, "--", *child]


def _drop_privileges_kwargs(user: pwd.struct_passwd | None, use_ns: bool) -> dict[str, object]:
    """Popen's own privilege drop, used when no ``unshare`` wrapper does it for us."""
    if user is None or use_ns:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _limit_resources(cpu_s: int, memory_mb: int, file_size_mb: int, max_processes: int) -> Callable[[], None]:
    """A ``preexec_fn`` that sets the rlimits in the child between fork and exec (inherited by all its forks)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * _MIB, memory_mb * _MIB))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_mb * _MIB, file_size_mb * _MIB))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _wait_then_kill_group(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to ``timeout_s``; then SIGKILL the process group (always, to catch leftovers). True on timeout.

    The leader is waited on with WNOWAIT so it stays a zombie while we signal its group: its
    process-group id cannot be reused by an unrelated process before ``killpg``.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.002
    timed_out = True
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            timed_out = False
            break
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, 0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return timed_out


def _await_group_gone(pgid: int, grace_s: float = 2.0) -> None:
    """Give killed members of the group (now orphans, reaped by init) a moment to disappear.

    Until they are reaped they still count against the sandbox user's RLIMIT_NPROC, which would
    make the next run's forks fail for a reason that is not its own.
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


def _read_verdict(status_r: int) -> str:
    """What the in-sandbox supervisor reported (``exit N`` / ``signal N``), or '' if it never got to say."""
    os.set_blocking(status_r, False)
    try:
        return os.read(status_r, 64).decode("ascii", "replace")
    except BlockingIOError:
        return ""


def _returncode(verdict: str, outer: int) -> int:
    """The program's own status from the supervisor's report, else the outer process's (killed before reporting)."""
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


def _reason(returncode: int, timed_out: bool, killed_by: str | None, stderr_tail: str) -> str:
    """A short label saying why the run failed, for reports and for aggregating failure kinds."""
    if timed_out:
        return "timeout"
    if killed_by is not None:
        return {"SIGXCPU": "cpu", "SIGXFSZ": "file size"}.get(killed_by, killed_by)
    if returncode == 0:
        return "ok"
    if "MemoryError" in stderr_tail:
        return "memory"
    if "File too large" in stderr_tail:  # Python ignores SIGXFSZ, so RLIMIT_FSIZE surfaces as EFBIG
        return "file size"
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
