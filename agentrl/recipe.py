"""Typed recipes: one YAML file describes a whole training job.

Owns: the recipe schema (pydantic models, one sub-config per component, every default here and
nowhere else), loading YAML with `a.b.c=value` command-line overrides, readable validation errors
(`RecipeError`, one `path.to.field: message` line per problem), the resolved (fully defaulted)
form that a run saves beside its outputs, and the run directory.
Does not own: building anything from a recipe (the runtime does that) or checking that files,
servers or clusters named in it exist: a recipe for a GPU cluster validates on a laptop.

    recipe = load_recipe("recipes/quickstart.yaml", ["learner.lr=1e-4", "runtime.mode=sync"])
    recipe.learner.to_learner_config()        # -> agentrl.learner.learner.LearnerConfig
    print(dump_yaml(recipe))                  # every field, defaults filled in

`LearnerSpec` is generated from the fields of `LearnerConfig` (same names, types and defaults,
plus `backend`), so the two cannot drift; the learner's free-form string options (`agg`,
`correction`) are narrowed to the values the algorithms accept.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from agentrl.algo.corrections import CORRECTIONS
from agentrl.algo.losses import AGG_MODES
from agentrl.learner.learner import LearnerConfig
from agentrl.model.config import PRESETS, MoEConfig, preset

__all__ = [
    "Recipe", "ModelSpec", "InitSpec", "EnvSpec", "WarmupSpec", "EngineSpec", "RolloutSpec", "LearnerSpec",
    "RuntimeSpec", "OutputSpec", "EvalSpec", "RecipeError", "load_recipe", "parse_recipe", "apply_override",
    "dump_yaml", "run_dir",
]


class RecipeError(ValueError):
    """A recipe that cannot be loaded; `problems` holds one `path.to.field: message` per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        n = len(problems)
        super().__init__(f"invalid recipe {source} ({n} problem{'s' * (n != 1)}):\n"
                         + "\n".join(f"  {p}" for p in problems))


def _problem(field: str, msg: str) -> PydanticCustomError:
    """An error about `field` (dotted, relative to the model raising it), reported at its path."""
    return PydanticCustomError("recipe_field", "{field}: {msg}", {"field": field, "msg": msg})


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------- model
class InitSpec(_Spec):
    """A fresh model built from a named preset (no checkpoint needed)."""

    preset: Literal[tuple(PRESETS)] = Field(description="architecture preset (agentrl.model.config.PRESETS)")
    seed: int = Field(0, description="seed of the random weight initialisation")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="MoEConfig fields changed from the preset, e.g. {num_experts: 16}")

    @model_validator(mode="after")
    def _check_overrides(self) -> InitSpec:
        known = {f.name for f in dataclasses.fields(MoEConfig)}
        for key in self.overrides:
            if key not in known:
                raise _problem(f"overrides.{key}", "not a MoEConfig field" + _suggest(key, known))
        try:
            preset(self.preset, **self.overrides)
        except (TypeError, ValueError) as e:
            raise _problem("overrides", str(e)) from None
        return self


class ModelSpec(_Spec):
    """The policy: an existing checkpoint (`path`) or a fresh preset (`init`), exactly one."""

    path: str | None = Field(None, description="HF-layout checkpoint directory (config.json, model.safetensors, "
                                               "tokenizer), read by the learner and the engines")
    init: InitSpec | None = Field(None, description="build a fresh model from a preset instead of loading one")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        if (self.path is None) == (self.init is None):
            raise ValueError("give exactly one of model.path (a checkpoint) or model.init (a preset)")
        return self


