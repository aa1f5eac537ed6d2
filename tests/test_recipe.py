"""Recipes: every shipped YAML validates; bad keys and values are errors that name their path;
overrides; LearnerSpec mirrors LearnerConfig; the resolved form round-trips."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from agentrl.learner.learner import LearnerConfig
from agentrl.recipe import LearnerSpec, Recipe, RecipeError, dump_yaml, load_recipe, parse_recipe, run_dir

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
MINIMAL = {"name": "t", "model": {"init": {"preset": "tiny-moe"}}, "env": {"id": "calculator-v0"},
           "runtime": {"steps": 3}}


def problems(data=None, overrides=()):
    with pytest.raises(RecipeError) as info:
        parse_recipe(MINIMAL if data is None else data, overrides)
    return info.value.problems, str(info.value)


def test_recipes_are_found():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "qwen3_30b_a3b_r3.yaml", "qwen3_30b_a3b_r3_multinode.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe.learner.to_learner_config(), LearnerConfig)
    assert run_dir(recipe) == Path(recipe.output.dir) / recipe.name


def test_quickstart_is_what_the_readme_promises():
    """Invariants, not values: a from-scratch MoE, warm-up then async RL with R3 and evaluation."""
    r = load_recipe(QUICKSTART)
    assert r.name == "quickstart" and r.model.init is not None and r.model.path is None
    assert r.model.init.preset in ("tiny-moe", "tiny-moe-sigmoid") and r.warmup is not None
    assert r.learner.replay == "R3" and r.runtime.mode == "async" and r.engine.backend == "embedded"
    assert r.engine.dtype != "float32"  # a real training-inference precision gap for R3 to remove
    assert r.eval is not None and r.runtime.eval_every > 0 and r.eval.temperature == 0.0
    assert r.env.kwargs.get("compact") is True


def test_gpu_recipes():
    one = load_recipe(QUICKSTART.with_name("qwen3_30b_a3b_r3.yaml"))
    assert one.engine.backend == "sglang" and one.learner.backend == "megatron"
    assert one.engine.sglang_args == ["--tp-size", "4", "--mem-fraction-static", "0.7", "--dtype", "bfloat16"]
    assert (one.learner.correction, one.learner.mini_batches, one.learner.lr) == ("tis", 4, 1e-6)
    multi = load_recipe(QUICKSTART.with_name("qwen3_30b_a3b_r3_multinode.yaml"))
    assert (multi.engine.num_engines, multi.runtime.address) == (4, "auto")
    assert one.learner.device == multi.learner.device == "cuda"  # the runtime reserves the learner a GPU


def test_engine_gpus_match_the_backend_and_sglang_tensor_parallelism():
    sglang = {"backend": "sglang", "sglang_args": ["--tp-size", "4"]}
    for engine, fragment in [({"num_gpus_per_engine": 1}, "only used with backend 'sglang'"),
                             ({**sglang, "num_gpus_per_engine": 2}, "--tp-size 4"),
                             ({**sglang, "sglang_args": ["--tensor-parallel-size=2"]}, "--tp-size 2")]:
        probs, _ = problems({**MINIMAL, "engine": engine})
        assert any(p.startswith("engine.num_gpus_per_engine:") and fragment in p for p in probs), probs
    assert parse_recipe({**MINIMAL, "engine": {**sglang, "num_gpus_per_engine": 4}}).engine.num_gpus_per_engine == 4


def test_megatron_bf16_needs_a_gpu_learner():
    probs, _ = problems({**MINIMAL, "learner": {"backend": "megatron", "dtype": "bfloat16"}})
    assert any(p.startswith("learner.device:") and "only on a GPU" in p for p in probs), probs
    parse_recipe({**MINIMAL, "learner": {"backend": "megatron", "dtype": "bfloat16", "device": "cuda"}})
    parse_recipe({**MINIMAL, "learner": {"backend": "torch", "dtype": "bfloat16"}})  # torch autocasts on CPU


@pytest.mark.parametrize("data, path", [
    ({**MINIMAL, "lerner": {}}, "lerner"),
    ({**MINIMAL, "learner": {"lrr": 1e-4}}, "learner.lrr"),
    ({**MINIMAL, "model": {"init": {"preset": "tiny-moe", "sed": 1}}}, "model.init.sed"),
])
def test_unknown_keys_are_named(data, path):
    probs, text = problems(data)
    assert any(p.startswith(f"{path}: unknown key") for p in probs), probs
    assert path in text


def test_unknown_key_suggests_the_close_one():
    probs, _ = problems({**MINIMAL, "learner": {"lrr": 1e-4}})
    assert "did you mean 'lr'" in probs[0]


@pytest.mark.parametrize("overrides, path", [
    (["runtime.steps=-1"], "runtime.steps"),
    (["learner.replay=R4"], "learner.replay"),
    (["learner.correction=magic"], "learner.correction"),
    (["learner.agg=token-median"], "learner.agg"),
    (["learner.lr=0"], "learner.lr"),
    (["model.init.preset=huge-moe"], "model.init.preset"),
    (["model.init.overrides={num_expertz: 4}"], "model.init.overrides.num_expertz"),
    (["engine.backend=http"], "engine.url"),
    (["engine.url=http://x:1"], "engine.url"),
    (["model.path=/ckpt"], "model"),
    (["model.init=null"], "model"),
    (["learner.agg=token-sum-norm"], "learner.agg_constant"),
    (["runtime.eval_every=5"], "runtime.eval_every"),
    (["env.eval_seeds=[10,20]"], "env.eval_seeds"),
    (["env.train_seeds=[5,5]"], "env.train_seeds"),
    (["rollout.max_new_tokens=4096"], "rollout.max_new_tokens"),
    (["name=a/b"], "name"),
])
def test_bad_values_are_named(overrides, path):
    probs, _ = problems(overrides=overrides)
    assert any(p.startswith(f"{path}: ") for p in probs), probs


def test_all_problems_reported_at_once():
    probs, text = problems(overrides=["runtime.steps=0", "learner.replay=R4", "rollout.group_size=0"])
    assert len(probs) == 3 and text.count("\n") == 3
    assert "runtime" in probs[-1] or "runtime" in text


def test_missing_required_sections():
    probs, _ = problems({"name": "t"})
    assert {p.split(":")[0] for p in probs} == {"model", "env", "runtime"}


def test_overrides_apply(tmp_path):
    base = load_recipe(QUICKSTART)
    r = load_recipe(QUICKSTART, ["learner.lr=1e-4", "runtime.mode=sync", "env.kwargs.hops=3",
                                 "engine.sglang_args=[--tp,8]", "env.train_seeds=[0,100]", "warmup=null",
                                 "learner.correction_kwargs={cap: 3}"])
    assert r.learner.lr == 1e-4 and r.runtime.mode == "sync"
    assert r.env.kwargs == {**base.env.kwargs, "hops": 3}
    assert r.engine.sglang_args == ["--tp", "8"]  # flags are text even when YAML reads a number
    assert r.env.train_seeds == (0, 100) and r.warmup is None
    assert r.learner.to_learner_config().correction_kwargs == {"cap": 3}


def test_override_creates_missing_sections():
    r = parse_recipe({**MINIMAL}, ["warmup.steps=7", "eval.episodes=5", "runtime.eval_every=2"])
    assert (r.warmup.steps, r.warmup.demos, r.eval.episodes) == (7, 2048, 5)


@pytest.mark.parametrize("override, path", [
    ("learner.lrr=1", "learner.lrr"),
    ("nope=1", "nope"),
    ("runtime.steps.x=1", "runtime.steps"),
    ("engine.sglang_args.tp=1", "engine.sglang_args"),
])
def test_override_of_unknown_key_is_an_error(override, path):
    probs, _ = problems(overrides=[override])
    assert probs[0].startswith(f"{path}: "), probs


def test_malformed_override():
    with pytest.raises(RecipeError, match="key.path=value"):
        parse_recipe(MINIMAL, ["learner.lr"])


def test_learner_spec_mirrors_learner_config():
    names = {f.name for f in dataclasses.fields(LearnerConfig)}
    assert set(LearnerSpec.model_fields) == names | {"backend"}
    for f in dataclasses.fields(LearnerConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert LearnerSpec.model_fields[f.name].get_default(call_default_factory=True) == default, f.name
    assert LearnerSpec().to_learner_config() == LearnerConfig()
    spec = LearnerSpec(lr=3e-4, replay="R2", correction="icepop", betas=[0.8, 0.9], mini_batches=2)
    cfg = spec.to_learner_config()
    assert (cfg.lr, cfg.replay, cfg.correction, cfg.betas, cfg.mini_batches) == (3e-4, "R2", "icepop", (0.8, 0.9), 2)
    assert LearnerSpec(backend="megatron", **dataclasses.asdict(cfg)).to_learner_config() == cfg


def test_every_field_is_described():
    from pydantic import BaseModel

    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name}"
            sub = getattr(f.annotation, "__args__", (f.annotation,))
            for a in sub:
                if isinstance(a, type) and issubclass(a, BaseModel):
                    walk(a)
    walk(Recipe)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_resolved_round_trips(path, tmp_path):
    recipe = load_recipe(path)
    resolved = recipe.resolved()
    json.dumps(resolved, allow_nan=False)
    assert parse_recipe(json.loads(json.dumps(resolved))) == recipe
    out = tmp_path / "resolved.yaml"
    out.write_text(dump_yaml(recipe))
    assert load_recipe(out) == recipe
    assert yaml.safe_load(out.read_text()) == resolved


def test_yaml_errors_are_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)
