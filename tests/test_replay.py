"""Routing replay (Contract 3) on our model and on transformers' Qwen3-MoE, Mixtral and OLMoE."""

import pytest
import torch
import transformers

from agentrl.model import MoEForCausalLM, RoutingReplayError, attach_replay, preset
from agentrl.model.replay import check_replay_rows

V = 128


def ours():
    m = MoEForCausalLM(preset("tiny-moe", vocab_size=V)).init_weights(seed=0)
    with torch.no_grad():  # sharper routers: selection then matters for the output
        for n, p in m.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.mul_(10)
    return m


def hf(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128)
    if kind == "qwen3_moe":
        m = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, head_dim=8, moe_intermediate_size=32, num_experts=6, norm_topk_prob=True))
    elif kind == "mixtral":
        m = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=6))
    else:
        m = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**common, num_experts=6, norm_topk_prob=False))
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__.endswith("TopKRouter"):
                mod.weight.normal_(0, 1.0)
    return m


MODELS = ["ours", "qwen3_moe", "mixtral", "olmoe"]


def build(kind):
    m = ours() if kind == "ours" else hf(kind)
    return m, attach_replay(m)


def lm_loss(model, ids, **kw):
    logits = model(ids, **kw).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def replay_ctx(model, hook, rows, mask=None):
    """Our model takes rows as forward arguments; any model can use the hook's context manager."""
    return hook.replay(rows, mask)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


IDS = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", MODELS)
def test_attach_does_not_change_the_model(kind):
    model = ours() if kind == "ours" else hf(kind)
    with torch.no_grad():
        before = model(IDS).logits
    attach_replay(model)
    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", MODELS)
def test_replaying_recorded_routing_reproduces_loss_and_gradients_exactly(kind):
    model, hook = build(kind)
    model.zero_grad()
    with hook.record():
        loss_free = lm_loss(model, IDS)
    loss_free.backward()
    g_free = grads(model)
    rows = hook.recorded
    assert rows.shape == (IDS.numel(), hook.num_layers, hook.top_k)
    model.zero_grad()
    with hook.replay(rows.reshape(*IDS.shape, hook.num_layers, hook.top_k)):
        loss_replay = lm_loss(model, IDS)
    loss_replay.backward()
    assert torch.equal(loss_replay, loss_free)
    for n, g in grads(model).items():
        assert (g is None) == (g_free[n] is None), n
        if g is not None:
            assert torch.equal(g, g_free[n]), n


@pytest.mark.parametrize("kind", MODELS)
def test_forced_experts_get_all_expert_gradient_and_router_still_learns(kind):
    model, hook = build(kind)
    forced = torch.tensor([1, 4])  # every token, every layer
    rows = forced.expand(*IDS.shape, hook.num_layers, 2).clone()
    model.zero_grad()
    with hook.replay(rows):
        lm_loss(model, IDS).backward()
    assert torch.equal(hook.selected_rows(), rows.reshape(-1, hook.num_layers, 2))
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj")]
    assert len(experts) == hook.num_layers
    for ex in experts:
        for name in ("gate_up_proj", "down_proj"):
            g = getattr(ex, name).grad
            per_expert = g.abs().flatten(1).sum(1)
            for e in range(hook.num_experts):
                if e in forced.tolist():
                    assert per_expert[e] > 0, (name, e)
                else:
                    assert per_expert[e] == 0, (name, e)
    routers = [p for n, p in model.named_parameters() if n.endswith("gate.weight") and p.dim() == 2
               and p.shape[0] == hook.num_experts]
    assert len(routers) == hook.num_layers
    for w in routers:
        assert w.grad is not None and w.grad.abs().sum() > 0
    # free routing would have used other experts too: replay really changed the selection
    with torch.no_grad(), hook.record():
        model(IDS)
    assert not torch.equal(hook.recorded, rows.reshape(-1, hook.num_layers, 2))