# ------------------------------------------------------------------------------------------ env
class EnvSpec(_Spec):
    """The environment episodes are played in."""

    id: str = Field(min_length=1, description="registered env id ('calculator-v0') or 'module.path:ClassName'")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the env constructor")
    train_seeds: tuple[int, int] = Field((0, 1_000_000),
                                         description="[low, high): range training task seeds are drawn from")
    eval_seeds: tuple[int, int] = Field((10_000_000, 10_000_064),
                                        description="[low, high): evaluation task seeds (one episode each)")

    @model_validator(mode="after")
    def _ranges(self) -> EnvSpec:
        for name in ("train_seeds", "eval_seeds"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi:
                raise _problem(name, f"need 0 <= low < high, got [{lo}, {hi})")
        (a, b), (c, d) = self.train_seeds, self.eval_seeds
        if a < d and c < b:
            raise _problem("eval_seeds", f"[{c}, {d}) overlaps train_seeds [{a}, {b}): evaluation would "
                                         "score training tasks")
        return self


class WarmupSpec(_Spec):
    """Supervised warm-up on the env's scripted demonstrations, before RL (agentrl.sft)."""

    steps: int = Field(ge=0, description="optimizer steps of supervised warm-up")
    demos: int = Field(2048, ge=1, description="number of scripted demonstration episodes to train on")
    batch_size: int = Field(32, ge=1, description="demonstrations per optimizer step")
    lr: float = Field(3e-3, gt=0, description="warm-up learning rate (the peak, on a schedule)")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="learning-rate schedule: constant, or a cosine / linear decay to 0 at the last step")
    warmup_steps: int = Field(0, ge=0, description="steps of linear learning-rate warm-up before the schedule")
    grad_clip: float = Field(0.0, ge=0, description="max global gradient norm (0 = no clipping)")


# --------------------------------------------------------------------------------------- engine
class EngineSpec(_Spec):
    """The inference engines that generate rollouts (they record each token's MoE routing)."""

    backend: Literal["embedded", "sglang", "http"] = Field(
        "embedded", description="embedded: agentrl's in-process engine; sglang: launch sglang.launch_server; "
                                "http: an already running server at `url` (agentrl serve or SGLang)")
    dtype: Literal["bfloat16", "float32", "float16"] = Field("bfloat16", description="engine weight dtype")
    num_engines: int = Field(1, ge=1, description="engine replicas (data parallel); requests are spread over them")
    max_total_tokens: int = Field(65536, ge=1, description="KV-cache capacity in tokens per engine (embedded; "
                                                           "for sglang pass --max-total-tokens in sglang_args)")
    chunk_size: int = Field(512, ge=1, description="chunked-prefill chunk in tokens (embedded)")
    url: str | None = Field(None, description="server base URL; required iff backend is 'http'")
    sglang_python: str = Field("python", description="python interpreter of the SGLang environment (sglang pins "
                                                     "its own torch, so it usually lives in its own venv)")
    sglang_args: list[str] = Field(default_factory=list,
                                   description="extra sglang.launch_server flags, passed through verbatim")
    num_gpus_per_engine: float = Field(0, ge=0, description="GPUs Ray reserves for each engine actor (backend "
                                                            "sglang: its server runs on them; 0 on CPU)")

    @field_validator("sglang_args", mode="before")
    @classmethod
    def _flags_as_text(cls, v: Any) -> Any:
        # `engine.sglang_args=[--tp,8]` parses 8 as an int; flags are text
        if isinstance(v, list):
            return [str(x).lower() if isinstance(x, bool) else str(x) if isinstance(x, int | float) else x for x in v]
        return v

    @model_validator(mode="after")
    def _url(self) -> EngineSpec:
        if self.backend == "http" and not self.url:
            raise _problem("url", "required when backend is 'http'")
        if self.backend != "http" and self.url is not None:
            raise _problem("url", f"only used with backend 'http' (backend is {self.backend!r})")
        if self.backend != "sglang" and self.num_gpus_per_engine > 0:
            raise _problem("num_gpus_per_engine", f"only used with backend 'sglang' (the runtime's embedded engine "
                                                  f"runs on the CPU; an 'http' server brings its own GPUs)")
        tp = _flag_value(self.sglang_args, "--tp-size", "--tensor-parallel-size")  # SGLang's flag and its alias
        if self.backend == "sglang" and tp and tp.isdigit() and self.num_gpus_per_engine < int(tp):
            raise _problem("num_gpus_per_engine", f"is {self.num_gpus_per_engine:g}, but sglang_args ask for "
                                                  f"--tp-size {tp}: Ray must reserve at least {tp} GPUs per engine")
        return self


