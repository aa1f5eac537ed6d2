"""The `agentrl` command. Each subcommand parses its flags and calls one library function.

    agentrl init-model --preset tiny-moe --out DIR     a random checkpoint in HF layout (+ tokenizer)
    agentrl demo [--out runs/demo]                       foundation demo: rows, wire format, R3 replay
    agentrl serve --model DIR --port P                   the embedded engine behind SGLang's HTTP API
    agentrl train RECIPE [key.sub=value ...] [--resume]  the RL run a recipe describes (Ray, async or sync)
    agentrl eval RECIPE [--policy model|gold|noop] [--base-url URL [--api sglang|openai]]
    agentrl bench mismatch [--quick] [--out results.json] training-inference mismatch: dense / MoE / MoE+R3
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from agentrl.model.config import PRESETS


def _init_model(args: argparse.Namespace) -> int:
    from agentrl.model import load_pretrained
    from agentrl.model.checkpoint import init_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    out = init_model(args.preset, args.out, seed=args.seed, dtype=dtype, **overrides)
    model = load_pretrained(out)
    print(json.dumps({
        "out": str(out), "preset": args.preset, "params": model.num_parameters(),
        "active_params": model.num_parameters(active=True), "moe_layers": list(model.config.moe_layers),
        "experts": model.config.num_experts, "top_k": model.config.num_experts_per_tok,
    }))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from agentrl.demo import format_table, run_demo

    results = run_demo(args.out, seed=args.seed, samples=args.samples, new_tokens=args.new_tokens,
                       warmup_steps=args.warmup_steps)
    print(format_table(results))
    print(f"wrote {args.out}/demo.json")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from agentrl.engine.engine import Engine
    from agentrl.engine.server import serve

    engine = Engine.from_pretrained(args.model, dtype=args.dtype, max_total_tokens=args.max_total_tokens,
                                    chunk_size=args.chunk_size, max_running=args.max_running,
                                    capture_routing=not args.no_routing)
    print(f"agentrl serve: {args.model} on http://{args.host}:{args.port} (dtype {args.dtype}, "
          f"{args.max_total_tokens} KV slots, routing rows {'off' if args.no_routing else 'on'})", flush=True)
    serve(engine, host=args.host, port=args.port)
    return 0


def _load(args: argparse.Namespace):
    from agentrl.recipe import RecipeError, load_recipe

    try:
        return load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"agentrl: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _ray_auth_for(address: str | None) -> None:
    """Clusters from `ray start` use token auth by default (Ray >= 2.59), but a driver joining one by
    address sends no token unless RAY_AUTH_MODE=token (a token-mode driver joins clusters without auth
    too). Ray reads the mode when it is imported, so this runs before `import ray`."""
    import os
    from pathlib import Path

    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (
        Path.home() / ".ray" / "auth_token").exists()
    if address and "RAY_AUTH_MODE" not in os.environ and has_token and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"


def _train(args: argparse.Namespace) -> int:
    import os

    recipe = _load(args)
    if args.address:
        recipe.runtime.address = args.address
    _ray_auth_for(recipe.runtime.address or os.environ.get("RAY_ADDRESS"))
    from agentrl.runtime.train import train

    summary = train(recipe, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "trained_groups"}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from agentrl.evaluate import evaluate

    summary = evaluate(_load(args), policy=args.policy, base_url=args.base_url, model_dir=args.model, api=args.api)
    print(json.dumps(summary, indent=2))
    return 0


def _bench_mismatch(args: argparse.Namespace) -> int:
    from agentrl.bench.mismatch import main

    main(quick=args.quick, out=args.out, plot=args.plot, moe_preset=args.moe_preset, dense_preset=args.dense_preset,
         warmup_steps=args.warmup_steps, demos=args.demos, episodes=args.episodes, max_new_tokens=args.max_new_tokens,
         engine_dtype=args.engine_dtype, seed=args.seed, out_dir=args.out_dir, sglang=args.sglang or None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentrl", description="Asynchronous RL for LLM agents, MoE-first (R3).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("init-model", help="write a randomly initialised checkpoint (HF layout + tokenizer)",
                       description="Write a randomly initialised checkpoint that transformers and SGLang load.")
    q.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model size / router variant")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--seed", type=int, default=0, help="weight-init seed")
    q.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="storage dtype")
    q.add_argument("--vocab-size", type=int, default=None, help="tokenizer/model vocabulary (300..4096)")
    q.set_defaults(func=_init_model)

    d = sub.add_parser("demo", help="foundation demo: bf16 'engine' rows -> wire -> fp32 learner replay",
                       description="Init tiny MoE + dense models, warm them up, sample in bf16, score in fp32 "
                                   "with and without routing replay, print the mismatch table.")
    d.add_argument("--out", default="runs/demo", help="output directory")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--samples", type=int, default=32, help="sampled sequences")
    d.add_argument("--new-tokens", type=int, default=16, help="tokens sampled per sequence")
    d.add_argument("--warmup-steps", type=int, default=80, help="next-token training steps before sampling")
    d.set_defaults(func=_demo)

    v = sub.add_parser("serve", help="serve a checkpoint with the embedded engine (SGLang wire API)",
                       description="POST /generate (return_routed_experts, routed_experts_start_len, logprobs), "
                                   "GET /health, /get_model_info, /get_server_info, POST /flush_cache, "
                                   "/update_weights_from_disk, /abort_request.")
    v.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=30000)
    v.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    v.add_argument("--max-total-tokens", type=int, default=65536, help="KV pool size in tokens")
    v.add_argument("--chunk-size", type=int, default=512, help="prefill tokens per step")
    v.add_argument("--max-running", type=int, default=256, help="requests decoding at once")
    v.add_argument("--no-routing", action="store_true", help="do not capture routing rows")
    v.set_defaults(func=_serve)

    t = sub.add_parser("train", help="run the RL job a recipe describes",
                       description="Train with the recipe (YAML). Overrides: key.sub=value, e.g. learner.lr=1e-4 "
                                   "runtime.mode=sync. Writes runs/<name>/ (config, metrics.jsonl, TensorBoard, "
                                   "checkpoints, plots).")
    t.add_argument("recipe", help="recipe YAML (recipes/quickstart.yaml)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a local one)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a policy on the recipe's held-out tasks",
                       description="Episodes on env.eval_seeds (or each task of a finite task set); per-episode records, "
                       "artifacts and a summary in runs/<name>/eval/.")
    e.add_argument("recipe")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    e.add_argument("--policy", choices=["model", "gold", "noop"], default=None, help="default: the recipe's eval.policy")
    e.add_argument("--base-url", default=None, help="an SGLang-compatible server (agentrl serve, SGLang) instead of "
                                                   "the embedded engine")
    e.add_argument("--api", choices=["sglang", "openai"], default=None,
                   help="API of --base-url: sglang = native /generate (default), openai = /v1/chat/completions")
    e.add_argument("--model", default=None, help="checkpoint to evaluate (default: the run's latest)")
    e.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="benchmarks on the real engine and learner")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    m = bsub.add_parser("mismatch", help="training-inference mismatch: dense vs MoE vs MoE+R3 (agentrl.bench.mismatch)",
                        description="Warm up a MoE and a dense model, play held-out episodes on the bf16 embedded "
                                    "engine, score them with the fp32 learner (free routing, R3 replay, dense); "
                                    "print the table, write results.json and a CDF plot of max(r, 1/r).")
    m.add_argument("--quick", action="store_true", help="tiny presets, short warm-up (about a minute)")
    m.add_argument("--out", default=None, help="results JSON (default: OUT_DIR/results.json)")
    m.add_argument("--plot", default=None, help="CDF plot PNG (default: OUT_DIR/ratio_cdf.png)")
    m.add_argument("--out-dir", default=None, help="checkpoints and outputs (default: runs/bench_mismatch)")
    m.add_argument("--moe-preset", choices=sorted(PRESETS), default=None)
    m.add_argument("--dense-preset", choices=sorted(PRESETS), default=None)
    m.add_argument("--warmup-steps", type=int, default=None)
    m.add_argument("--demos", type=int, default=None, help="demonstration episodes for warm-up")
    m.add_argument("--episodes", type=int, default=None, help="held-out episodes each engine plays")
    m.add_argument("--max-new-tokens", type=int, default=None, help="tokens per assistant turn")
    m.add_argument("--engine-dtype", choices=["bfloat16", "float32", "float16"], default=None)
    m.add_argument("--seed", type=int, default=None)
    m.add_argument("--sglang", action="store_true", help="also the real SGLang server on CPU (if its venv exists)")
    m.set_defaults(func=_bench_mismatch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
