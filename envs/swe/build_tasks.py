"""Build the shipped SWE task set (envs/swe/data/) from the projects in envs/swe/projects/.

    python -m envs.swe.build_tasks            # rewrites data/instances.jsonl and data/repos/*.bundle

Each project directory holds a small Python package in its correct state, its tests, and an
``instances.yaml``: per instance a ``bug`` (edits that turn the correct code into the buggy base
commit: each ``fixed`` text must occur exactly once, and is replaced by ``buggy``), ``tests`` (the test
patch: text appended to a test file, or a new file), the user's ``problem_statement`` and
``FAIL_TO_PASS``. For every instance this script commits the buggy tree as a root commit (tag
``<instance_id>``), derives the gold patch (buggy -> correct source) and the test patch with git,
and sets PASS_TO_PASS to every test collected after the test patch that is not in FAIL_TO_PASS.
Commits use fixed authors and dates, so base_commit hashes are reproducible. The bundles hold only
the base commits: nothing in a workspace's history reveals a fix.

Owns: building the data. Does not own: validating it (tests/test_swe.py runs every instance).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PROJECTS, DATA = HERE / "projects", HERE / "data"
_GIT_ENV = {"GIT_AUTHOR_NAME": "agentrl", "GIT_AUTHOR_EMAIL": "swe@agentrl.invalid",
            "GIT_COMMITTER_NAME": "agentrl", "GIT_COMMITTER_EMAIL": "swe@agentrl.invalid",
            "GIT_AUTHOR_DATE": "2025-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2025-01-01T00:00:00+0000",
            "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **_GIT_ENV}, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {out.stderr}")
    return out.stdout


def _source_files(project: Path) -> dict[str, str]:
    return {str(p.relative_to(project)): p.read_text() for p in sorted(project.rglob("*"))
            if p.is_file() and p.name != "instances.yaml" and "__pycache__" not in p.parts
            and ".pytest_cache" not in p.parts}


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for entry in root.iterdir():
        if entry.name != ".git":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _commit(repo: Path, files: dict[str, str], message: str, parent: str | None) -> str:
    _write_tree(repo, files)
    git(repo, "add", "-A")
    tree = git(repo, "write-tree").strip()
    return git(repo, "commit-tree", tree, "-m", message, *(["-p", parent] if parent else [])).strip()


def _collect(files: dict[str, str]) -> list[str]:
    """Test ids pytest collects in a tree (trusted code: our own projects, run directly)."""
    with tempfile.TemporaryDirectory() as tmp:
        _write_tree(Path(tmp), files)
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                             cwd=tmp, capture_output=True, text=True,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode or not ids:
        raise RuntimeError(f"test collection failed:\n{out.stdout}\n{out.stderr}")
    return ids


def build_project(project: Path, repo: Path) -> list[dict]:
    spec = yaml.safe_load((project / "instances.yaml").read_text())
    fixed = _source_files(project)
    owner, name = spec["repo"].split("/")
    rows = []
    for inst in spec["instances"]:
        instance_id = f"{owner}__{name}-{inst['number']}"
        buggy = dict(fixed)
        for edit in inst["bug"]:
            text = buggy[edit["file"]]
            if text.count(edit["fixed"]) != 1:
                raise ValueError(f"{instance_id}: {edit['fixed']!r} occurs {text.count(edit['fixed'])} times "
                                 f"in {edit['file']}")
            buggy[edit["file"]] = text.replace(edit["fixed"], edit["buggy"])
        tested = dict(buggy)
        for rel, text in inst["tests"].items():
            tested[rel] = tested.get(rel, "") + text
        base = _commit(repo, buggy, f"{name} {spec['version']}", None)
        git(repo, "tag", instance_id, base)
        gold = git(repo, "diff", base, _commit(repo, fixed, f"Fix #{inst['number']}", base))
        test_patch = git(repo, "diff", base, _commit(repo, tested, f"Test #{inst['number']}", base))
        f2p = list(inst["FAIL_TO_PASS"])
        collected = _collect({**fixed, **{k: v for k, v in tested.items() if k.startswith("tests/")}})
        missing = set(f2p) - set(collected)
        if missing:
            raise ValueError(f"{instance_id}: FAIL_TO_PASS tests not collected: {sorted(missing)}")
        rows.append({"instance_id": instance_id, "repo": spec["repo"], "base_commit": base,
                     "problem_statement": inst["problem_statement"], "hints_text": inst.get("hints_text", ""),
                     "patch": gold, "test_patch": test_patch, "FAIL_TO_PASS": f2p,
                     "PASS_TO_PASS": [t for t in collected if t not in f2p], "version": str(spec["version"]),
                     "created_at": "2025-01-01T00:00:00Z", "environment_setup_commit": base})
    return rows


def main() -> None:
    (DATA / "repos").mkdir(parents=True, exist_ok=True)
    rows = []
    for project in sorted(p for p in PROJECTS.iterdir() if (p / "instances.yaml").exists()):
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp)
            git(repo, "init", "-q", "-b", "main")
            project_rows = build_project(project, repo)
            owner_name = project_rows[0]["repo"].replace("/", "__")
            bundle = DATA / "repos" / f"{owner_name}.bundle"
            bundle.unlink(missing_ok=True)
            git(repo, "bundle", "create", "-q", str(bundle), "--tags")
            rows += project_rows
    rows.sort(key=lambda r: (r["repo"], int(r["instance_id"].rsplit("-", 1)[1])))
    with open(DATA / "instances.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} instances -> {DATA / 'instances.jsonl'}")


if __name__ == "__main__":
    main()