def _flag_value(args: list[str], *names: str) -> str | None:
    """The value of the last of `names` in a flag list (`--tp-size 4` or `--tp-size=4`), else None."""
    value = None
    for i, a in enumerate(args):
        flag, eq, inline = a.partition("=")
        if flag in names:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


# -------------------------------------------------------------------------------------- rollout
class RolloutSpec(_Spec):
    """How episodes are sampled: GRPO groups, sampling parameters, concurrency."""

    prompts_per_step: int = Field(8, ge=1, description="distinct tasks per training step")
    group_size: int = Field(8, ge=1, description="episodes per task (a GRPO group shares the prompt)")
    max_new_tokens: int = Field(64, ge=1, description="tokens sampled per assistant turn at most")
    temperature: float = Field(1.0, ge=0, description="sampling temperature for training rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold")
    max_total_tokens: int = Field(2048, ge=1, description="tokens per episode at most (prompt, turns, tool output); "
                                                          "longer episodes end as truncated")
    concurrency: int = Field(64, ge=1, description="episodes in flight at once")
    workers: int = Field(1, ge=1, description="rollout worker processes (each runs `concurrency / workers`)")
    simulated_tool_latency: float = Field(0.0, ge=0, description="seconds added to every env step (to "
                                                                 "benchmark async against sync)")


# -------------------------------------------------------------------------------------- learner
_LEARNER_DOCS: dict[str, str] = {
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW (beta1, beta2)",
    "grad_clip": "max global gradient norm (0 = no clipping)",
    "lr_schedule": "learning-rate schedule after warm-up",
    "warmup_steps": "optimizer steps of linear LR warm-up",
    "total_steps": "optimizer steps the cosine / linear schedule decays over",
    "mini_batches": "optimizer steps per rollout batch, over disjoint shuffled parts (the R3 paper's multi "
                    "mini-step setting)",
    "fuse_old_pass": "with one optimizer step on one micro-batch, take the old-policy log-probs from the "
                     "training forward (detached) instead of a separate no-grad pass: same result, one forward less",
    "skip_zero_advantage": "with fuse_old_pass: samples whose advantage is exactly 0 (all rewards of the group "
                           "equal) get a forward without autograd and no backward when no entropy, aux or KL "
                           "term is on (they take no gradient): same update and metrics, less compute",
    "micro_batch_tokens": "tokens per forward pass; gradients accumulate over micro-batches",
    "layout": "packed: sequences concatenated in rows (agentrl's model); padded: one sequence per row",
    "pack_row_tokens": "packed row width in tokens; null = the longest sequence (times share_prefix_row_factor "
                       "when prefixes are shared)",
    "share_prefix": "packed layout: compute the common prefix of a group's samples (its prompt) once per row; "
                    "same log-probs and gradients, fewer tokens (off under the megatron-core backend)",
    "share_prefix_row_factor": "with shared prefixes and pack_row_tokens null, rows may be this many times the "
                               "longest sequence wide (a prefix + several suffixes; attention is O(width^2))",
    "share_prefix_row_cap": "... but at most this many tokens wide (or the longest sequence, if longer): every "
                            "token attends over its whole row, so wide rows only pay for short suffixes",
    "dtype": "learner compute dtype (bfloat16 = autocast with fp32 master weights)",
    "replay": "routing replay: off (free routing), R2 (replay the learner's own old-policy routing), R3 "
              "(replay the engine's routing rows)",
    "advantage": "advantage estimator over each group's rewards",
    "loss": "policy loss: PPO clip (per token) or GSPO (per sequence)",
    "clip_low": "PPO ratio clip below 1 - clip_low",
    "clip_high": "PPO ratio clip above 1 + clip_high (clip-higher, DAPO)",
    "dual_clip": "dual-clip bound for negative advantages (null = off)",
    "gspo_clip_low": "GSPO sequence-ratio clip below",
    "gspo_clip_high": "GSPO sequence-ratio clip above",
    "agg": "how per-token losses reduce to a scalar (agentrl.algo.losses.AGG_MODES)",
    "agg_constant": "normaliser for agg 'token-sum-norm' (Dr. GRPO), e.g. batch size x max generation length",
    "correction": "off-policy correction from rho = pi_old / pi_infer (agentrl.algo.corrections.CORRECTIONS)",
    "correction_kwargs": "keyword arguments of the correction, e.g. {cap: 2.0}",
    "kl_coef": "KL penalty to a reference model (> 0 needs one)",
    "entropy_coef": "entropy bonus coefficient",
    "aux_loss_coef": "MoE load-balancing loss coefficient (on the replayed assignment)",
    "ema_decay": "Polyak averaging of the policy weights (null = off)",
    "publish": "which weights go to the engines: the policy or its EMA",
    "device": "where the learner trains: cpu, cuda, cuda:N (batches, losses and metrics stay on the host); the "
              "runtime reserves one GPU for a cuda learner (either backend) and trains on the GPU Ray assigns",
    "seed": "learner seed (mini-batch shuffling)",
}
_LEARNER_TYPES: dict[str, Any] = {"agg": Literal[AGG_MODES], "correction": Literal[CORRECTIONS]}
_LEARNER_BOUNDS: dict[str, dict[str, float]] = {
    "lr": {"gt": 0}, "weight_decay": {"ge": 0}, "grad_clip": {"ge": 0}, "warmup_steps": {"ge": 0},
    "total_steps": {"ge": 1}, "mini_batches": {"ge": 1}, "micro_batch_tokens": {"ge": 1},
    "pack_row_tokens": {"ge": 1}, "share_prefix_row_factor": {"ge": 1}, "share_prefix_row_cap": {"ge": 1},
    "clip_low": {"ge": 0}, "clip_high": {"ge": 0}, "dual_clip": {"gt": 1},
    "gspo_clip_low": {"ge": 0}, "gspo_clip_high": {"ge": 0}, "agg_constant": {"gt": 0}, "kl_coef": {"ge": 0},
    "aux_loss_coef": {"ge": 0}, "ema_decay": {"ge": 0, "lt": 1},
}


