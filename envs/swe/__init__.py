"""The SWE environment: fix an issue in a sandboxed repository, graded by its tests (SWE-bench format).

    env = SWEEnv()                                     # the shipped task set, envs/swe/data/
    env = SWEEnv(instances="my_swe_gym.jsonl", repos="bundles/")   # your own SWE-bench-style file

Modules: ``env`` (SWEEnv and its tools), ``instances`` (the JSONL format, repository lookup),
``workspace`` (checkouts and grading), ``build_tasks`` (builds the shipped task set from ``projects/``).
"""

from envs.swe.env import SWEEnv
from envs.swe.instances import SWEInstance, dump_instances, load_instances

__all__ = ["SWEEnv", "SWEInstance", "dump_instances", "load_instances"]
