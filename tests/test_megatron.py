"""The megatron-core learner backend on CPU (gloo): weights, logits, replay, updates, runtime at world size 1;
expert / pipeline / tensor parallel forward (and backward) over two gloo processes."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from agentrl.learner.batch import build_batch
from agentrl.learner.learner import LearnerConfig, TorchLearner
from agentrl.learner.mcore import McoreCausalLM, McoreParallel, MegatronLearner
from agentrl.learner.mcore.convert import hf_to_mcore, mcore_to_hf
from agentrl.learner.megatron_shim import apply_cpu_shim
from agentrl.model.config import preset
from agentrl.model.modeling import MoEForCausalLM
from agentrl.routing import RoutingLayout, RoutingRows
from agentrl.trajectory import Trajectory

# AGENTRL_LEARNER_DEVICE=cuda runs every MegatronLearner of this file (and the runtime's) on a GPU, where
# megatron-core builds on the GPU without the CPU shim; the references stay agentrl's model on the host
DEVICE = os.environ.get("AGENTRL_LEARNER_DEVICE", "cpu")

VARIANTS = {
    "qwen3-moe": preset("tiny-moe", initializer_range=0.08),
    # dense layers between MoE layers, un-normalised top-k (pre-softmax), tied embeddings, MHA
    "mixed-tied": preset("tiny-moe", initializer_range=0.08, mlp_only_layers=[1], decoder_sparse_step=1,
                         norm_topk_prob=False, tie_word_embeddings=True, num_key_value_heads=4),
    "dense": preset("tiny-dense", initializer_range=0.08),
    # DeepSeek-V3-style: sigmoid scores, selection bias, routed scaling, a shared expert
    "sigmoid-shared": preset("tiny-moe-sigmoid", initializer_range=0.08, routed_scaling_factor=2.5),
}


def our_model(cfg, seed=0):
    m = MoEForCausalLM(cfg).init_weights(seed)
    with torch.no_grad():  # a non-zero selection bias, so converting it matters
        for name, buf in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return m


def mcore_from(ours):
    m = McoreCausalLM(ours.config)
    m.load_state_dict(ours.state_dict())
    return m.eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_weight_conversion_round_trip_is_exact(name):
    ours = our_model(VARIANTS[name])
    sd = ours.state_dict()
    assert mcore_to_hf(hf_to_mcore(sd, ours.config), ours.config).keys() == sd.keys()
    m = mcore_from(ours)
    # every megatron parameter is written by the conversion (nothing left at its uninitialised value)
    converted = hf_to_mcore(sd, ours.config)
    assert {k for k in m.gpt.state_dict() if not k.endswith("_extra_state")} == set(converted)
    back = m.state_dict()
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k].cpu(), sd[k]), k  # megatron builds on the GPU when there is one


@pytest.mark.parametrize("name", VARIANTS)
def test_fp32_logits_match_our_model(name):
    ours = our_model(VARIANTS[name]).eval()
    m = mcore_from(ours)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=gen)
    att = torch.ones(2, 24, dtype=torch.long)
    att[1, 15:] = 0  # right padding
    seg = torch.tensor([[0] * 9 + [1] * 15, [2] * 20 + [-1] * 4])  # two packed rows, one with padding
    with torch.no_grad():
        for kw, real in (({}, torch.ones(2, 24, dtype=torch.bool)), ({"attention_mask": att}, att.bool()),
                         ({"segment_ids": seg}, seg >= 0)):
            a, b = ours(ids, **kw).logits, m(ids, **kw).logits
            assert a.abs().max() > 0.1  # not a degenerate model
            torch.testing.assert_close(b[real], a[real], rtol=0, atol=1e-5)


def test_unsupported_variants_are_refused_clearly():
    with pytest.raises(ValueError, match="megatron-core backend.*norm_topk_prob"):
        McoreCausalLM(preset("tiny-moe-sigmoid", norm_topk_prob=False))
    with pytest.raises(ValueError, match="top-1 softmax"):
        McoreCausalLM(preset("tiny-moe", num_experts_per_tok=1))
    with pytest.raises(NotImplementedError, match="tensor x expert parallelism needs sequence parallelism"):
        McoreCausalLM(preset("tiny-moe"), McoreParallel(tensor=2, expert=2))
    model = MoEForCausalLM(preset("tiny-moe"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cpu, but this process sees a GPU"):
            MegatronLearner(model, LearnerConfig(device="cpu"))
    else:
        with pytest.raises(ValueError, match="bfloat16.*float32"):
            MegatronLearner(model, LearnerConfig(dtype="bfloat16"))
        with pytest.raises(ValueError, match="device=cuda, but this process sees no GPU"):
            MegatronLearner(model, LearnerConfig(device="cuda"))


def random_rows(shape, num_experts, top_k, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, num_experts, generator=gen).argsort(-1)[..., :top_k]


def test_r3_replays_the_given_rows_in_megatron_token_order():
    ours = our_model(VARIANTS["mixed-tied"]).eval()
    m = mcore_from(ours)
    cfg, hook = ours.config, m.routing_replay
    ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(2))
    seg = torch.tensor([[0] * 4 + [1] * 6, [2] * 10, [3] * 7 + [-1] * 3])
    rows = random_rows((3, 10, len(cfg.moe_layers)), cfg.num_experts, cfg.num_experts_per_tok, seed=3)
    has = torch.rand(3, 10, generator=torch.Generator().manual_seed(4)) > 0.25  # some tokens have no row
    with torch.no_grad():
        with hook.replay(rows, has):
            b = m(ids, segment_ids=seg).logits
        used, free = hook.selected_rows(), hook.free_rows()
        with ours.routing_replay.replay(rows, has):
            a = ours(ids, segment_ids=seg).logits
    flat_rows, flat_has = rows.reshape(30, *rows.shape[2:]), has.reshape(-1)
    assert torch.equal(used[flat_has], flat_rows[flat_has])  # megatron routed exactly the given rows ...
    assert torch.equal(used[~flat_has], free[~flat_has])  # ... and tokens without a row freely
    assert not torch.equal(used, free)
    # the same experts as agentrl's own replay, token for token, and the same logits
    assert torch.equal(used, ours.routing_replay.selected_rows())
    torch.testing.assert_close(b[seg >= 0], a[seg >= 0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="replay rows cover 30 tokens"), torch.no_grad(), hook.replay(rows, has):
        m(ids[:, :5].repeat(1, 2)[:2])


def test_r2_records_with_megatron_and_replays_the_record():
    ours = our_model(VARIANTS["qwen3-moe"]).eval()
    m = mcore_from(ours)
    hook = m.routing_replay
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with hook.record():
            free_logits = m(ids).logits
        recorded = hook.recorded_rows()  # megatron's RouterReplay.get_recorded_indices, batch-major
        assert torch.equal(recorded, hook.selected_rows())
        with ours.routing_replay.record():
            ours(ids)
        assert torch.equal(recorded, ours.routing_replay.recorded)
        with hook.replay(recorded.reshape(2, 12, *recorded.shape[1:])):
            replayed = m(ids).logits
    torch.testing.assert_close(replayed, free_logits, rtol=0, atol=1e-6)


def trajectories(cfg, n=8, seed=0):
    """Synthetic episodes (prompt then generated tokens, engine logprobs, engine rows) for 2 GRPO groups."""
    rng = np.random.default_rng(seed)
    layout = RoutingLayout.from_config(cfg)
    out = []
    for i in range(n):
        length = int(rng.integers(10, 30))
        lm = np.zeros(length, bool)
        lm[length // 2:] = True
        rows = random_rows((length - 1, layout.num_moe_layers), cfg.num_experts, cfg.num_experts_per_tok, seed + i)
        out.append(Trajectory(tokens=rng.integers(0, cfg.vocab_size, length), loss_mask=lm,
                              logprobs=np.where(lm, -rng.uniform(0.5, 6, length), 0).astype(np.float32),
                              versions=np.where(lm, 0, -1),
                              routing=RoutingRows(rows.numpy().astype(layout.dtype), np.zeros(length - 1, np.int64)),
                              reward=float(i % 3 == 0), group_id=str(i // 4)))
    return out


def hf_grads(learner):
    if isinstance(learner, MegatronLearner):
        grads = {n.removeprefix("gpt."): p.grad.cpu() for n, p in learner.model.named_parameters()}
        return mcore_to_hf(grads, learner.model.config)
    return {n: p.grad.cpu() for n, p in learner.model.named_parameters()}


@pytest.mark.parametrize("replay,layout", [("R3", "packed"), ("R2", "padded"), ("off", "packed")])
def test_one_update_matches_the_torch_learner(replay, layout):
    ours = our_model(VARIANTS["qwen3-moe"])
    trajs = trajectories(ours.config)
    kw = dict(replay=replay, layout=layout, lr=1e-3, micro_batch_tokens=48, aux_loss_coef=0.01, correction="tis")
    a = TorchLearner(copy.deepcopy(ours), LearnerConfig(**kw))
    b = MegatronLearner(copy.deepcopy(ours), LearnerConfig(**kw, device=DEVICE))
    ma, mb = a.train_step(trajs), b.train_step(trajs)
    assert b.version == a.version == 1
    for k in ("loss", "pg_loss", "aux_loss", "mismatch_kl", "corr_mean_weight", "routing_disagree_any", "entropy"):
        if k in ma:
            assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-7), k
    ga, gb = hf_grads(a), hf_grads(b)  # the last micro-batch's gradients, by HF name
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-3, atol=1e-6, msg=k)
    # Adam's first step moves a weight by lr * g / (|g| + eps): where |g| ~ eps = 1e-8, float32 noise
    # in g shows in the step, so new weights must be identical only where the gradient is not ~0
    wa, wb, w0 = a.weights()[0], b.weights()[0], ours.state_dict()
    step = torch.cat([(wa[k] - w0[k]).abs().flatten() for k in wa])
    diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    clear = torch.cat([ga[k].abs().flatten() > 1e-6 for k in wa])
    assert step.mean() > 5e-4 and clear.float().mean() > 0.5  # the update did move the weights
    assert diff[clear].max() < 1e-6 and diff.max() <= 2 * kw["lr"]


def test_checkpoint_round_trip_restores_a_megatron_learner(tmp_path):
    from agentrl.model.checkpoint import init_model
    from agentrl.model import load_pretrained
    from agentrl.runtime.checkpoint import load_checkpoint, save_checkpoint

    model_dir = init_model("tiny-moe", tmp_path / "init", seed=0, initializer_range=0.08)
    cfg = LearnerConfig(lr=1e-3, replay="R3", ema_decay=0.9, device=DEVICE)
    a = MegatronLearner(load_pretrained(model_dir), cfg)
    a.train_step(trajectories(a.model.config))
    save_checkpoint(tmp_path / "ckpt", a, str(model_dir), {"step": 1})
    assert load_pretrained(tmp_path / "ckpt").state_dict().keys() == a.weights()[0].keys()  # HF layout on disk
    b = MegatronLearner(load_pretrained(model_dir), cfg)
    assert load_checkpoint(tmp_path / "ckpt", b) == {"step": 1} and b.version == 1
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    more = trajectories(a.model.config, seed=7)
    assert b.train_step(more)["loss"] == pytest.approx(a.train_step(more)["loss"], rel=1e-6)


def test_cpu_shim_is_idempotent():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cpu = not torch.cuda.is_available()  # with a GPU the shim does nothing
    assert apply_cpu_shim() is cpu
    get_emb = RotaryEmbedding.get_emb
    assert apply_cpu_shim() is cpu and RotaryEmbedding.get_emb is get_emb
    assert getattr(get_emb, "_agentrl_cpu_shim", False) == cpu
    assert not hasattr(torch.cuda.current_device, "__wrapped__")  # only patched for the duration of a call


def test_router_gating_backward_works_under_bf16_autocast():
    """megatron's RouterGatingLinearFunction under the learner's bf16 autocast (shim item 8): without the
    fix its forward returns bf16 and its backward raises a dtype error. Gradients against float64."""
    from megatron.core.transformer.moe import router

    apply_cpu_shim()
    device = "cuda" if DEVICE.startswith("cuda") else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=gen).to(device).requires_grad_()
    w = torch.randn(8, 16, generator=gen).to(device).requires_grad_()
    up = torch.randn(6, 8, generator=gen).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):  # the forward under autocast, as the learner runs it
        logits = router.router_gating_linear(x, w, None, x.dtype)
        loss = (logits * up).sum()
    loss.backward()
    assert logits.dtype == torch.float32  # the router's dtype (its input's), not autocast's
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x64 @ w64.T
    (ref * up.double()).sum().backward()
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_runtime_trains_with_the_megatron_backend(tmp_path):
    import ray

    from agentrl.recipe import load_recipe
    from agentrl.runtime.logging import read_metrics
    from agentrl.runtime.train import train

    recipe = {
        "name": "mcore", "model": {"init": {"preset": "tiny-moe"}},
        "env": {"id": "calculator-v0", "kwargs": {"compact": True, "digits": 2, "word_problems": False}},
        "warmup": None,
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 16, "max_total_tokens": 512},
        "learner": {"backend": "megatron", "lr": 1e-4, "replay": "R3", "device": DEVICE},
        "runtime": {"mode": "sync", "steps": 2, "checkpoint_every": 2, "eval_every": 0},
        "eval": {"episodes": 2},
        "output": {"dir": str(tmp_path / "runs"), "console": "quiet", "tensorboard": False, "plots": False},
    }
    path = tmp_path / "mcore.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(recipe))))
    try:
        train(load_recipe(path))
    finally:
        ray.shutdown()
    run = tmp_path / "runs" / "mcore"
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rows_missing"] == 0 and "routing_disagree_any" in r for r in rows)
    assert (run / "checkpoints" / "step_2" / "model.safetensors").exists()
    assert (run / "weights" / "LATEST").exists()


def _parallel_worker(rank: int, port: int, out_dir: str, kind: str) -> None:
    """One of 2 gloo processes. expert: EP=2, each rank holds 4 of the 8 experts and the whole router;
    pipeline: PP=2, rank 0 owns layers 0-1 and the embedding, rank 1 layers 2-3 and the LM head."""
    import torch.distributed as dist

    from agentrl.learner.mcore.model import McoreParallel

    torch.set_num_threads(1)
    apply_cpu_shim()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ours = our_model(VARIANTS["qwen3-moe"]).eval()  # the same seed: the same weights on both ranks
    cfg = ours.config
    m = McoreCausalLM(cfg, McoreParallel(expert=2) if kind == "expert" else McoreParallel(pipeline=2))
    m.load_state_dict(ours.state_dict())
    mine = m.gpt.state_dict()
    back, sd = m.state_dict(), ours.state_dict()  # gathered from both ranks
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(6))
    seg = torch.tensor([[0] * 4 + [1] * 6, [2] * 8 + [-1] * 2])
    rows = random_rows((2, 10, len(cfg.moe_layers)), cfg.num_experts, cfg.num_experts_per_tok, seed=7)
    with torch.no_grad(), ours.routing_replay.replay(rows):
        expected = ours(ids, segment_ids=seg).logits
    stage_input = None
    if kind == "pipeline" and rank == 1:
        stage_input = torch.empty(10, 2, cfg.hidden_size)
        dist.recv(stage_input, src=0)
    with m.routing_replay.replay(rows):
        out = m(ids, segment_ids=seg, stage_input=stage_input).logits
    result = {"round_trip": back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items()),
              "local_experts": len([k for k in mine if ".local_experts." in k and k.endswith("linear_fc1.weight")]),
              "local_layers": sorted({int(k.split(".")[2]) for k in mine if k.startswith("decoder.layers.")}),
              "columns": m.routing_replay.columns, "used": m.routing_replay.selected_rows(),
              "rows": rows.reshape(20, *rows.shape[2:]), "max_diff": None}
    if kind == "pipeline" and rank == 0:
        dist.send(out.detach().contiguous(), dst=1)  # this stage's hidden states [S, B, H]
    else:
        result["max_diff"] = float((out - expected)[seg >= 0].abs().max())
        out[seg >= 0].sum().backward()
        result["expert_grads"] = sum(int(p.grad is not None and p.grad.abs().sum() > 0)
                                     for n, p in m.named_parameters() if ".local_experts." in n)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def spawn_two(worker, tmp_path, *args):
    """Two CPU processes (GPUs hidden: these tests check megatron's slicing over gloo, and two ranks
    cannot share one GPU) running worker(rank, port, tmp_path, *args); their rank{0,1}.pt results."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read by the spawned children at start
    try:
        mp.spawn(worker, args=(port, str(tmp_path), *args), nprocs=2)
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]