def _learner_fields() -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(LearnerConfig)]
    missing, stale = set(names) - set(_LEARNER_DOCS), set(_LEARNER_DOCS) - set(names)
    if missing or stale:
        raise RuntimeError(f"agentrl.recipe._LEARNER_DOCS is out of date with LearnerConfig: "
                           f"describe {sorted(missing)}, remove {sorted(stale)}")
    hints = typing.get_type_hints(LearnerConfig)
    out = {}
    for f in dataclasses.fields(LearnerConfig):
        kw: dict[str, Any] = {"description": _LEARNER_DOCS[f.name], **_LEARNER_BOUNDS.get(f.name, {})}
        if f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        elif f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        out[f.name] = (_LEARNER_TYPES.get(f.name, hints[f.name]), Field(**kw))
    return out


class _LearnerSpecBase(_Spec):
    backend: Literal["torch", "megatron"] = Field("torch", description="learner implementation")

    @model_validator(mode="after")
    def _consistent(self) -> _LearnerSpecBase:
        if self.agg == "token-sum-norm" and self.agg_constant is None:
            raise _problem("agg_constant", "required when agg is 'token-sum-norm'")
        if self.publish == "ema" and self.ema_decay is None:
            raise _problem("ema_decay", "required when publish is 'ema'")
        if self.backend == "megatron" and self.dtype == "bfloat16" and not self.device.startswith("cuda"):
            raise _problem("device", "the megatron backend trains in bfloat16 only on a GPU: set learner.device: "
                                     "cuda (or learner.dtype: float32 on CPU)")
        return self

    def to_learner_config(self) -> LearnerConfig:
        """The learner's own config (every field but `backend`)."""
        return LearnerConfig(**{f.name: copy.deepcopy(getattr(self, f.name))
                                for f in dataclasses.fields(LearnerConfig)})


