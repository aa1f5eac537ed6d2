"""SWEEnv: fix a GitHub-style issue in a repository; reward 1 if the repository's tests then pass.

One episode = one SWE-bench instance (``options["task_index"]``, else drawn from the seed). The model
gets the problem statement and a fresh checkout of the base commit at ``/workspace``, and the tools
``bash`` (confined by agentrl.sandbox), ``view_file``, ``str_replace``, ``create_file`` and ``submit``.
``submit`` grades the workspace (envs.swe.workspace.grade: test patch applied, FAIL_TO_PASS and
PASS_TO_PASS run in the sandbox) and ends the episode; so does a turn without a tool call (the
workspace is graded as it is). Reward: 1.0 when RESOLVED_FULL, else 0.0, or with
``partial_credit`` the fraction of F2P and P2P tests passing.

The file tools run on the host, so they only open regular files whose real path (symlinks resolved)
is inside the workspace. Without bubblewrap the env refuses to start unless ``allow_unsandboxed``.
Does not own: the sandbox, workspaces and grading, the instance format (see envs.swe.*).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import weakref
from pathlib import Path

from agentrl.env import Task, ToolEnv, tool
from agentrl.sandbox import WORKDIR, Sandbox, SandboxUnavailable, bwrap_available
from agentrl.tools import parse_tool_calls
from envs.swe.instances import DATA_DIR, SWEInstance, load_instances, resolve_repo
from envs.swe.workspace import TEST_CMD, GradeResult, grade, make_workspace, workspace_diff

MAX_FILE_BYTES = 1 << 20

SYSTEM_PROMPT = (
    "You are a software engineer fixing an issue in a Python repository checked out at /workspace. "
    "Explore it and run code with `bash` (grep, ls, python, python -m pytest), read files with `view_file`, "
    "edit with `str_replace` and `create_file`. Change the source code, not the tests. When the fix is "
    "done, call `submit`: it ends the episode and your changes are graded by the repository's tests.")


class ToolError(Exception):
    """A tool call that did not succeed (the env turns it into an "Error: ..." observation)."""


class SWEEnv(ToolEnv):
    """Args:
        instances: SWE-bench JSONL file (default: the shipped task set).
        repos: directory holding the repositories / bundles (default: ``repos/`` beside ``instances``).
        instance_ids: keep only these instances.
        command_timeout: wall-clock seconds per ``bash`` call; test_timeout: per grading run.
        test_cmd: the pytest command grading runs (test ids are appended); default envs.swe.workspace.TEST_CMD.
        memory_mb, max_processes, cpu_seconds: sandbox limits per command.
        partial_credit: reward the fraction of passing F2P + P2P tests when not resolved.
        allow_unsandboxed: run model commands without bubblewrap (only where bwrap is unavailable).
        workdir: where workspaces are made (default: the system temp directory).
    """

    system_prompt = SYSTEM_PROMPT

    def __init__(self, instances: str | None = None, repos: str | None = None, instance_ids: list[str] | None = None,
                 command_timeout: float = 30.0, test_timeout: float = 300.0, memory_mb: int = 2048,
                 max_processes: int = 64, cpu_seconds: int = 120, partial_credit: bool = False,
                 allow_unsandboxed: bool = False, workdir: str | None = None, test_cmd: str = TEST_CMD,
                 max_turns: int = 30, max_tool_output_chars: int = 8000, **kwargs):
        super().__init__(max_turns=max_turns, max_tool_output_chars=max_tool_output_chars, **kwargs)
        if not bwrap_available() and not allow_unsandboxed:
            raise SandboxUnavailable("SWEEnv runs model-written commands and needs bubblewrap (apt-get install "
                                     "bubblewrap); pass allow_unsandboxed=True to run them unconfined")
        path = Path(instances) if instances else DATA_DIR / "instances.jsonl"
        self.instances = load_instances(path)
        if instance_ids is not None:
            by_id = {i.instance_id: i for i in self.instances}
            unknown = sorted(set(instance_ids) - set(by_id))
            if unknown:
                raise ValueError(f"unknown instance ids: {unknown}")
            self.instances = [by_id[i] for i in instance_ids]
        self.repos = Path(repos) if repos else path.parent / "repos"
        self.limits = dict(timeout=command_timeout, memory_bytes=memory_mb << 20, max_processes=max_processes,
                           cpu_seconds=cpu_seconds, allow_unsandboxed=allow_unsandboxed)
        self.test_timeout, self.test_cmd = test_timeout, test_cmd
        self.partial_credit, self.workdir = partial_credit, workdir
        self.instance: SWEInstance | None = None
        self.workspace: Path | None = None
        self.sandbox: Sandbox | None = None
        self._cleanup: weakref.finalize | None = None
        self._reset_episode()
        self.tools = [tool(timeout=command_timeout + 30)(self.bash), tool(self.view_file), tool(self.str_replace),
                      tool(self.create_file), tool(timeout=test_timeout + 90)(self.submit)]

    # ---- tools ----
    def bash(self, command: str) -> str:
        """Run a bash command in /workspace (a sandbox: no network; files outside /workspace are not
        visible; limits on time, memory and output). Returns stdout and stderr.

        Args:
            command: The command line, e.g. "grep -rn 'def parse' ." or "python -m pytest -q tests".
        """
        res = self._sandbox().run(command)
        out = res.stdout + (("\n" if res.stdout and not res.stdout.endswith("\n") else "") + res.stderr
                            if res.stderr else "")
        if res.describe():
            raise ToolError(f"{res.describe()}. Output so far:\n{out}")
        if res.exit_code != 0:
            raise ToolError(f"exit code {res.exit_code}\n{out}")
        return out or "(no output)"

    def view_file(self, path: str, start_line: int = 1, end_line: int | None = None) -> str:
        """Show a file with line numbers (or list a directory).

        Args:
            path: Path relative to /workspace (or absolute, under /workspace).
            start_line: First line to show (1-based).
            end_line: Last line to show (default: the end of the file).
        """
        real = self._path(path)
        if real.is_dir():
            return "\n".join(sorted(p.name + "/" * p.is_dir() for p in real.iterdir() if p.name != ".git"))
        lines = self._read(real).splitlines()
        end = len(lines) if end_line is None else min(end_line, len(lines))
        if start_line < 1 or start_line > max(end, 1):
            raise ToolError(f"line range {start_line}..{end_line} is outside the file (1..{len(lines)})")
        return "\n".join(f"{n:6}\t{lines[n - 1]}" for n in range(start_line, end + 1))

    def str_replace(self, path: str, old_str: str, new_str: str) -> str:
        """Replace the one occurrence of old_str in a file with new_str.

        Args:
            path: Path relative to /workspace.
            old_str: Exact text to replace (whitespace included); must occur exactly once.
            new_str: The replacement text.
        """
        real = self._path(path)
        text = self._read(real)
        count = text.count(old_str) if old_str else 0
        if count != 1:
            raise ToolError(f"old_str occurs {count} times in {path}; it must occur exactly once")
        self._write(real, text.replace(old_str, new_str))
        return f"Edited {path}."

    def create_file(self, path: str, content: str) -> str:
        """Create a file (or overwrite it) with the given content; parent directories are created.

        Args:
            path: Path relative to /workspace.
            content: The whole content of the file.
        """
        real = self._path(path, must_exist=False)
        if len(content.encode()) > MAX_FILE_BYTES:
            raise ToolError(f"content is larger than {MAX_FILE_BYTES} bytes")
        real.parent.mkdir(parents=True, exist_ok=True)
        self._write(real, content)
        return f"Wrote {path}."

    def submit(self) -> str:
        """Submit the current state of /workspace as the fix; this ends the episode."""
        self._grade()
        self.submitted = True
        self.end_episode("submitted")
        return "Submitted."

    # ---- ToolEnv ----
    def num_tasks(self) -> int:
        return len(self.instances)

    def task(self, rng, options) -> Task:
        index = options.get("task_index")
        index = int(rng.integers(len(self.instances))) if index is None else int(index)
        inst = self.instances[index]
        self._remove_workspace()
        self._reset_episode()
        self.instance = inst
        self.workspace = make_workspace(resolve_repo(inst.repo, self.repos), inst.base_commit, self.workdir)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.workspace), True)
        prompt = (f"{inst.problem_statement.strip()}\n\nThe repository is checked out at {WORKDIR} (the working "
                  "directory of `bash`). Fix the issue in the source code, then call `submit`.")
        return Task(messages=[{"role": "user", "content": prompt}], info={"instance_id": inst.instance_id},
                    id=inst.instance_id)

    async def astep(self, action: str):
        """A final answer without a submit is graded first in a thread, so that concurrent episodes are
        not held up by its test run (``reward`` then only reads the grade)."""
        if self.grade_result is None and self.workspace is not None and isinstance(action, str) \
                and not parse_tool_calls(action).items:
            await asyncio.to_thread(self._grade)
        return await super().astep(action)

    def reward(self, task, history, final_text) -> float:
        result = self.grade_result or self._grade()
        if result.resolved or not self.partial_credit:
            return float(result.resolved)
        total = result.f2p_total + result.p2p_total
        return (result.f2p_passed + result.p2p_passed) / total if total else 0.0

    def turn_reward(self, task, action, results) -> float:
        self.tool_calls += len(results)
        self.tool_errors += sum(not r.ok for r in results)
        return 0.0

    def demonstration(self, task: Task) -> list[str]:
        """Apply the gold patch with one ``bash`` call (a heredoc into ``git apply``), then submit."""
        inst = next(i for i in self.instances if i.instance_id == task.id)
        patch = inst.patch if inst.patch.endswith("\n") else inst.patch + "\n"
        apply = f"git apply --verbose <<'AGENTRL_GOLD_PATCH'\n{patch}AGENTRL_GOLD_PATCH"
        return [_call("bash", command=apply), _call("submit")]

    def episode_metrics(self) -> dict[str, float]:
        r = self.grade_result
        return {"resolved": float(bool(r and r.resolved)), "f2p_passed_frac": r.f2p_frac if r else 0.0,
                "p2p_passed_frac": r.p2p_frac if r else 0.0, "submitted": float(self.submitted),
                "graded": float(r is not None), "tool_calls": float(self.tool_calls),
                "tool_errors": float(self.tool_errors),
                "patch_lines": float(sum(line[:1] in "+-" and line[:3] not in ("+++", "---")
                                         for line in (self.patch or "").splitlines()))}

    def episode_artifacts(self) -> dict[str, str]:
        if self.patch is None and self.workspace is not None:
            self.patch = workspace_diff(self._sandbox(), self.instance.base_commit)
        log = self.grade_result.log if self.grade_result else "(not graded: the episode ended without an answer)"
        return {"patch.diff": self.patch or "", "test_log.txt": log}

    def close(self) -> None:
        self._remove_workspace()
        super().close()

    # ---- internals ----
    def _reset_episode(self) -> None:
        self.grade_result: GradeResult | None = None
        self.patch: str | None = None
        self.submitted = False
        self.tool_calls = self.tool_errors = 0

    def _sandbox(self) -> Sandbox:
        if self.workspace is None:
            raise ToolError("no episode is running (call reset first)")
        if self.sandbox is None or Path(self.sandbox.workspace) != self.workspace.resolve():
            self.sandbox = Sandbox(self.workspace, **self.limits)
        return self.sandbox

    def _grade(self) -> GradeResult:
        sandbox = self._sandbox()
        self.patch = workspace_diff(sandbox, self.instance.base_commit)
        self.grade_result = grade(sandbox, self.instance, self.test_timeout, self.test_cmd)
        return self.grade_result

    def _remove_workspace(self) -> None:
        if self._cleanup is not None:
            self._cleanup()  # removes the directory, once
        self.workspace, self.sandbox, self._cleanup = None, None, None

    def _path(self, path: str, must_exist: bool = True) -> Path:
        """The host path of a workspace path; refuses anything that resolves outside the workspace."""
        if self.workspace is None:
            raise ToolError("no episode is running (call reset first)")
        root = self.workspace.resolve()
        rel = path[len(WORKDIR):].lstrip("/") if path == WORKDIR or path.startswith(WORKDIR + "/") else path
        if os.path.isabs(rel):
            raise ToolError(f"{path} is outside {WORKDIR}")
        real = Path(os.path.realpath(root / rel))
        if real != root and root not in real.parents:
            raise ToolError(f"{path} is outside {WORKDIR}")
        if must_exist and not real.exists():
            raise ToolError(f"{path} does not exist")
        return real

    @staticmethod
    def _read(real: Path) -> str:
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"{real.name} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ToolError(f"{real.name} is larger than {MAX_FILE_BYTES} bytes; use bash (head, sed -n)")
        with open(real, "rb") as f:
            return f.read(MAX_FILE_BYTES).decode("utf-8", "replace")

    @staticmethod
    def _write(real: Path, text: str) -> None:
        if real.exists() and not stat.S_ISREG(os.stat(real).st_mode):
            raise ToolError(f"{real.name} is not a regular file")
        real.write_text(text)


def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"
