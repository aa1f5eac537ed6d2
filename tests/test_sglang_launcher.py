"""`SGLangServer`'s process lifecycle and its files, with a stand-in server process.

The stand-in is a small Python HTTP server started through the launcher's `launcher=` hook (the hook
`cpu_test_server` uses for shared/sglang-cpu/launch.sh): a real process group on a real socket that
answers /health_generate and, like SGLang, creates files in $TMPDIR (SGLang's ZMQ IPC sockets). It
stands in for SGLang only to test the launcher; tests/test_sglang_real.py runs the real server.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
from pathlib import Path

import pytest

from agentrl.engine.sglang import SGLangServer, SGLangServerConfig, SGLangServerError

STAND_IN = textwrap.dedent("""
    import http.server, os, sys, tempfile, time
    model, port = sys.argv[1], int(sys.argv[2])
    if model == "fail":
        print("stand-in: cannot load the model", flush=True)
        sys.exit(3)
    fd, ipc = tempfile.mkstemp(prefix="ipc-")  # where SGLang puts its ZMQ IPC sockets
    print(f"stand-in: TMPDIR={os.environ.get('TMPDIR')} ipc={ipc} pgid={os.getpgid(0)}", flush=True)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health_generate" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tmp_path: Path, model: str = "m", **kw) -> SGLangServer:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return SGLangServer(SGLangServerConfig(model_path=model, port=_free_port(), launcher=[sys.executable, str(script)],
                                           startup_timeout=60, **kw))


def _fields(log: Path) -> dict[str, str]:
    line = next(x for x in log.read_text().splitlines() if x.startswith("stand-in: TMPDIR="))
    return dict(kv.split("=", 1) for kv in line.split(": ", 1)[1].split())


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_normal_stop_removes_the_servers_tmpdir_and_the_temp_log(tmp_path):
    srv = _server(tmp_path)
    with srv:
        log = srv.log_path
        seen = _fields(log)
        tmpdir, ipc, pgid = Path(seen["TMPDIR"]), Path(seen["ipc"]), int(seen["pgid"])
        assert tmpdir.name.startswith("agentrl-sglang-") and ipc.parent == tmpdir and ipc.exists()
        assert _alive(pgid)
    assert not _alive(pgid)  # the whole group is gone
    assert not tmpdir.exists()  # with the files the server left in it
    assert not log.exists() and srv.log_path is None


def test_a_failed_start_keeps_the_log_and_names_it(tmp_path):
    srv = _server(tmp_path, model="fail")
    with pytest.raises(SGLangServerError) as e:
        srv.start()
    msg = str(e.value)
    assert "exited with code 3" in msg and "stand-in: cannot load the model" in msg
    assert str(srv.log_path) in msg and srv.log_path.exists()  # kept for the user
    srv.log_path.unlink()


def test_a_given_log_path_and_tmpdir_are_left_to_the_caller(tmp_path):
    mine = tmp_path / "my-tmp"
    mine.mkdir()
    srv = _server(tmp_path, log_path=str(tmp_path / "logs" / "server.log"), env={"TMPDIR": str(mine)})
    with srv:
        seen = _fields(srv.log_path)
        assert Path(seen["TMPDIR"]) == mine
    assert (tmp_path / "logs" / "server.log").exists() and mine.exists() and Path(seen["ipc"]).exists()