LearnerSpec = create_model(
    "LearnerSpec", __base__=_LearnerSpecBase, __module__=__name__,
    __doc__="The learner: `backend` plus exactly the fields of agentrl.learner.learner.LearnerConfig.",
    **_learner_fields())


# -------------------------------------------------------------------------------------- runtime
class RuntimeSpec(_Spec):
    """The training loop: async or sync, off-policyness, checkpoints, the Ray cluster."""

    mode: Literal["async", "sync"] = Field("async", description="async: rollouts overlap training; sync: "
                                                                "generate, then train, in turn")
    steps: int = Field(ge=1, description="training steps (one rollout batch each)")
    max_staleness: int = Field(1, ge=0, description="a batch may hold trajectories whose oldest generated-token "
                                                    "version is >= learner version - max_staleness")
    stale_policy: Literal["drop", "wait"] = Field("drop", description="too-stale trajectories: drop them, or make "
                                                                      "rollout wait so none become stale")
    in_flight: Literal["continue", "abort"] = Field("continue", description="requests running during a weight "
                                                    "update: continue with new weights (per-token versions) or abort")
    checkpoint_every: int = Field(50, ge=0, description="save a checkpoint every N steps (0 = only at the end)")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0 = never; > 0 needs an eval section)")
    address: str | None = Field(None, description="Ray cluster address ('auto' = the running cluster); null = "
                                                  "RAY_ADDRESS or start a local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance (null = all)")
    max_restarts: int = Field(3, ge=0, description="restarts of a failed rollout / engine actor before giving up")


class OutputSpec(_Spec):
    """Where results go and what the user sees."""

    dir: str = Field("runs", description="parent directory; the run writes to {dir}/{name}")
    tensorboard: bool = Field(True, description="write TensorBoard scalars to {run}/tensorboard")
    plots: bool = Field(True, description="write PNG plots to {run}/plots at the end")
    console: Literal["table", "quiet"] = Field("table", description="per-step metric table on stdout, or nothing")


class EvalSpec(_Spec):
    """Evaluation: on env.eval_seeds, or on the first `episodes` tasks of an env with a finite task set."""

    policy: Literal["model", "gold", "noop"] = Field("model", description="model: the current weights; gold: the "
                                                     "env's scripted solution; noop: answer nothing (reward floor)")
    episodes: int = Field(64, ge=1, description="evaluation episodes (seeds from env.eval_seeds)")
    samples: int = Field(1, ge=1, description="samples per evaluation task (pass@k style)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0 = greedy)")
    base_url: str | None = Field(None, description="evaluate against this server instead of the run's engines")
    api: Literal["sglang", "openai"] = Field("sglang", description="the server's API: sglang = native /generate "
                                             "(agentrl serve, SGLang; token-level episodes); openai = any "
                                             "OpenAI-compatible /v1/chat/completions endpoint (message-level)")
    model_name: str | None = Field(None, description="`model` field sent to an OpenAI-compatible endpoint")


