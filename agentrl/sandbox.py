"""Run one shell command confined to a workspace directory, under bubblewrap, with resource limits.

Owns: ``Sandbox`` (the confinement: a bubblewrap command line, limits, the process lifetime, output
capture) and ``SandboxResult`` (exit code, capped stdout/stderr, flags for what cut the run short).
Does not own: what runs inside (the SWE env's tools, test runs) or the workspace's contents.

What a command sees: the workspace, writable, at ``/workspace`` (its cwd); read-only ``/usr``,
``/lib*``, ``/bin``, ``/sbin``, a few files of ``/etc``, and the python interpreter's prefixes (the
venv and its base install, at their host paths, so ``python -m pytest`` works); a private 64 MiB
tmpfs ``/tmp``; fresh ``/proc`` and ``/dev``. Nothing else of the host exists. All namespaces are
unshared (network: only a private loopback; pid: the command's processes die with the sandbox; user:
it runs as uid 65534 without capabilities), ``--die-with-parent``, ``--new-session``, a clean env.

Limits: RLIMIT_CPU (cpu seconds), RLIMIT_AS (address space), RLIMIT_FSIZE (largest file written),
RLIMIT_NOFILE, set with ``prlimit`` inside the sandbox; a process-count limit; a wall-clock timeout
that kills the whole sandbox (bubblewrap, its pid namespace and the session); stdout/stderr read
incrementally and the sandbox killed as soon as their total passes ``max_output_bytes``.

Process count. RLIMIT_NPROC never binds uid 0, and bubblewrap run by root maps the sandbox user to
host uid 0. So, as root, each run gets its own pids cgroup (v1 ``/sys/fs/cgroup/pids`` or a v2
``/sys/fs/cgroup`` with the pids controller) with ``pids.max``, removed afterwards; where no cgroup can
be made, bubblewrap runs as host uid 65534 (setpriv), where RLIMIT_NPROC binds (the workspace is then
chowned to it). Run by another user, RLIMIT_NPROC binds as it is (counted per user namespace).

Without ``bwrap`` on PATH, ``Sandbox`` refuses to run anything (``SandboxUnavailable``) unless it was
made with ``allow_unsandboxed=True``: then commands run directly in the workspace, with the rlimits,
timeout and output cap but no confinement at all.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sandbox", "SandboxResult", "SandboxUnavailable", "bwrap_available"]

WORKDIR = "/workspace"
NOBODY = 65534
_ETC = ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/localtime", "/etc/ld.so.cache",
        "/etc/alternatives", "/etc/gitconfig")
_CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing (or cannot run) and unsandboxed execution was not allowed explicitly."""


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


@dataclass
class SandboxResult:
    """One command's outcome. ``exit_code``: the command's status (negative: killed by that signal;
    None: no status, the sandbox was killed). ``stdout`` / ``stderr``: decoded, together at most the
    output cap. Flags: ``timed_out`` (wall clock), ``output_truncated`` (the cap was hit and the run
    killed), ``killed`` (the sandbox was killed for either reason)."""

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    output_truncated: bool = False
    killed: bool = False
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.killed

    def describe(self) -> str:
        """Why the run did not finish normally ("" when it did, whatever its exit code)."""
        if self.timed_out:
            return "the command ran past the wall-clock limit and was killed"
        if self.output_truncated:
            return "the command's output passed the size limit and it was killed"
        if self.exit_code is not None and self.exit_code < 0:
            return f"the command was killed by {signal.Signals(-self.exit_code).name}"
        if self.exit_code is not None and self.exit_code > 128 and self.exit_code - 128 in _LIMIT_SIGNALS:
            return f"the command was killed by {signal.Signals(self.exit_code - 128).name} (a resource limit)"
        return ""


_LIMIT_SIGNALS = {int(signal.SIGKILL), int(signal.SIGXCPU), int(signal.SIGXFSZ), int(signal.SIGSEGV)}