@pytest.mark.parametrize("kind", MODELS)
def test_gates_are_training_scores_at_replayed_ids(kind):
    """The gate of a replayed expert is the training router's probability at that id (normalised
    over the selected ids when the model normalises), computed here from captured router inputs."""
    model, hook = build(kind)
    inputs = []
    routers = [m for m in model.modules() if type(m).__name__ in ("Router",) or type(m).__name__.endswith("TopKRouter")]
    blocks = [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]))) for b in blocks]
    rows = torch.tensor([3, 0]).expand(*IDS.shape, hook.num_layers, 2).clone()
    captured = []
    exp_handles = [m.experts.register_forward_pre_hook(lambda m, a: captured.append(a[2])) for m in blocks]
    with torch.no_grad(), hook.replay(rows):
        model(IDS)
    for h in handles + exp_handles:
        h.remove()
    norm = {"ours": True, "qwen3_moe": True, "mixtral": True, "olmoe": False}[kind]
    for block, x, gates in zip(blocks, inputs, captured):
        w = block.gate.weight
        p = torch.softmax(x.double() @ w.double().T, -1)[:, [3, 0]]
        if norm:
            p = p / p.sum(-1, keepdim=True)
        torch.testing.assert_close(gates.double(), p, rtol=1e-5, atol=1e-6)
    assert len(captured) == hook.num_layers and routers


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    "bad,msg",
    [
        (lambda L, k, E: torch.zeros(2, 11, L, k + 1, dtype=torch.long), "shape"),
        (lambda L, k, E: torch.zeros(2, 11, L + 1, k, dtype=torch.long), "shape"),
        (lambda L, k, E: torch.tensor([0, 0]).expand(2, 11, L, k).clone(), "duplicate"),
        (lambda L, k, E: torch.tensor([0, E]).expand(2, 11, L, k).clone(), "out of range"),
        (lambda L, k, E: torch.tensor([-1, 2]).expand(2, 11, L, k).clone(), "out of range"),
        (lambda L, k, E: torch.tensor([0, 1]).expand(2, 10, L, k).clone(), "tokens"),
        (lambda L, k, E: torch.zeros(2, 11, L, k, dtype=torch.float32), "integer"),
    ],
    ids=["k", "layers", "duplicate", "too-big", "negative", "token-count", "float"],
)
def test_bad_rows_raise_before_the_forward(kind, bad, msg):
    model, hook = build(kind)
    ran = []
    emb = model.get_input_embeddings() if kind != "ours" else model.model.embed_tokens
    h = emb.register_forward_hook(lambda *a: ran.append(1))
    rows = bad(hook.num_layers, hook.top_k, hook.num_experts)
    with pytest.raises(RoutingReplayError, match=msg):
        with hook.replay(rows):
            model(IDS)
    h.remove()
    assert not ran, "a layer ran before the rows were rejected"
    assert hook.mode.value == "off"  # a failed replay leaves the hook usable
    model(IDS)


def test_our_forward_takes_rows_and_mask():
    model, hook = build("ours")
    with torch.no_grad(), hook.record():
        free = model(IDS).logits
    rec = hook.recorded.reshape(*IDS.shape, hook.num_layers, 2)
    other = torch.tensor([5, 6]).expand_as(rec).clone()
    mask = torch.zeros(IDS.shape, dtype=torch.bool)
    with torch.no_grad():
        # mask all False: every token routes freely, rows are ignored
        assert torch.equal(model(IDS, routing=other, routing_mask=mask).logits, free)
        mask[0, :4] = True
        model(IDS, routing=other, routing_mask=mask)
    sel = hook.selected_rows().reshape(*IDS.shape, hook.num_layers, 2)
    assert torch.equal(sel[0, :4], other[0, :4])
    # unmasked tokens route freely: sequence 1 is untouched; in sequence 0 the later tokens attend to
    # replayed ones, so only their first MoE layer (fed by attention over embeddings) must match
    assert torch.equal(sel[1], rec[1])
    assert torch.equal(sel[0, 4:, 0], rec[0, 4:, 0])
    free_now = hook.free_rows().reshape_as(rec)
    assert torch.equal(sel[0, 4:], free_now[0, 4:])  # where unmasked, the used ids are the free choice
    assert not torch.equal(free_now[0, :4], other[0, :4])  # and the free choice is captured while replaying
    with pytest.raises(ValueError, match="dense"):
        MoEForCausalLM(preset("tiny-dense", vocab_size=V))(IDS, routing=rec)


def test_r2_replays_old_policy_routing_after_an_update():
    """R2: record in the old-policy forward, change the weights, replay: selection stays the recorded one."""
    model, hook = build("ours")
    with torch.no_grad(), hook.record():
        model(IDS)
    old = hook.recorded
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.add_(torch.randn_like(p) * 2.0)
        model(IDS)
        assert not torch.equal(hook.selected_rows(), old)  # the new policy routes differently
        with hook.replay(old):
            model(IDS.reshape(1, -1).reshape(IDS.shape))
        assert torch.equal(hook.selected_rows(), old)


def test_padded_and_packed_replay_agree():
    """Rows aligned to a padded batch and to a packed batch give the same per-token logits."""
    model, hook = build("ours")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (6, 9)]
    rows = [torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(len(s) * hook.num_layers)])
            .reshape(len(s), hook.num_layers, 2) for s in seqs]
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], segment_ids=torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None],
                       routing=torch.cat(rows)[None]).logits[0]
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        pr = torch.tensor([0, 1]).expand(2, 9, hook.num_layers, 2).clone()
        for i, (s, r) in enumerate(zip(seqs, rows)):
            ids[i, : len(s)], mask[i, : len(s)], pr[i, : len(s)] = s, 1, r
        padded = model(ids, attention_mask=mask, routing=pr).logits
    torch.testing.assert_close(padded[0, :6], packed[:6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1, :9], packed[6:], rtol=1e-4, atol=1e-5)


def test_modes_do_not_nest_and_attach_rejects_dense():
    _, hook = build("ours")
    with hook.record():
        with pytest.raises(RuntimeError, match="nest"):
            with hook.replay(torch.zeros(1, 4, 2, dtype=torch.long) + torch.tensor([0, 1])):
                pass
    with pytest.raises(TypeError, match="router"):
        attach_replay(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)))
    check_replay_rows(torch.tensor([[[0, 1]]], dtype=torch.uint8), 1, 2, 2)  # uint8 rows are fine