def test_expert_parallel_over_two_gloo_processes(tmp_path):
    for r in spawn_two(_parallel_worker, tmp_path, "expert"):
        assert r["local_experts"] == 4 * 4  # 4 MoE layers x 4 local experts
        assert r["round_trip"]  # sharded on load, gathered again by state_dict()
        assert torch.equal(r["used"], r["rows"])  # R3 rows are global expert ids: no slicing under EP
        assert r["max_diff"] < 1e-5  # experts on the other rank computed their tokens
        assert r["expert_grads"] > 0


def test_pipeline_parallel_over_two_gloo_processes(tmp_path):
    first, last = spawn_two(_parallel_worker, tmp_path, "pipeline")
    assert first["local_layers"] == last["local_layers"] == [0, 1]  # local numbers on each stage
    assert first["round_trip"] and last["round_trip"]
    assert first["columns"] == [0, 1] and last["columns"] == [2, 3]  # the MoE layers each stage owns
    assert torch.equal(first["used"], first["rows"][:, :2]) and torch.equal(last["used"], last["rows"][:, 2:])
    assert last["max_diff"] < 1e-5 and last["expert_grads"] > 0  # stage 1 finished stage 0's forward


def _tensor_parallel_worker(rank: int, port: int, out_dir: str) -> None:
    """One of 2 gloo processes, TP=2, for every variant: each rank holds half of every qkv / proj / vocab
    matrix and of dense / shared-expert fc1 / fc2, and whole norms, routers and routed experts."""
    import torch.distributed as dist

    from agentrl.learner.mcore.convert import merge_tensor_parallel_shards

    torch.set_num_threads(1)
    apply_cpu_shim()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for name, cfg in VARIANTS.items():
        ours = our_model(cfg).eval()  # the same seed: the same weights on both ranks
        sd = ours.state_dict()
        m = McoreCausalLM(cfg, McoreParallel(tensor=2))
        m.load_state_dict(sd)  # strict: every key present, every slice the shape megatron built
        m.eval()  # megatron refuses to train an MoE layer under TP without sequence parallel
        mine = {k: v for k, v in m.gpt.state_dict().items() if not k.endswith("_extra_state")}
        shards = [None, None]
        dist.all_gather_object(shards, mine)
        merged, whole = merge_tensor_parallel_shards(shards, cfg), hf_to_mcore(sd, cfg)
        back = m.state_dict()  # gathered from both ranks, in HF names
        ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(6))
        seg = torch.tensor([[0] * 4 + [1] * 6, [2] * 8 + [-1] * 2])
        real = seg >= 0
        r = {"merged_exact": merged.keys() == whole.keys() and all(torch.equal(merged[k], v) for k, v in whole.items()),
             "round_trip": back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items()),
             "split": {k: (tuple(v.shape), tuple(whole[k].shape)) for k, v in mine.items()}}
        with torch.no_grad():
            expected, out = ours(ids, segment_ids=seg).logits, m(ids, segment_ids=seg).logits
        r["logits"], r["max_diff"] = out, float((out - expected)[real].abs().max())
        assert expected.abs().max() > 0.1  # not a degenerate model
        if cfg.moe_layers:
            rows = random_rows((2, 10, len(cfg.moe_layers)), cfg.num_experts, cfg.num_experts_per_tok, seed=7)
            has = torch.rand(2, 10, generator=torch.Generator().manual_seed(8)) > 0.25
            with ours.routing_replay.replay(rows, has):
                expected = ours(ids, segment_ids=seg).logits
            with m.routing_replay.replay(rows, has):
                out = m(ids, segment_ids=seg).logits
            r["replay_diff"] = float((out - expected)[real].abs().max())
            r["used"], r["free"] = m.routing_replay.selected_rows(), m.routing_replay.free_rows()
            r["rows"], r["has"] = rows.reshape(20, *rows.shape[2:]), has.reshape(-1)
        else:
            expected, out = ours(ids, segment_ids=seg).logits, m(ids, segment_ids=seg).logits
        # backward through the TP collectives (a gradient check, not training): the gathered grads are ours
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        (expected * weight)[real].sum().backward()
        (out * weight)[real].sum().backward()
        grads = [None, None]
        dist.all_gather_object(grads, {k: p.grad for k, p in m.gpt.named_parameters()})
        for k in grads[0]:  # q/k layernorms see only this rank's heads: megatron sums their grads over TP
            if "q_layernorm" in k or "k_layernorm" in k:  # (megatron/core/distributed/finalize_model_grads.py:355)
                grads[0][k] = grads[1][k] = grads[0][k] + grads[1][k]
        merged_grads = merge_tensor_parallel_shards(grads, cfg)
        hf = mcore_to_hf({k: merged_grads.get(k, torch.zeros_like(v)) for k, v in whole.items()}, cfg)
        r["grad_diff"] = {n: float((hf[n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-6))
                          for n, p in ours.named_parameters()}
        results[name] = r
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_tensor_parallel_over_two_gloo_processes(tmp_path):
    ranks = spawn_two(_tensor_parallel_worker, tmp_path)
    for name, cfg in VARIANTS.items():
        for r in ranks:
            r = r[name]
            assert r["merged_exact"], name  # merge_tensor_parallel_shards inverts what each rank loaded
            assert r["round_trip"], name  # HF -> shards on load, shards -> HF in state_dict()
            split = r["split"]  # (this rank's shape, the whole shape) of every megatron tensor
            halved = {k for k, (mine, whole) in split.items() if mine != whole}
            split_names = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight",
                           "word_embeddings.weight", "output_layer.weight")  # the rest (norms, routers) is whole
            assert halved == {k for k in split if k.endswith(split_names) and ".local_experts." not in k}
            assert all(math.prod(mine) * 2 == math.prod(whole) for k, (mine, whole) in split.items() if k in halved)
            assert split["decoder.layers.0.self_attention.linear_qkv.weight"][0][0] == (  # half of the KV groups
                cfg.num_key_value_heads // 2 * (cfg.num_attention_heads // cfg.num_key_value_heads + 2) * cfg.head_dim)
            assert r["max_diff"] < 1e-5, name  # gathered vocab-parallel logits == MoEForCausalLM's
            worst = max(r["grad_diff"], key=r["grad_diff"].get)
            assert r["grad_diff"][worst] < 2e-5, (name, worst, r["grad_diff"][worst])  # relative to the grad's max
            if cfg.moe_layers:
                assert r["replay_diff"] < 1e-5, name
                # routing sees whole hidden states on every TP rank: R3 rows need no slicing
                assert torch.equal(r["used"][r["has"]], r["rows"][r["has"]]), name
                assert torch.equal(r["used"][~r["has"]], r["free"][~r["has"]]), name
                assert not torch.equal(r["used"], r["free"]), name  # the rows did change the routing
        assert torch.equal(ranks[0][name]["logits"], ranks[1][name]["logits"]), name
