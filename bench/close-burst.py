#!/usr/bin/env python3
"""CPU Sluice spends when N idle connections reach `timeouts.idle` at once.

Each closing connection cancels its in-flight io_uring operations. Cancelling by fd makes the
kernel scan every armed request of the ring, so the burst cost grows with N squared; cancelling
each operation by its user data keeps it linear. This measures it:

    cargo build --release -p sluice && python3 bench/close-burst.py 2000 6000

prints, per N, the CPU time (user + system, from /proc) the sluice process used between the
connections going idle and the last one being closed. 1 worker; a Python backend that accepts
and holds; everything on loopback. Needs N x 2 + slack file descriptors (the hard limit).
"""
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLUICE = os.path.join(ROOT, "target", "release", "sluice")


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(count):
    backend = socket.socket()
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    backend.bind(("127.0.0.1", 0))
    backend.listen(count + 100)
    held = []

    def accept():
        while True:
            try:
                held.append(backend.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    front = probe.getsockname()
    probe.close()
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(
        "workers: 1\nlisteners:\n  - name: burst\n"
        f'    bind: "{front[0]}:{front[1]}"\n'
        f'    backends: ["127.0.0.1:{backend.getsockname()[1]}"]\n'
        "    timeouts: { idle: 3s }\n"
    )
    config.close()
    sluice = subprocess.Popen([SLUICE, "run", "-c", config.name], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        clients = []
        for _ in range(count):
            client = socket.socket()
            client.connect(front)
            clients.append(client)
        time.sleep(1)
        before = cpu_seconds(sluice.pid)
        last = clients[-1]
        last.settimeout(30)
        last.recv(1)  # returns b"" once the idle timeout closed it
        time.sleep(2)
        return cpu_seconds(sluice.pid) - before
    finally:
        sluice.terminate()
        sluice.wait()
        os.unlink(config.name)
        backend.close()


def main():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for count in map(int, sys.argv[1:] or ["2000", "6000"]):
        print(f"{count} idle connections closing at once: {measure(count):.2f} s of CPU")


if __name__ == "__main__":
    main()
