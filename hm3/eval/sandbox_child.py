"""The bootstrap that runs *inside* the sandbox: a supervisor process and the untrusted program.

:mod:`hm3.eval.sandbox` passes this file's source to ``python -I -B -c`` (so it works with any
interpreter the sandbox user may execute, not only the project's virtualenv). It must therefore
use only the standard library, run on Python >= 3.8 and never import ``hm3``.

Why a supervisor: inside a fresh PID namespace the first process is PID 1, which the kernel
shields from signals it has no handler for (an RLIMIT_CPU ``SIGXCPU`` would be ignored), and
whose exit kills every other process in the namespace. So PID 1 only forks the program, reaps
orphans, reports how the program ended on a status pipe, and exits: its exit tears the whole
process tree down, forked children included. In ``unshare`` mode it first builds the sandbox's
file system (the mounts bubblewrap makes in ``bwrap`` mode), as root, then drops to the sandbox user.

Why a token: an exit status proves nothing, since the program can ``sys.exit(0)`` or ``os._exit(0)``
before its tests ran. The program process reads a per-run random token from a pipe and closes it
*before* any untrusted code runs, and writes it to the proof pipe only after the program and its
harness (the tests) returned normally; the parent counts a run as complete only if it reads back
exactly that token. Exits, signals, closed streams and guesses cannot produce it. Code written
against this harness could still find the token in the interpreter's memory (frames, ``gc``,
``ctypes``): the token raises the bar from "exit early" to "attack the harness", it is not a wall.

Command line: ``spec_fd``, a descriptor holding the JSON run spec written by the parent.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import sys
import traceback

BLOCKED = "hm3-sandbox: blocked"  # the parent looks for this marker in stderr to label the failure

# Captured before any untrusted code runs, so that monkeypatching ``os`` or ``builtins`` cannot
# change what the harness does after the tests (patched functions could only make it fail). This
# module is ``__main__`` only until the program runs (:func:`run_program`), so ``import __main__``
# does not reach these names either.
_write, _exit, _exec, _compile = os.write, os._exit, exec, compile

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

# mount(2) flags and pivot_root(2) numbers, for ``unshare`` mode (the standard library has neither).
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC = 32, 4096, 16384
_MNT_DETACH = 2
_PR_SET_NO_NEW_PRIVS = 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


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


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream cannot change the verdict
            stream.flush()


def _pristine(namespace: dict, saved_builtins: dict) -> dict:
    """The namespace the tests run in, clear of what the program did to sway them.

    Trace hooks are removed and the ``builtins`` module restored. The tests get a copy of the
    program's globals without those that shadow a builtin (``abs = lambda x: 0``), over a private
    copy of the builtins: a thread, an audit hook or a call of the program that patches ``builtins``
    while the tests run does not reach them. The program's functions keep their own globals.
    """
    sys.settrace(None)
    sys.setprofile(None)
    builtins.__dict__.clear()
    builtins.__dict__.update(saved_builtins)
    tests = {name: value for name, value in namespace.items() if name not in saved_builtins}
    tests.update({"__name__": "__main__", "__builtins__": dict(saved_builtins)})
    return tests


def run_program(spec: dict, token: bytes) -> int:
    """Execute the program (then its harness) as ``__main__``; return the exit status it would have had.

    Only when both returned normally is ``token`` written to the proof pipe; the process then ends
    at once with ``os._exit`` so that no thread or ``atexit`` handler of the program runs afterwards.
    """
    if spec["audit"]:
        install_audit_hook(spec["workdir"], spec["block_network"])
    saved_builtins = dict(builtins.__dict__)
    # the program's own __main__, as under `python program.py`: `import __main__` must reach the
    # program, not this bootstrap, whose globals (_exec, _pristine, ...) run the tests
    main = type(sys)("__main__")
    namespace = main.__dict__
    namespace["__builtins__"] = builtins
    sys.modules["__main__"] = main
    try:
        _exec(_compile(spec["program"], "<program>", "exec"), namespace)
        if spec["harness"] is not None:
            tests = _pristine(namespace, saved_builtins)
            _exec(_compile(spec["harness"], "<tests>", "exec"), tests)
    except SystemExit as exc:  # sys.exit() before the end: never a completed run, whatever the code
        _flush_streams()
        return _exit_status(exc)
    except BaseException:  # the program's own failure: report it as Python would, then fail
        traceback.print_exc()
        _flush_streams()
        return 1
    _flush_streams()
    with contextlib.suppress(OSError):  # the program closed the pipe: then it has no proof
        _write(spec["proof_fd"], token)
    _exit(0)
    return 0  # not reached


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


def _libc():  # noqa: ANN202 - ctypes types are not worth importing at module level here
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    return libc, check


def build_root(root: str, layout: list, uid: int, gid: int) -> None:
    """``unshare`` mode, as root in a fresh mount namespace: build the sandbox's file system, enter it.

    ``layout`` is the list of operations :func:`hm3.eval.sandbox._layout` gives bubblewrap as options,
    done here with mount(2): a small tmpfs as ``/``, read-only binds of what the interpreter needs,
    device nodes, a fresh ``/proc``, a size-limited tmpfs ``/tmp``; then ``pivot_root`` into it and
    detach the host's tree, so nothing of the host file system stays reachable.
    """
    libc, check = _libc()

    def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        encode = (lambda s: None if s is None else s.encode())  # noqa: E731
        result = libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data))
        check(result, f"mount {target}")

    def remount_ro(target: str) -> None:
        mount("none", target, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)

    secure = _MS_NOSUID | _MS_NODEV
    mount("tmpfs", root, "tmpfs", secure, "size=1m,nr_inodes=1024,mode=755")
    for op, *args in layout:
        target = root + args[-1]
        if op == "symlink":
            os.symlink(args[0], target)
        elif op in ("ro-bind", "dev-bind"):
            if os.path.isdir(args[0]):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
            mount(args[0], target, None, _MS_BIND | _MS_REC)
            if op == "ro-bind":
                remount_ro(target)
        elif op == "tmpfs":
            os.makedirs(target, exist_ok=True)
            options = f"size={args[0]},nr_inodes=65536,mode=700,uid={uid},gid={gid}"
            mount("tmpfs", target, "tmpfs", secure, options)
        elif op == "proc":
            os.makedirs(target, exist_ok=True)
            mount("proc", target, "proc", secure | _MS_NOEXEC)
        elif op == "remount-ro":
            remount_ro(target)
        else:
            raise ValueError(f"unknown layout operation {op!r}")
    os.chdir(root)
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(f"pivot_root: unknown system call number on {os.uname().machine}")
    check(libc.syscall(number, b".", b"."), "pivot_root")  # the old root now lies under the new one
    check(libc.umount2(b".", _MNT_DETACH), "detach the host's file system")
    os.chdir("/")
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def main(argv: list[str]) -> None:
    """Read the spec, enter the sandbox (``unshare`` mode), fork the program, then supervise it."""
    with os.fdopen(int(argv[0]), encoding="utf-8") as f:
        spec = json.load(f)
    if spec["mode"] == "unshare":
        build_root(spec["root"], spec["layout"], spec["uid"], spec["gid"])
    os.chdir(spec["workdir"])
    status_fd, token_fd = spec["status_fd"], spec["token_fd"]
    child = os.fork()
    if child == 0:
        os.close(status_fd)  # the program must not be able to forge the verdict
        token = os.read(token_fd, 256)
        os.close(token_fd)  # read once, before any untrusted code: it is in no file, argv or env
        os._exit(run_program(spec, token) & 0xFF)
    os.close(token_fd)
    os.close(spec["proof_fd"])
    os._exit(supervise(child, status_fd))


if __name__ == "__main__":
    main(sys.argv[1:])
