"""The bootstrap that runs *inside* the sandbox: a supervisor process and the untrusted program.

:mod:`hm3.eval.sandbox` passes this file's source to ``python -I -B -c`` (so it works with any
interpreter the sandbox user may execute, not only the project's virtualenv). It must therefore
use only the standard library, run on Python >= 3.8 and never import ``hm3``.

Why a supervisor: inside a fresh PID namespace the first process is PID 1, which the kernel
shields from signals it has no handler for (an RLIMIT_CPU ``SIGXCPU`` would be ignored), and
whose exit kills every other process in the namespace. So PID 1 only forks the program, reaps
orphans, reports how the program ended on a status pipe, and exits: its exit tears the whole
process tree down, forked children included.

Command line: ``sandbox_dir source_fd status_fd audit(0|1) network(0|1)``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

BLOCKED = "hm3-sandbox: blocked"  # the parent looks for this marker in stderr to label the failure

# Audit events that would leave the interpreter (and with it the audit hook) or load native code.
_ESCAPE_EVENTS = frozenset(
    {
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.dlsym/handle",
    }
)
_NETWORK_EVENTS = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"})
# Filesystem-changing events -> positions of (path, dir_fd) argument pairs that name what changes.
_MUTATING_EVENTS = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((1, 3),),
    "os.symlink": ((1, 2),),
    "os.mkfifo": ((0, 2),),
    "os.mknod": ((0, 3),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class SandboxViolation(PermissionError):
    """Raised by the audit hook; a PermissionError so code that tolerates EACCES degrades the same way."""


def _resolve(path: object, dir_fd: object, allowed: tuple[str, ...]) -> bool:
    """True iff ``path`` (relative to ``dir_fd`` or the cwd) lies inside one of the ``allowed`` roots."""
    if isinstance(path, int):  # an already-open descriptor: it was checked when it was opened
        return True
    name = os.fsdecode(path)  # type: ignore[arg-type]
    if not os.path.isabs(name) and isinstance(dir_fd, int) and dir_fd >= 0:  # -1 or None: the cwd
        name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
    real = os.path.realpath(name)
    return any(real == root or real.startswith(root + os.sep) for root in allowed)


def install_audit_hook(sandbox_dir: str, block_network: bool) -> None:
    """Refuse, in this interpreter and every fork of it, escapes that the OS layers should already stop.

    Defence in depth only: a determined program can reach around an audit hook (``os.open`` with a
    ``dir_fd``, introspection of the hook's closure), so it guards mistakes and lazy exploits while
    the namespaces, the unprivileged uid and the resource limits are the real boundary.
    """
    allowed = (os.path.realpath(sandbox_dir), "/dev/null")
    busy = []  # re-entrancy guard: path resolution below must not re-enter the check

    def refuse(event: str, what: object) -> None:
        raise SandboxViolation(f"{BLOCKED} {event} {what!r}")

    def hook(event: str, args: tuple) -> None:
        if busy:
            return
        busy.append(1)
        try:
            if event in _ESCAPE_EVENTS or (block_network and event in _NETWORK_EVENTS):
                refuse(event, args[:2])
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _WRITE_FLAGS
                )
                if writes and not _resolve(path, None, allowed):
                    refuse(event, path)
            for path_at, fd_at in _MUTATING_EVENTS.get(event, ()):
                dir_fd = args[fd_at] if fd_at is not None else None
                if not _resolve(args[path_at], dir_fd, allowed):
                    refuse(event, args[path_at])
        finally:
            busy.pop()

    sys.addaudithook(hook)


def _exit_status(exc: SystemExit) -> int:
    """Mirror the interpreter's handling of ``sys.exit(x)``: None -> 0, int -> itself, else print, 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_program(source: str, audit: bool, sandbox_dir: str, block_network: bool) -> int:
    """Execute the untrusted source as ``__main__`` and return the exit status it would have had."""
    if audit:
        install_audit_hook(sandbox_dir, block_network)
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        status = 0
    except SystemExit as exc:
        status = _exit_status(exc)
    except BaseException:  # the program's own failure: report it as Python would, then fail
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream cannot change the verdict
            stream.flush()
    return status


def supervise(child: int, status_fd: int) -> int:
    """Reap children (PID 1 adopts orphans) until ``child`` ends; report it as ``exit N`` or ``signal N``."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            report, code = b"lost", 1
            break
        if pid == child:
            if os.WIFSIGNALED(status):
                report, code = b"signal %d" % os.WTERMSIG(status), 128 + os.WTERMSIG(status)
            else:
                report, code = b"exit %d" % os.WEXITSTATUS(status), os.WEXITSTATUS(status)
            break
    os.write(status_fd, report)
    return code


def main(argv: list[str]) -> None:
    """Fork the program child, then supervise it; the child closes the supervisor's descriptors first."""
    sandbox_dir, source_fd, status_fd = argv[0], int(argv[1]), int(argv[2])
    audit, block_network = argv[3] == "1", argv[4] == "1"
    with os.fdopen(source_fd, encoding="utf-8") as f:
        source = f.read()
    child = os.fork()
    if child == 0:
        os.close(status_fd)  # the program must not be able to forge the verdict
        os._exit(run_program(source, audit, sandbox_dir, block_network) & 0xFF)
    os._exit(supervise(child, status_fd))


if __name__ == "__main__":
    main(sys.argv[1:])
