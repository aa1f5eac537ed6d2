"""agentrl.sandbox: model-written commands stay in their workspace, and the host is unaffected.

Every escape attempt (read or write outside, network, fork bomb, unbounded memory, endless loop,
gigabytes of output) is run for real, and each test also checks the host afterwards: files outside
unchanged, no process of the attempt left, the pids cgroup removed, the host can still start processes.
Each attempt has a positive control showing the same code does what it tries to do when not confined.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from agentrl.sandbox import Sandbox, SandboxUnavailable

@pytest.fixture
def ws(tmp_path):
    d = tmp_path / "ws"
    d.mkdir()
    return d


@pytest.fixture
def outside(tmp_path):
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("TOP-SECRET-42")
    return d


def processes_with(marker: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            pass
    return [p for p in out if p != os.getpid()]


def sandbox_cgroups() -> list[str]:
    roots = [Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")]
    prefix = f"agentrl-sandbox-{os.getpid()}-"
    return [p.name for r in roots if r.is_dir() for p in r.iterdir() if p.name.startswith(prefix)]


def host_is_fine() -> None:
    assert subprocess.run(["true"]).returncode == 0
    assert not sandbox_cgroups()


def test_runs_in_the_workspace_as_nobody(ws):
    res = Sandbox(ws).run("pwd; id -u; echo hello > made.txt; python -c 'import sys; print(sys.version_info[0])'")
    assert res.ok and res.stdout.split() == ["/workspace", "65534", "3"]
    assert (ws / "made.txt").read_text() == "hello\n"
    res = Sandbox(ws).run("exit 7")
    assert res.exit_code == 7 and not res.killed and not res.ok


def test_cannot_read_outside_the_workspace(ws, outside, monkeypatch):
    monkeypatch.setenv("AGENTRL_HOST_TOKEN", "TOP-SECRET-42")  # the host's environment is not visible either
    secret = outside / "secret.txt"
    assert "TOP-SECRET-42" in subprocess.run(["cat", str(secret)], capture_output=True, text=True).stdout  # control
    res = Sandbox(ws).run(f"cat /proc/1/environ /proc/self/environ; ls /root /home {Path.cwd()}; cat {secret}")
    assert "TOP-SECRET-42" not in res.stdout + res.stderr and "AGENTRL_HOST_TOKEN" not in res.stdout
    assert f"{secret}: No such file or directory" in res.stderr and res.exit_code != 0
    assert "agentrl" not in res.stdout.split()  # of this repository only the venv is mounted
    # a symlink planted in the workspace points nowhere inside the sandbox
    (ws / "link").symlink_to(secret)
    res = Sandbox(ws).run("cat link")
    assert res.exit_code != 0 and "TOP-SECRET-42" not in res.stdout
    host_is_fine()


def test_cannot_write_outside_the_workspace(ws, outside):
    before = (outside / "secret.txt").read_text()
    target = outside / "planted.txt"
    res = Sandbox(ws).run(f"echo x > {target}; echo x > {outside}/secret.txt; touch /usr/planted /etc/planted "
                          f"{sys.prefix}/planted; mkdir -p {outside}/d && echo x > {outside}/d/f")
    assert f"{target}: No such file or directory" in res.stderr
    assert "touch: cannot touch '/usr/planted': Read-only file system" in res.stderr
    assert f"touch: cannot touch '{sys.prefix}/planted': Read-only file system" in res.stderr
    assert not target.exists() and (outside / "secret.txt").read_text() == before and not (outside / "d").exists()
    assert not Path("/usr/planted").exists() and not Path("/etc/planted").exists()
    assert not Path(sys.prefix, "planted").exists()
    # /tmp is private to each run: the host's files are not there, and nothing outlives a run (the only
    # entries allowed are mount points of read-only binds, e.g. a venv that itself lives under /tmp)
    planted = Path(tempfile.mkdtemp(prefix="agentrl-host-"))
    try:
        box = Sandbox(ws)
        box.run("echo x > /tmp/left-behind")
        listing = box.run("ls -A /tmp").stdout.split()
        assert planted.name not in listing and "left-behind" not in listing
        allowed = {Path(p).relative_to("/tmp").parts[0] for p in (sys.prefix, ws) if Path(p).is_relative_to("/tmp")}
        assert set(listing) <= allowed
    finally:
        planted.rmdir()
    host_is_fine()


def test_no_network(ws):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    stop = threading.Event()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    probe = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
             "s.sendall(b'hi')\nprint('connected')")
    try:
        control = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert "connected" in control.stdout  # the probe works where there is a network
        n = len(accepted)
        res = Sandbox(ws).run(f"python -c \"{probe}\"; python -c \"import socket; "
                              f"socket.create_connection(('1.1.1.1', 53), timeout=3)\"")
        assert "connected" not in res.stdout and res.exit_code != 0
        assert "Connection refused" in res.stderr and "unreachable" in res.stderr
        assert len(accepted) == n  # nothing reached the host's server
    finally:
        stop.set()
        t.join()
        server.close()
    host_is_fine()


def test_fork_bomb_is_contained(ws):
    marker = f"agentrl_bomb_{uuid.uuid4().hex}"
    sb = Sandbox(ws, timeout=3, max_processes=16)
    # tiny scale first: 60 sleepers against a limit of 16
    res = sb.run(f"for i in $(seq 60); do sh -c 'sleep 30; :' {marker} 2>/dev/null & done; sleep 0.5; "
                 "ls /proc | grep -c '^[0-9]'")
    assert "fork" in res.stderr
    assert not processes_with(marker)
    # the real thing: a classic bash fork bomb, killed at the wall-clock limit
    bomb = f"bomb() {{ bomb | bomb & }}; bomb; while :; do :; done # {marker}"
    res = Sandbox(ws, timeout=3, max_processes=32).run(bomb)
    assert res.killed and res.timed_out and res.exit_code is None
    assert "fork" in res.stderr and "Resource temporarily unavailable" in res.stderr
    assert not processes_with(marker)
    host_is_fine()


def test_background_processes_die_with_the_command(ws):
    marker = f"agentrl_bg_{uuid.uuid4().hex}"
    res = Sandbox(ws).run(f"(setsid sh -c 'sleep 300; :' {marker} &); "
                          f"nohup sh -c 'sleep 300; :' {marker} >/dev/null 2>&1 & echo started")
    assert res.ok and res.stdout == "started\n"
    assert not processes_with(marker)
    host_is_fine()


def test_unbounded_memory_is_contained(ws):
    grow = "python -c \"x = []\nwhile True: x.append(bytearray(64 << 20))\""
    res = Sandbox(ws, memory_bytes=512 << 20, timeout=20).run(grow)
    assert res.exit_code == 1 and "MemoryError" in res.stderr and not res.timed_out
    ok = Sandbox(ws, memory_bytes=512 << 20).run("python -c \"x = bytearray(128 << 20); print(len(x))\"")
    assert ok.ok and ok.stdout.strip() == str(128 << 20)  # control: the limit is not simply 0
    host_is_fine()


def test_endless_loops_are_stopped(ws):
    marker = f"agentrl_loop_{uuid.uuid4().hex}"
    res = Sandbox(ws, timeout=2).run(f"while true; do :; done # {marker}")
    assert res.timed_out and res.killed and "wall-clock" in res.describe()
    # the CPU-time limit stops a busy process even before the wall clock does
    res = Sandbox(ws, timeout=60, cpu_seconds=1).run(f"python -c 'while True: pass' {marker}")
    assert not res.timed_out and res.exit_code in (128 + 9, 128 + 24) and "SIG" in res.describe()
    assert not processes_with(marker)
    host_is_fine()


def test_output_flood_is_capped(ws):
    res = Sandbox(ws, max_output_bytes=1 << 20, timeout=60).run("head -c 5000000000 /dev/zero | tr '\\0' x")
    assert res.output_truncated and res.killed and not res.timed_out
    assert len(res.stdout) == 1 << 20 and set(res.stdout) == {"x"}
    res = Sandbox(ws, max_output_bytes=1 << 20).run("yes err >&2 & yes out")
    assert res.output_truncated and len(res.stdout) + len(res.stderr) <= 1 << 20
    # a big file: RLIMIT_FSIZE
    res = Sandbox(ws, max_file_bytes=1 << 20).run("head -c 5000000 /dev/zero > big.bin")
    assert res.exit_code != 0 and (ws / "big.bin").stat().st_size <= 1 << 20
    host_is_fine()


def test_refuses_without_bubblewrap_unless_allowed(ws, monkeypatch, outside):
    monkeypatch.setenv("PATH", str(outside))  # no bwrap on PATH
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        Sandbox(ws)
    from envs.swe import SWEEnv

    with pytest.raises(SandboxUnavailable):
        SWEEnv()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("agentrl.sandbox.bwrap_available", lambda: False)
    sb = Sandbox(ws, allow_unsandboxed=True)
    res = sb.run(f"cat {outside / 'secret.txt'}")
    assert not sb.sandboxed and res.stdout == "TOP-SECRET-42"  # explicitly unconfined, and it is
