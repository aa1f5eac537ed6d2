"""Per-episode workspaces and grading for SWE instances.

Owns: ``make_workspace`` (a fresh checkout of an instance's base commit, from a local repository or git
bundle, holding that one commit only: a depth-1 fetch, so no other commit of the source, such as a
later fix, is reachable from the workspace), ``workspace_diff`` and ``grade`` (SWE-bench's evaluation:
the test patch's files are reset to the base commit, the test patch is applied, FAIL_TO_PASS and
PASS_TO_PASS run with pytest; RESOLVED_FULL = every F2P test and every P2P test passes).

Grading is hardened against the reward hacks an RL policy finds first (each is tested): test
infrastructure (every ``conftest.py``, ``pytest.ini``, ``tox.ini``, ``setup.cfg``, ``pyproject.toml``)
is reset to the base commit and conftest files the model added are removed, as the test files are;
pytest is imported from the interpreter's own site-packages before the workspace joins ``sys.path``
(``python -P``), so a ``pytest.py`` in the workspace cannot stand in for it; and each test's outcome
comes from a report hook of the grading runner, printed after a marker that is random per grading
run, not from pytest's console output, which the model's code can print into. Code the tests import
runs in the same process as pytest, so a deliberate attack on pytest's internals is not excluded.
Does not own: the confinement (agentrl.sandbox) or the instance format (envs.swe.instances).

Once a model has acted in a workspace, git runs there only inside the sandbox: the model could have
written ``.git/config`` (hooks, fsmonitor, filters), which a host-side git would execute.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agentrl.sandbox import Sandbox
from envs.swe.instances import SWEInstance

__all__ = ["make_workspace", "workspace_diff", "grade", "GradeResult", "TEST_CMD"]

_RUNNER = r"""# agentrl grade runner
import json, os, sys
import pytest  # the interpreter's own: `python -P` keeps the workspace off sys.path until now
sys.path.insert(0, os.getcwd())  # then the workspace, as `python -m pytest` would have it
status = {}
class Outcomes:
    def pytest_runtest_logreport(self, report):
        xfail = hasattr(report, "wasxfail")
        if report.when == "call":
            kind = {"passed": "XPASS" if xfail else "PASSED", "failed": "FAILED",
                    "skipped": "XFAIL" if xfail else "SKIPPED"}[report.outcome]
        elif report.failed:
            kind = "ERROR"
        elif report.skipped:
            kind = "XFAIL" if xfail else "SKIPPED"
        else:
            return
        status.setdefault(report.nodeid, kind)
