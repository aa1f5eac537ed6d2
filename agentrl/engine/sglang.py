"""Launcher for a real SGLang server (a subprocess), with routed-experts capture on.

Owns: `SGLangServerConfig` / `SGLangServer` (build the `sglang.launch_server` command, start it in
its own process group with a log file, wait until it serves, stop the whole group) and the lookup of
the CPU test venv built by ``shared/sglang-cpu/setup.sh`` (`sglang_cpu_venv`,
`SGLangServer.cpu_test_server`).
Does not own: talking to the server (client.py speaks SGLang's wire API) or installing SGLang
(it pins its own torch and lives in its own venv; see pyproject.toml).

Engine options (tensor parallel size, memory fraction, attention backend...) are passed through
verbatim in `extra_args` rather than wrapped one by one.

    with SGLangServer(SGLangServerConfig(model_path="ckpt", python="/venvs/sglang/bin/python",
                                         extra_args=["--tp-size", "2"])) as srv:
        client = EngineClient(srv.base_url)

The server leaves child processes (scheduler, detokenizer), so it is always started with
``start_new_session=True`` and stopped by signalling its process group. It also leaves files behind:
SGLang names its ZMQ IPC sockets with `tempfile` (files in $TMPDIR that a killed server never removes),
so each server gets a private $TMPDIR, deleted when it stops. The log file the launcher creates
(when `log_path` is not given) is deleted after a normal stop and kept, its path in the error, when the
server failed to start or had already exited.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SGLangServer", "SGLangServerConfig", "SGLangServerError", "sglang_cpu_dir", "sglang_cpu_venv"]

_REPO = Path(__file__).resolve().parents[2]


class SGLangServerError(RuntimeError):
    """The server exited before it was ready, or did not become ready in time (message has the log tail)."""


@dataclass
class SGLangServerConfig:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 30000
    python: str = "python"  # interpreter of the venv where sglang is installed
    extra_args: list[str] = field(default_factory=list)  # passed verbatim to sglang.launch_server
    env: dict[str, str] = field(default_factory=dict)  # added to os.environ for the server
    startup_timeout: float = 600.0  # seconds until /health_generate must answer 200
    log_path: str | None = None  # server stdout+stderr; default: a temp file (removed after a normal stop)
    launcher: list[str] | None = None  # replaces `python -m sglang.launch_server` (e.g. shared/sglang-cpu/launch.sh)


class SGLangServer:
    """One SGLang server process group; a context manager (start on enter, stop on exit)."""

    def __init__(self, cfg: SGLangServerConfig) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log = None
        self._own_log = False  # the log is a temp file of ours (deleted after a normal stop)
        self._tmpdir: str | None = None  # the server's private $TMPDIR (deleted on stop)
        self._ready = False

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def command(self) -> list[str]:
        c = self.cfg
        if c.launcher is not None:  # launch.sh MODEL PORT [args]: it sets host, device and the routed-experts flag
            return [*c.launcher, str(c.model_path), str(c.port), *c.extra_args]
        return [c.python, "-m", "sglang.launch_server", "--model-path", str(c.model_path),
                "--host", c.host, "--port", str(c.port), "--enable-return-routed-experts", *c.extra_args]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise SGLangServerError(f"server already running (pid {self.proc.pid})")
        if self.cfg.log_path:
            self.log_path = Path(self.cfg.log_path)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            fd, name = tempfile.mkstemp(prefix=f"sglang-{self.cfg.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._own_log, self._ready = not self.cfg.log_path, False
        env = {**os.environ, **self.cfg.env}
        if "TMPDIR" not in self.cfg.env:  # a TMPDIR the caller chose is theirs to clean
            self._tmpdir = tempfile.mkdtemp(prefix=f"agentrl-sglang-{self.cfg.port}-")
            env["TMPDIR"] = self._tmpdir
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        try:
            self.wait_ready()
            self._ready = True
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Poll GET /health_generate (a real one-token generation; /health if the route is missing)
        until it answers 200; fail fast, with the log tail, if the process exits first."""
        deadline = time.monotonic() + self.cfg.startup_timeout
        path = "/health_generate"
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise SGLangServerError(
                    f"SGLang server exited with code {self.proc.returncode} before it was ready; "
                    f"command: {' '.join(self.command())}\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + path, timeout=30) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:  # 503 while loading
                if e.code == 404 and path != "/health":
                    path = "/health"
                    continue
            except (urllib.error.URLError, OSError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise SGLangServerError(
                    f"SGLang server at {self.base_url} not ready after {self.cfg.startup_timeout:.0f} s"
                    f"\n--- log tail ({self.log_path}) ---\n{self.log_tail()}"
                )
            time.sleep(1.0)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; safe to call twice. Removes the
        server's private $TMPDIR, and the launcher's temp log unless the server failed or had exited."""
        proc, self.proc = self.proc, None
        healthy = proc is not None and self._ready and proc.poll() is None  # running until now: a normal stop
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                _signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
                # children (scheduler, detokenizer) may outlive the leader: always sweep the group
                _signal_group(pgid, signal.SIGKILL)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if healthy and self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def log_tail(self, n: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> SGLangServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:  # never leave a server behind (it keeps the CPU busy even when idle)
        try:
            self.stop(grace=2.0)
        except Exception:
            pass

    # ------------------------------------------------------------------ CPU test server
    @classmethod
    def cpu_test_server(cls, model_path: str | Path, port: int, extra_args: list[str] | None = None,
                        startup_timeout: float = 600.0) -> SGLangServer | None:
        """A server run by shared/sglang-cpu/launch.sh (real SGLang on CPU), or None if its venv is missing."""
        venv, cpu_dir = sglang_cpu_venv(), sglang_cpu_dir()
        if venv is None or cpu_dir is None:
            return None
        cfg = SGLangServerConfig(
            model_path=str(model_path), port=port, python=str(venv / "bin" / "python"),
            extra_args=list(extra_args or []), env={"SGLANG_CPU_VENV": str(venv)},
            startup_timeout=startup_timeout, launcher=["bash", str(cpu_dir / "launch.sh")],
        )
        return cls(cfg)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def sglang_cpu_dir() -> Path | None:
    """shared/sglang-cpu (holds launch.sh): $AGENTRL_SGLANG_CPU_DIR, else <repo>/../shared/sglang-cpu."""
    env = os.environ.get("AGENTRL_SGLANG_CPU_DIR")
    for d in ([Path(env)] if env else []) + [_REPO.parent / "shared" / "sglang-cpu", _REPO / "shared" / "sglang-cpu"]:
        if (d / "launch.sh").is_file():
            return d
    return None


def sglang_cpu_venv() -> Path | None:
    """The venv setup.sh built ($SGLANG_CPU_VENV or ~/.cache/agentrl/sglang-cpu), if sglang and its overlay exist."""
    venv = Path(os.environ.get("SGLANG_CPU_VENV") or Path.home() / ".cache" / "agentrl" / "sglang-cpu")
    if not (venv / "bin" / "python").exists() or not (venv / "overlay" / "sitecustomize.py").is_file():
        return None
    if not list((venv / "lib").glob("python3*/site-packages/sglang/__init__.py")):
        return None
    return venv
