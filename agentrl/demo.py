"""`agentrl demo`: the foundation end to end on CPU in about a minute.

What it does, in order (each stage is a plain function below):
  1. `agentrl init-model` a tiny MoE and its dense twin (HF layout, local tokenizer);
  2. warm both up briefly on arithmetic chats so their next-token distributions are not uniform;
  3. play the inference engine: a **bf16** copy samples answers, then one bf16 forward records the
     routing rows `[N-1, moe_layers, k]` and behaviour log-probs, and the rows go through SGLang's
     wire format (base64 int32 with dense layers as 0) and back;
  4. play the learner: the **fp32** model scores the same tokens with free routing and with the
     engine's rows replayed (R3), and the dense model gives the floor;
  5. print the training-inference mismatch table (k3 KL, F(2), routing disagreement).
It is a stand-in for the real engine and learner (later issues); it uses only the model, routing
rows, replay and metrics of the foundation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from agentrl.algo.metrics import mismatch_metrics, routing_metrics
from agentrl.model import MoEForCausalLM, load_pretrained
from agentrl.model.checkpoint import init_model
from agentrl.routing import RoutingLayout, RoutingRows, align_padded, encode_wire, moe_to_wire


def arithmetic_chat(rng: random.Random) -> tuple[list[dict], str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return [{"role": "user", "content": f"What is {a} {op} {b}?"}], f"The answer is {answer}."


def warm_up(model: MoEForCausalLM, tok, steps: int, seed: int, batch: int = 32, lr: float = 3e-3) -> float:
    """Next-token training on whole chats (prompt + answer); returns the last loss."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="warm-up", leave=False):
        texts = []
        for _ in range(batch):
            msgs, ans = arithmetic_chat(rng)
            texts.append(tok.apply_chat_template(msgs + [{"role": "assistant", "content": ans}], tokenize=False))
        enc = tok(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits = model(ids, attention_mask=mask).logits
        tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@torch.no_grad()
def sample(model: MoEForCausalLM, tok, prompts: list[list[int]], new_tokens: int, seed: int) -> list[list[int]]:
    """Temperature-1 sampling with full recompute (left-padded batch); returns prompt + completion ids."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [list(p) for p in prompts]
    for _ in range(new_tokens):
        s = max(map(len, seqs))
        ids = torch.full((len(seqs), s), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, q in enumerate(seqs):
            ids[i, s - len(q):], mask[i, s - len(q):] = torch.tensor(q), 1
        probs = torch.softmax(model(ids, attention_mask=mask).logits[:, -1].float(), -1)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].tolist()
        for q, t in zip(seqs, nxt):
            q.append(t)
    return seqs


def right_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = max(map(len, seqs))
    ids = torch.full((len(seqs), s), pad)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, : len(q)], mask[i, : len(q)] = torch.tensor(q), 1
    return ids, mask


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logp[b, t] = log softmax(logits[b, t-1])[ids[b, t]] for t >= 1 (position 0 gets 0)."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return F.pad(lp, (1, 0))


@torch.no_grad()
def engine_pass(model_bf16: MoEForCausalLM, seqs, pad: int, layout: RoutingLayout) -> tuple[torch.Tensor, list[RoutingRows]]:
    """bf16 scoring forward that records rows; rows go through the SGLang wire format and back."""
    ids, mask = right_padded(seqs, pad)
    hook = model_bf16.routing_replay
    rows = []
    if hook is not None:
        with hook.record():
            logits = model_bf16(ids, attention_mask=mask).logits
        rec = hook.recorded.reshape(*ids.shape, layout.num_moe_layers, layout.top_k)
        for i, q in enumerate(seqs):
            moe_rows = rec[i, : len(q) - 1].numpy().astype(layout.dtype)  # N-1 rows: the last token is never fed
            meta = {"routed_experts": encode_wire(moe_to_wire(moe_rows, layout))}
            rows.append(RoutingRows.from_wire(meta, layout, version=0))
    else:
        logits = model_bf16(ids, attention_mask=mask).logits
    return token_logprobs(logits, ids), rows


def learner_pass(model: MoEForCausalLM, seqs, pad: int, layout: RoutingLayout | None, rows, replay: bool):
    ids, mask = right_padded(seqs, pad)
    kw = {}
    if replay:
        experts, has_row = align_padded(rows, [len(q) for q in seqs], layout, max_len=ids.shape[1])
        kw = dict(routing=torch.from_numpy(experts.astype("int64")), routing_mask=torch.from_numpy(has_row))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **kw).logits
    free = model.routing_replay.free_rows() if model.routing_replay is not None else None
    return token_logprobs(logits, ids), free


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, samples: int = 32, new_tokens: int = 16,
             warmup_steps: int = 80) -> dict[str, dict[str, float]]:
    out = Path(out_dir)
    torch.manual_seed(seed)
    results: dict[str, dict[str, float]] = {}
    for name, preset_name in (("moe", "tiny-moe"), ("dense", "tiny-dense")):
        ckpt = init_model(preset_name, out / preset_name, seed=seed)
        model = load_pretrained(ckpt)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ckpt)
        loss = warm_up(model, tok, warmup_steps, seed)
        model.eval()
        engine = MoEForCausalLM(model.config).to(torch.bfloat16).eval()
        engine.load_state_dict(model.state_dict())
        rng = random.Random(seed + 1)
        prompts = [tok(tok.apply_chat_template(arithmetic_chat(rng)[0], add_generation_prompt=True, tokenize=False))
                   ["input_ids"] for _ in range(samples)]
        seqs = sample(engine, tok, prompts, new_tokens, seed)
        layout = RoutingLayout.from_config(model.config) if model.config.moe_layers else None
        logp_infer, rows = engine_pass(engine, seqs, tok.pad_token_id, layout)
        ids, mask = right_padded(seqs, tok.pad_token_id)
        gen_mask = torch.zeros_like(mask, dtype=torch.bool)
        for i, (q, p) in enumerate(zip(seqs, prompts)):
            gen_mask[i, len(p): len(q)] = True  # generated tokens only
        for replay in ((False, True) if layout else (False,)):
            logp_train, free = learner_pass(model, seqs, tok.pad_token_id, layout, rows, replay)
            key = name + ("_r3" if replay else "")
            results[key] = {"warmup_loss": loss, **mismatch_metrics(logp_train, logp_infer, gen_mask)}
            if layout:
                engine_rows, _ = align_padded(rows, [len(q) for q in seqs], layout, max_len=ids.shape[1])
                flat_mask = gen_mask.reshape(-1)
                # routing the learner actually used: engine rows under replay, its own free choice otherwise
                used = torch.from_numpy(engine_rows.astype("int64")).reshape(-1, *engine_rows.shape[2:])
                learner_used = used if replay else free
                results[key]["routing_disagree_any"] = routing_metrics(used, learner_used, flat_mask)["routing_disagree_any"]
                results[key]["routing_disagree_free"] = routing_metrics(used, free, flat_mask)["routing_disagree_any"]
    (out / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = ["mismatch_kl", "extreme_frac_1.5", "extreme_frac_2", "routing_disagree_any", "tokens"]
    lines = [f"{'row':<8}" + "".join(f"{c:>22}" for c in cols)]
    for row in ("dense", "moe", "moe_r3"):
        r = results.get(row, {})
        lines.append(f"{row:<8}" + "".join(f"{r.get(c, float('nan')):>22.3g}" for c in cols))
    return "\n".join(lines)