code = pytest.main(sys.argv[1:], plugins=[Outcomes()])
print("\n" + os.environ["AGENTRL_GRADE_MARK"] + json.dumps(status), flush=True)
sys.exit(code)
"""
# Plugins installed beside the interpreter are not loaded (the hypothesis plugin alone costs ~1 s per
# run); instances whose tests need a plugin pass a test_cmd with `-p plugin` or without the variable.
# A test_cmd without the runner (a plain `python -m pytest ...`) is graded from pytest's `-rA` summary
# lines instead, and loses the protection against the model printing them.
TEST_CMD = ("PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python -P -c " + shlex.quote(_RUNNER)
            + " -rA -p no:cacheprovider --tb=short -q")
_INFRA = ("pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml")
_GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
_caches: dict[str, Path] = {}
_cache_lock = threading.Lock()
_cache_root: Path | None = None


def _git(*args: str, cwd: Path | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **_GIT_ENV}, capture_output=True, text=True,
                         timeout=120)
    if out.returncode:
        raise RuntimeError(f"git {' '.join(args[:3])} failed: {out.stderr.strip()}")
    return out.stdout


def _cache(source: Path) -> Path:
    """A bare copy of a bundle or repository, made once per process, that serves fetches by commit."""
    global _cache_root
    key = str(source.resolve())
    with _cache_lock:
        if key not in _caches:
            if _cache_root is None:
                _cache_root = Path(tempfile.mkdtemp(prefix="agentrl-swe-repos-"))
                atexit.register(shutil.rmtree, _cache_root, True)
            dest = _cache_root / f"{len(_caches)}.git"
            _git("clone", "-q", "--mirror", key, str(dest))
            _git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=dest)
            _caches[key] = dest
        return _caches[key]


def make_workspace(source: str | Path, base_commit: str, parent: str | Path | None = None) -> Path:
    """A new directory with ``base_commit`` checked out (branch ``main``), nothing else of the source."""
    cache = _cache(Path(source))
    ws = Path(tempfile.mkdtemp(prefix="agentrl-swe-ws-", dir=parent))
    try:
        _git("init", "-q", "-b", "main", str(ws))
        _git("fetch", "-q", "--depth", "1", "--no-tags", f"file://{cache}", base_commit, cwd=ws)
        _git("reset", "-q", "--hard", base_commit, cwd=ws)
        _git("config", "user.name", "agent", cwd=ws)
        _git("config", "user.email", "agent@localhost", cwd=ws)
    except BaseException:
        shutil.rmtree(ws, ignore_errors=True)
        raise
    return ws


def workspace_diff(sandbox: Sandbox, base_commit: str) -> str:
    """Every change since the base commit, new files included (run inside the sandbox)."""
    res = sandbox.run(f"git add -A && git diff --cached --no-color {shlex.quote(base_commit)}", timeout=60)
    if not res.ok:
        return f"(could not compute the diff: exit {res.exit_code} {res.describe()}\n{res.stderr[-2000:]})"
    return res.stdout


@dataclass
class GradeResult:
    """One grading run. ``tests``: test id -> PASSED / FAILED / ERROR / ... (absent: did not run)."""

    resolved: bool
    f2p_passed: int
    f2p_total: int
    p2p_passed: int
    p2p_total: int
    log: str
    tests: dict[str, str] = field(default_factory=dict)

    @property
    def f2p_frac(self) -> float:
        return self.f2p_passed / self.f2p_total if self.f2p_total else 1.0

    @property
    def p2p_frac(self) -> float:
        return self.p2p_passed / self.p2p_total if self.p2p_total else 1.0


_STATUS = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS|SKIPPED) (\S+)", re.M)
_PASSING = ("PASSED", "XFAIL")


def grade(sandbox: Sandbox, inst: SWEInstance, timeout: float = 300.0, test_cmd: str = TEST_CMD) -> GradeResult:
    """SWE-bench evaluation of the workspace as it is (the workspace is changed: test patch applied)."""
    base = shlex.quote(inst.base_commit)
    files = " ".join(shlex.quote(f) for f in inst.test_files())
    patch = base64.b64encode(inst.test_patch.encode()).decode()
    tests = " ".join(shlex.quote(t) for t in [*inst.FAIL_TO_PASS, *inst.PASS_TO_PASS])
    mark = f"AGENTRL-GRADE-{secrets.token_hex(16)}:"
    infra = " ".join(_INFRA)
    script = "\n".join([
        f"echo {patch} | base64 -d > /tmp/test.patch",
        f"existing=$(git ls-tree -r --name-only {base} -- {files})" if files else "existing=",
        f'[ -z "$existing" ] || git checkout -q {base} -- $existing',
        f"for f in {files}; do git cat-file -e {base}:\"$f\" 2>/dev/null || rm -f \"$f\"; done"
        if files else "true",
        # test infrastructure as in the base commit: its conftest files (and no others) and config files
        f"find . -name conftest.py -not -path './.git/*' | while read -r f; do rm -f \"$f\"; done",
        f"for f in $(git ls-tree -r --name-only {base} | grep -E '(^|/)conftest\\.py$'); do "
        f"git checkout -q {base} -- \"$f\"; done",
        f"for f in {infra}; do if git cat-file -e {base}:\"$f\" 2>/dev/null; then git checkout -q {base} -- \"$f\"; "
        f"else rm -f \"$f\"; fi; done",
        "git apply /tmp/test.patch || { echo '>>> the test patch does not apply'; exit 3; }",
        f"AGENTRL_GRADE_MARK={mark} {test_cmd} {tests}",
    ])
    res = sandbox.run(script, timeout=timeout)
    log = res.stdout + (f"\n--- stderr ---\n{res.stderr}" if res.stderr else "")
    if res.describe():
        log += f"\n>>> {res.describe()}"
    status: dict[str, str] = {}
    if "# agentrl grade runner" in test_cmd:  # the runner's report, and nothing else (none: nothing passed)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith(mark)]
        if lines:
            status = json.loads(lines[-1][len(mark):])
    else:
        for kind, test_id in _STATUS.findall(res.stdout):
            status.setdefault(test_id, kind)
    f2p = sum(status.get(t) in _PASSING for t in inst.FAIL_TO_PASS)
    p2p = sum(status.get(t) in _PASSING for t in inst.PASS_TO_PASS)
    resolved = f2p == len(inst.FAIL_TO_PASS) and p2p == len(inst.PASS_TO_PASS)
    return GradeResult(resolved, f2p, len(inst.FAIL_TO_PASS), p2p, len(inst.PASS_TO_PASS), log, status)