# --------------------------------------------------------------------------------------- recipe
class Recipe(_Spec):
    """A training job. Load with `load_recipe`; `resolved()` is the fully defaulted form."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name; outputs go to "
                                                                            "{output.dir}/{name}")
    seed: int = Field(0, description="seed for task sampling and everything not seeded in its own section")
    model: ModelSpec = Field(description="the policy model")
    env: EnvSpec = Field(description="the environment")
    warmup: WarmupSpec | None = Field(None, description="supervised warm-up before RL (null = none)")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="inference engines")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="episode sampling")
    learner: LearnerSpec = Field(default_factory=LearnerSpec, description="the RL update")
    runtime: RuntimeSpec = Field(description="the training loop")
    output: OutputSpec = Field(default_factory=OutputSpec, description="outputs and console")
    eval: EvalSpec | None = Field(None, description="evaluation (null = none)")

    @model_validator(mode="after")
    def _across_sections(self) -> Recipe:
        if self.runtime.eval_every > 0 and self.eval is None:
            raise _problem("runtime.eval_every", "> 0 needs an `eval:` section")
        if self.rollout.max_new_tokens > self.rollout.max_total_tokens:
            raise _problem("rollout.max_new_tokens", f"{self.rollout.max_new_tokens} exceeds "
                                                     f"rollout.max_total_tokens {self.rollout.max_total_tokens}")
        episode, kv = self.rollout.max_total_tokens, self.engine.max_total_tokens
        if self.engine.backend == "embedded" and episode > kv:
            raise _problem("rollout.max_total_tokens", f"{episode} exceeds the engine's KV capacity "
                                                       f"engine.max_total_tokens {kv}")
        return self

    def resolved(self) -> dict[str, Any]:
        """Every field, defaults filled in, as JSON-able data (tuples become lists)."""
        return self.model_dump(mode="json")


# -------------------------------------------------------------------------------------- loading
def _section(annotation: Any) -> type[BaseModel] | None:
    """The model class inside `annotation` (`X` or `X | None`), if any."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    for a in (annotation, *args):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _is_mapping(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


def _suggest(key: str, valid: Any) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override to raw recipe data in place.

    The value is parsed as YAML (`1e-4`, `sync`, `[--tp, 8]`, `{hops: 2}`, `null`). Every key must
    exist in the schema, except inside dict-typed fields (`env.kwargs.hops=2` creates `hops`).
    Missing sections are created (`warmup.steps=100` adds a warm-up section with its defaults).
    """
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise RecipeError("override", [f"{override!r}: expected key.path=value"])
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise RecipeError("override", [f"{key}: value {raw!r} is not valid YAML: {e}"]) from None
    model: type[BaseModel] | None = Recipe  # None inside a dict-typed field: any key goes
    node = data
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if model is not None:
            if part not in model.model_fields:
                where = ".".join(parts[:i]) or "the recipe"
                raise RecipeError("override", [f"{path}: unknown key {part!r} in {where}"
                                               + _suggest(part, model.model_fields)])
            annotation = model.model_fields[part].annotation
            sub = _section(annotation)
            if not last and sub is None and not _is_mapping(annotation):
                raise RecipeError("override", [f"{path}: is a value, not a section (cannot set {key})"])
            model = sub
        if last:
            node[part] = value
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise RecipeError("override", [f"{path}: is {child!r} in the recipe, not a mapping (cannot set {key})"])
        node = child


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None or part not in model.model_fields:
            return None
        model = _section(model.model_fields[part].annotation)
    return model


def _problems(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        msg = e["msg"]
        if e["type"] == "recipe_field":
            loc, msg = loc + e["ctx"]["field"].split("."), e["ctx"]["msg"]
        elif e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"][:-1])
            msg = "unknown key" + (_suggest(loc[-1], parent.model_fields) if parent else "")
        elif e["type"] == "missing":
            msg = "required (no default)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        out.append(f"{'.'.join(loc) or '(recipe)'}: {msg}")
    return out


def parse_recipe(data: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "<dict>") -> Recipe:
    """Validate raw recipe data (after applying `overrides`); raises `RecipeError`."""
    data = copy.deepcopy(dict(data))
    for o in overrides:
        try:
            apply_override(data, o)
        except RecipeError as e:
            raise RecipeError(source, e.problems) from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(source, _problems(e)) from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b.c=value` overrides in order, validate; raises `RecipeError`."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [f"(yaml): {e}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"(recipe): expected a mapping at the top level, got {type(data).__name__}"])
    return parse_recipe(data, overrides, source=str(path))


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (`sglang_args: [--tp-size, '4']`)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (loads back to an equal recipe)."""
    return yaml.dump(recipe.resolved(), Dumper=_Dumper, sort_keys=False, width=120)


def run_dir(recipe: Recipe) -> Path:
    """Where a run writes: `{output.dir}/{name}`."""
    return Path(recipe.output.dir) / recipe.name
