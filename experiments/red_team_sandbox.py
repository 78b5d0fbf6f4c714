"""Count the sandbox's fake passes and escapes, in every containment mode that works here.

The companion of ``red_team.py`` for generated code (``hm3.eval.sandbox``): each early-exit or
tampering trick of the test suite (``tests/eval/test_sandbox.py``'s ``FAKE_PASSES``) is run against a
failing solution and must not pass; each escape attack runs after switching the in-process audit
hook off (the suite's ``HOOK_BYPASS``), so only the operating system's containment is measured:

* files written to the host's ``/tmp`` and ``/dev/shm``;
* a connection to a host AF_UNIX socket, by path and abstract;
* the host's processes read through ``/proc`` (a process started here with a marker in its argv);
* more than ``disk_mb`` stored in total across many files.

    python experiments/red_team_sandbox.py [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import harness

REPO = harness.REPO
sys.path.insert(0, str(REPO))
from hm3.eval.sandbox import MODES, mode_available, run_untrusted  # noqa: E402
from tests.eval.test_sandbox import FAKE_PASSES, HOOK_BYPASS, TESTS  # noqa: E402

DISK_MB = 8


def host_files(mode: str) -> bool:
    """True (an escape) when the program left a file in the host's /tmp, /dev/shm or a host folder."""
    with tempfile.TemporaryDirectory() as host_dir:
        os.chmod(host_dir, 0o777)
        names = [f"/tmp/hm3-escape-{uuid.uuid4().hex}", f"/dev/shm/hm3-escape-{uuid.uuid4().hex}",
                 f"{host_dir}/escaped.txt"]
        program = HOOK_BYPASS + f"for name in {names!r}:\n    try:\n        open(name, 'w').write('x')\n"
        program += "    except OSError:\n        pass\n"
        run_untrusted(program, mode=mode)
        escaped = [n for n in names if os.path.exists(n)]
        for n in escaped:
            os.remove(n)
        return bool(escaped)


def host_sockets(mode: str) -> bool:
    """True when the program connected to a host AF_UNIX socket (by path or abstract name)."""
    with tempfile.TemporaryDirectory() as host_dir:
        os.chmod(host_dir, 0o777)
        addresses = [f"{host_dir}/host.sock", f"\0hm3-red-team-{uuid.uuid4().hex}"]
        servers = []
        for address in addresses:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(address)
            server.listen()
            server.setblocking(False)
            servers.append(server)
        os.chmod(addresses[0], 0o777)
        program = HOOK_BYPASS + f"import socket\nfor a in {addresses!r}:\n    s = socket.socket(socket.AF_UNIX)\n"
        program += "    try:\n        s.connect(a)\n        s.sendall(b'hi')\n    except OSError:\n        pass\n"
        try:
            run_untrusted(program, mode=mode)
            connected = 0
            for server in servers:
                try:
                    server.accept()[0].close()
                    connected += 1
                except BlockingIOError:
                    pass
        finally:
            for server in servers:
                server.close()
        return connected > 0


def host_processes(mode: str) -> bool:
    """True when the program could read a host process's command line through /proc."""
    marker = f"hm3-host-secret-{uuid.uuid4().hex}"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        program = "import os\nfor pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
        program += "    try:\n        print(open(f'/proc/{pid}/cmdline').read())\n    except OSError:\n        pass\n"
        return marker in run_untrusted(program, mode=mode).stdout
    finally:
        host.kill()
        host.wait()


def disk_total(mode: str) -> bool:
    """True when more than DISK_MB were stored in total across many files (each under the file limit)."""
    prefix = f"hm3-red-team-{uuid.uuid4().hex[:8]}-"
    program = HOOK_BYPASS + "import os\nfor i in range(20):\n    for d in ('/tmp', '/dev/shm'):\n        try:\n"
    program += f"            with open(f'{{d}}/{prefix}{{i}}', 'wb', buffering=0) as f:\n"
    program += "                for _ in range(48):\n                    f.write(b'0' * 65536)\n"
    program += "        except OSError:\n            pass\n"
    program += "print(sum(os.path.getsize(os.path.join(d, n)) for d in {'/tmp', os.path.realpath('/dev/shm')}"
    program += f" for n in os.listdir(d) if n.startswith({prefix!r})))\n"
    result = run_untrusted(program, disk_mb=DISK_MB, file_size_mb=4, mode=mode, timeout_s=30)
    for d in ("/tmp", "/dev/shm"):  # what a mode without a private /tmp left on the host
        for leftover in Path(d).glob(f"{prefix}*"):
            leftover.unlink()
    numbers = [w for w in result.stdout.split() if w.isdigit()]
    return bool(numbers) and int(numbers[-1]) > DISK_MB * 1024**2


ESCAPES = {"host /tmp, /dev/shm or folder file": host_files, "host AF_UNIX socket": host_sockets,
           "host /proc command lines": host_processes, f"over {DISK_MB} MiB stored in total": disk_total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_out_arguments(p, "red_team_sandbox")
    args = p.parse_args(argv)
    modes = [m for m in MODES if mode_available(m)]
    rows = []
    for mode in modes:
        fake = [name for name, program in FAKE_PASSES.items()
                if run_untrusted(program, harness=TESTS, mode=mode, timeout_s=10).passed]
        genuine = run_untrusted("def add(a, b):\n    return a + b\n", harness=TESTS, mode=mode).passed
        escapes = [name for name, attack in ESCAPES.items() if attack(mode)]
        rows.append({"mode": mode, "tricks": len(FAKE_PASSES), "fake_passes": fake, "genuine_solution_passes": genuine,
                     "attacks": len(ESCAPES), "escapes": escapes})
        print(f"{mode:<8} fake passes {len(fake)} / {len(FAKE_PASSES)}; genuine passes: {genuine}; "
              f"escapes {len(escapes)} / {len(ESCAPES)} {escapes}", flush=True)
    result = {"benchmark": "red_team_sandbox", **harness.provenance(argv), "modes": rows}
    out = harness.write_results(harness.out_path(args, "red_team_sandbox"), result)
    print(f"-> {out}")
    contained = [r for r in rows if r["mode"] != "none"]
    return 0 if all(not r["fake_passes"] and not r["escapes"] and r["genuine_solution_passes"] for r in contained) else 1


if __name__ == "__main__":
    sys.exit(main())
