"""SWE-bench task instances: the JSONL format, and where each instance's repository comes from.

Owns: ``SWEInstance`` (SWE-bench's fields: instance_id, repo, base_commit, problem_statement, patch,
test_patch, FAIL_TO_PASS, PASS_TO_PASS, hints_text, version), ``load_instances`` / ``dump_instances``
(JSONL; FAIL_TO_PASS / PASS_TO_PASS may be lists or JSON-encoded lists, as in the HF datasets), and
``resolve_repo`` (an instance's ``repo`` to a local git repository or git bundle, never the network).
Does not own: workspaces or grading (envs.swe.workspace).

Repository lookup for ``repo = "owner/name"`` under a ``repos`` directory, first match wins:
``owner__name.bundle``, ``owner__name/``, ``name.bundle``, ``name/``; ``repo`` may also be a path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SWEInstance", "load_instances", "dump_instances", "resolve_repo", "DATA_DIR"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def _tests(value) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else []
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"expected a list of test ids, got {value!r}")
    return list(value)


@dataclass
class SWEInstance:
    instance_id: str
    repo: str
    base_commit: str
    problem_statement: str
    patch: str
    test_patch: str
    FAIL_TO_PASS: list[str]
    PASS_TO_PASS: list[str]
    hints_text: str = ""
    version: str = ""
    extra: dict = field(default_factory=dict)  # any other fields of the row, kept for the round trip

    @classmethod
    def from_row(cls, row: dict) -> SWEInstance:
        required = ("instance_id", "repo", "base_commit", "problem_statement", "patch", "test_patch",
                    "FAIL_TO_PASS", "PASS_TO_PASS")
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"instance {row.get('instance_id', '?')}: missing fields {missing}")
        known = set(required) | {"hints_text", "version"}
        return cls(**{k: row[k] for k in required if k not in ("FAIL_TO_PASS", "PASS_TO_PASS")},
                   FAIL_TO_PASS=_tests(row["FAIL_TO_PASS"]), PASS_TO_PASS=_tests(row["PASS_TO_PASS"]),
                   hints_text=row.get("hints_text") or "", version=str(row.get("version") or ""),
                   extra={k: v for k, v in row.items() if k not in known})

    def to_row(self) -> dict:
        row = asdict(self)
        return {**row.pop("extra"), **row}

    def test_files(self) -> list[str]:
        """Files the test patch touches (``diff --git a/X b/X`` headers)."""
        return [line.split(" b/", 1)[1] for line in self.test_patch.splitlines() if line.startswith("diff --git ")]


def load_instances(path: str | Path) -> list[SWEInstance]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(SWEInstance.from_row(json.loads(line)))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: {e}") from None
    ids = [i.instance_id for i in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate instance ids")
    return out


def dump_instances(instances: list[SWEInstance], path: str | Path) -> None:
    with open(path, "w") as f:
        for inst in instances:
            f.write(json.dumps(inst.to_row()) + "\n")


def resolve_repo(repo: str, repos: str | Path) -> Path:
    """The local git repository or bundle holding ``repo`` (see the module docstring)."""
    if Path(repo).is_absolute() and Path(repo).exists():
        return Path(repo)
    root, name = Path(repos), repo.split("/")[-1]
    for cand in (f"{repo.replace('/', '__')}.bundle", repo.replace("/", "__"), f"{name}.bundle", name):
        if (root / cand).exists():
            return root / cand
    raise FileNotFoundError(f"no repository for {repo!r} under {root} (expected {repo.replace('/', '__')}.bundle "
                            "or a git directory of that name)")