@dataclass
class Sandbox:
    """Runs commands (``bash -c``) in ``workspace``. Limits per command: ``timeout`` (wall-clock
    seconds), ``cpu_seconds``, ``memory_bytes`` (address space), ``max_processes``, ``max_file_bytes``,
    ``max_output_bytes`` (stdout + stderr). ``python``: the interpreter whose prefixes are mounted
    (default: this one). ``extra_ro_binds``: more host paths mounted read-only at the same path."""

    workspace: str | Path
    timeout: float = 30.0
    cpu_seconds: int = 60
    memory_bytes: int = 2 << 30
    max_processes: int = 64
    max_file_bytes: int = 64 << 20
    max_output_bytes: int = 1 << 20
    python: str = sys.executable
    extra_ro_binds: tuple[str, ...] = ()
    allow_unsandboxed: bool = False

    def __post_init__(self) -> None:
        self.workspace = Path(self.workspace).resolve()
        if not self.workspace.is_dir():
            raise FileNotFoundError(f"workspace {self.workspace} is not a directory")
        self.sandboxed = bwrap_available()
        if not self.sandboxed and not self.allow_unsandboxed:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed, so model-written commands cannot be "
                                     "confined: install it (apt-get install bubblewrap) or pass "
                                     "allow_unsandboxed=True to run them directly on this machine")
        self._mode = "unsandboxed" if not self.sandboxed else ("rlimit" if os.geteuid() != 0 else
                                                               ("cgroup" if _cgroup_root() else "uid"))

    # ---- command line ----
    def _limits(self) -> list[str]:
        out = ["prlimit", f"--cpu={self.cpu_seconds}", f"--as={self.memory_bytes}",
               f"--fsize={self.max_file_bytes}", "--nofile=256", "--core=0"]
        if self._mode in ("rlimit", "uid", "unsandboxed"):
            out.append(f"--nproc={self.max_processes}")
        return out

    def _python_paths(self) -> list[str]:
        paths = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(self.python)))}
        if self.python != sys.executable:  # another interpreter: mount its venv (bin/..) and real install
            paths.add(os.path.dirname(os.path.dirname(os.path.abspath(self.python))))
        return sorted(p for p in paths if p and not p.startswith(("/usr", "/bin", "/lib")) and os.path.isdir(p))

    def _bwrap(self) -> list[str]:
        args = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--unshare-user",
                "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns", "--cap-drop", "ALL",
                "--ro-bind", "/usr", "/usr", "--proc", "/proc", "--dev", "/dev",
                "--size", str(64 << 20), "--tmpfs", "/tmp", "--dir", "/etc"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            p = Path("/" + name)
            if p.is_symlink():
                args += ["--symlink", os.readlink(p), str(p)]
            elif p.is_dir():
                args += ["--ro-bind", str(p), str(p)]
        for p in (*_ETC, *self._python_paths(), *self.extra_ro_binds):
            if os.path.exists(p):
                args += ["--ro-bind", p, p]
        args += ["--bind", str(self.workspace), WORKDIR, "--chdir", WORKDIR, "--clearenv"]
        env = {"PATH": f"{os.path.dirname(os.path.abspath(self.python))}:/usr/local/bin:/usr/bin:/bin",
               "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "TERM": "dumb",
               "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*"}
        for k, v in env.items():
            args += ["--setenv", k, v]
        return args

    def command_line(self, command: str) -> list[str]:
        """The argv that runs ``command`` (before any cgroup or setpriv wrapper)."""
        inner = [*self._limits(), "bash", "-c", command]
        return inner if self._mode == "unsandboxed" else [*self._bwrap(), "--", *inner]

    # ---- running ----
    def run(self, command: str, timeout: float | None = None) -> SandboxResult:
        """Run ``command`` with bash in the sandbox; never raises for what the command does."""
        limit = self.timeout if timeout is None else timeout
        argv, cgroup = self.command_line(command), None
        if self._mode == "cgroup":
            cgroup = _make_cgroup(self.max_processes)
            # join the cgroup before bwrap starts, so every process of the sandbox is counted in it
            argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv]
        elif self._mode == "uid":
            _chown_tree(self.workspace, NOBODY)
            argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        cwd = str(self.workspace)
        # bwrap's own environment stays readable in the sandbox (/proc/1/environ): give it only PATH
        env = ({"PATH": os.environ.get("PATH", "/usr/bin:/bin")} if self._mode != "unsandboxed"
               else {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            if cgroup is not None:
                _remove_cgroup(cgroup)
            raise SandboxUnavailable(f"cannot start the sandbox: {e}") from e
        try:
            out, err, timed_out, truncated = self._collect(proc, limit)
        finally:
            _kill(proc, cgroup)
        code = proc.returncode
        killed = timed_out or truncated
        return SandboxResult(exit_code=None if killed else code, stdout=out.decode("utf-8", "replace"),
                             stderr=err.decode("utf-8", "replace"), timed_out=timed_out,
                             output_truncated=truncated, killed=killed, duration_s=time.monotonic() - start)

    def _collect(self, proc: subprocess.Popen, limit: float) -> tuple[bytes, bytes, bool, bool]:
        """Read both pipes in threads, stopping (and killing) at the byte cap or the deadline."""
        bufs: list[list[bytes]] = [[], []]
        total = [0]
        lock = threading.Lock()
        over = threading.Event()

        def pump(stream, i: int) -> None:
            while chunk := stream.read1(65536):
                with lock:
                    room = self.max_output_bytes - total[0]
                    bufs[i].append(chunk[: max(room, 0)])
                    total[0] += len(chunk)
                    if total[0] > self.max_output_bytes:
                        over.set()
                        _kill_group(proc)
                        return

        threads = [threading.Thread(target=pump, args=(s, i), daemon=True)
                   for i, s in enumerate((proc.stdout, proc.stderr))]
        for t in threads:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = not over.is_set()
            _kill_group(proc)
            proc.wait()
        for t in threads:
            t.join(timeout=5)
        with lock:
            return b"".join(bufs[0]), b"".join(bufs[1]), timed_out, over.is_set()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: subprocess.Popen, cgroup: Path | None) -> None:
    """Kill what is left: bwrap's session (its pid namespace dies with it) and anything in the cgroup."""
    _kill_group(proc)
    if proc.poll() is None:
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe:
            pipe.close()
    if cgroup is not None:
        _remove_cgroup(cgroup)


def _cgroup_root() -> Path | None:
    for root in _CGROUP_ROOTS:
        controllers = root / "cgroup.controllers"
        v1 = root.name == "pids" and (root / "cgroup.procs").exists()
        v2 = controllers.exists() and "pids" in controllers.read_text().split()
        if (v1 or v2) and os.access(root, os.W_OK):
            probe = root / f"agentrl-probe-{uuid.uuid4().hex[:8]}"
            try:
                probe.mkdir()
                ok = (probe / "pids.max").exists()
                probe.rmdir()
            except OSError:
                continue
            if ok:
                return root
    return None


def _make_cgroup(max_processes: int) -> Path:
    root = _cgroup_root()
    if root is None:
        raise SandboxUnavailable("the pids cgroup is no longer writable")
    cg = root / f"agentrl-sandbox-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    cg.mkdir()
    (cg / "pids.max").write_text(str(max_processes))
    return cg


def _remove_cgroup(cg: Path) -> None:
    for _ in range(100):  # processes in the cgroup may take a moment to exit after SIGKILL
        try:
            pids = (cg / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.02)


def _chown_tree(root: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)):
            os.lchown(name, uid, uid)
