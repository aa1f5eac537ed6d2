"""The R3 collapse study driver: one shared warm-up, then every variant of recipes/r3_study/ x seeds.

    python benchmarks/r3_study.py                      # profile "hour": 7 variants x 1 seed, tiny-moe, < 1 h
    python benchmarks/r3_study.py --quick              # profile "quick": 8 steps per variant, a few minutes
    python benchmarks/r3_study.py --profile recipe     # the recipes as written: small-moe (hours on 2 CPU cores)
    python benchmarks/r3_study.py --variants grpo grpo_r3 --seeds 0 1 --steps 100 --lr 1e-3
    python benchmarks/r3_study_report.py runs/r3_study # the table and plots again, from the run dirs

Owns: the order of the study (warm up once with the recipes' `warmup` section, into
{out}/../r3_study_warm/{preset}_w{steps}_d{demos}_s{seed}; then `agentrl train` per variant and
seed as a subprocess, from that checkpoint with `warmup: null`), skipping runs that already
finished (summary.json), and calling the report. Does not own: training (agentrl.runtime.train),
collapse detection (agentrl.algo.collapse) or the report (r3_study_report.py).

Profiles. The recipes describe the study on `small-moe`; on 2 CPU cores one small-moe warm-up step
takes ~13 s and one RL step ~10 s, so the recipes as written need hours. The default profile keeps
the recipes' env, rollout and learner sections and swaps in `tiny-moe` with the quickstart's
600-step warm-up (~4 min) and 80 steps per variant (~5 min each at ~3.5 s per sync step), about
45 minutes for the 7 variants here; `--preset/--warmup-steps/--steps` override
any profile.

Seeds change the learner seed and the training task order (env.train_seeds starts at seed x 100000),
so runs of different seeds see different rollouts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "r3_study"
VARIANTS = ("grpo", "grpo_tis", "grpo_r3", "grpo_tis_r3", "gspo", "gspo_r3", "grpo_metropolis")
PROFILES = {  # None = the recipes' value
    "hour": {"preset": "tiny-moe", "warmup_steps": 600, "demos": 2048, "steps": 80},
    "quick": {"preset": "tiny-moe", "warmup_steps": 600, "demos": 2048, "steps": 8},
    "recipe": {"preset": None, "warmup_steps": None, "demos": None, "steps": None},
}


def warm(root: Path, preset: str, warmup_steps: int, demos: int, seed: int) -> Path:
    """The shared warm checkpoint under `root` (made once; reused by every variant, profile and later
    invocation with the same settings)."""
    from agentrl.recipe import load_recipe
    from agentrl.runtime.train import prepare_model

    run = root / f"{preset}_w{warmup_steps}_d{demos}_s{seed}"
    recipe = load_recipe(RECIPES / f"{VARIANTS[0]}.yaml", [f"model.init.preset={preset}", f"model.init.seed={seed}",
                                                            f"warmup.steps={warmup_steps}", f"warmup.demos={demos}",
                                                            f"seed={seed}"])
    return Path(prepare_model(recipe, run))


def train_command(variant: str, seed: int, warm_dir: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "agentrl.cli", "train", str(RECIPES / f"{variant}.yaml"),
            "model.init=null", f"model.path={warm_dir}", "warmup=null", f"name={variant}_s{seed}",
            f"output.dir={out}", f"seed={seed}", f"learner.seed={seed}", f"runtime.steps={steps}",
            f"env.train_seeds=[{seed * 100_000}, 1000000]", *extra]


def run_study(out: Path, variants: list[str], seeds: list[int], steps: int, preset: str, warmup_steps: int,
              demos: int, extra: list[str], fresh: bool = False, warm_root: Path | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    warm_dir = warm(warm_root or out.parent / "r3_study_warm", preset, warmup_steps, demos, seeds[0])
    print(f"warm checkpoint: {warm_dir} ({time.perf_counter() - t0:.0f}s)", flush=True)
    runs = []
    for variant in variants:
        for seed in seeds:
            run = out / f"{variant}_s{seed}"
            runs.append(run)
            if (run / "summary.json").exists() and not fresh:
                print(f"{run.name}: done already (summary.json), skipped", flush=True)
                continue
            if run.exists():
                import shutil

                shutil.rmtree(run)  # a half-finished run: start it again from the warm checkpoint
            run.mkdir(parents=True)
            t1 = time.perf_counter()
            cmd = train_command(variant, seed, warm_dir, out, steps, extra)
            with (run / "train.log").open("w") as log:
                rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"{run.name}: {'ok' if rc == 0 else f'FAILED (rc {rc}, see {run}/train.log)'} "
                  f"in {time.perf_counter() - t1:.0f}s", flush=True)
    print(f"study: {len(runs)} runs in {time.perf_counter() - t0:.0f}s", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="study directory, one sub-directory per run (default: "
                                               "runs/r3_study, runs/r3_study_quick, runs/r3_study_recipe)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="hour", help=f"{PROFILES}")
    p.add_argument("--quick", action="store_true", help="= --profile quick")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the recipes' 60)")
    p.add_argument("--preset", default=None, help="model preset (default: the recipes' small-moe)")
    p.add_argument("--warmup-steps", type=int, default=None, help="shared warm-up steps (default: the recipes')")
    p.add_argument("--demos", type=int, default=None, help="warm-up demonstrations (default: the recipes')")
    p.add_argument("--lr", type=float, default=None, help="learner lr for every variant (default: the recipes')")
    p.add_argument("--warm-root", default=None, help="where shared warm checkpoints live (default: "
                                                     "OUT/../r3_study_warm)")
    p.add_argument("--fresh", action="store_true", help="run again even where summary.json exists")
    p.add_argument("--docs", default="docs", help="where the report's plots go")
    p.add_argument("overrides", nargs="*", help="extra key.sub=value overrides for every run")
    args = p.parse_args(argv)

    from agentrl.recipe import load_recipe

    base = load_recipe(RECIPES / f"{VARIANTS[0]}.yaml")
    defaults = {"preset": base.model.init.preset, "warmup_steps": base.warmup.steps, "demos": base.warmup.demos,
                "steps": base.runtime.steps}
    profile = "quick" if args.quick else args.profile
    defaults.update({k: v for k, v in PROFILES[profile].items() if v is not None})
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    extra = list(args.overrides) + ([f"learner.lr={args.lr}"] if args.lr is not None else [])
    out = Path(args.out or ("runs/r3_study" if profile == "hour" else f"runs/r3_study_{profile}"))
    run_study(out, args.variants, args.seeds, pick["steps"], pick["preset"], pick["warmup_steps"], pick["demos"],
              extra, fresh=args.fresh, warm_root=Path(args.warm_root) if args.warm_root else None)
    sys.path.insert(0, str(Path(__file__).parent))
    from r3_study_report import report

    report(out, Path(args.docs), prefix="r3_study" if profile == "hour" else f"r3_study_{profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
