"""`agentrl bench mismatch` end to end (tiny models, short warm-up), and its learner scoring checked
against a direct forward of the model with the engine's rows replayed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agentrl.bench.mismatch import MismatchConfig, play_embedded, score
from agentrl.cli import main
from agentrl.model import load_pretrained
from agentrl.model.checkpoint import init_model


def test_cli_end_to_end(tmp_path, capsys):
    out, plot = tmp_path / "results.json", tmp_path / "cdf.png"
    rc = main(["bench", "mismatch", "--quick", "--warmup-steps", "4", "--demos", "16", "--episodes", "10",
               "--out", str(out), "--plot", str(plot), "--out-dir", str(tmp_path / "bench")])
    assert rc == 0
    res = json.loads(out.read_text())
    for row in ("dense", "moe", "moe_r3"):
        for key in ("mismatch_kl", "extreme_frac_1.5", "extreme_frac_2", "extreme_frac_5", "routing_disagree_any"):
            assert np.isfinite(res[row][key]), (row, key)
        assert res[row]["tokens"] > 0
    assert res["moe"]["tokens"] == res["moe_r3"]["tokens"]  # the same generated tokens, scored twice
    assert res["moe"]["routing_tokens"] > res["moe"]["tokens"]  # rows cover prompt and tool output too
    assert res["moe_r3"]["routing_disagree_any"] == 0.0  # the learner used the engine's rows
    assert res["moe"]["routing_disagree_any"] == res["moe"]["routing_disagree_free_any"]
    assert 0 <= res["moe"]["extreme_frac_5"] <= res["moe"]["extreme_frac_2"] <= res["moe"]["extreme_frac_1.5"] <= 1
    # R3's point: replaying the engine's routing shrinks the bf16-engine / fp32-learner mismatch
    assert res["moe_r3"]["mismatch_kl"] < res["moe"]["mismatch_kl"]
    assert plot.stat().st_size > 0
    table = capsys.readouterr().out
    assert "moe_r3" in table and "F(2)" in table


def test_learner_scoring_matches_a_direct_replayed_forward(tmp_path):
    ckpt = init_model("tiny-moe", tmp_path / "m", seed=3)
    cfg = MismatchConfig.quick(episodes=3, max_new_tokens=6, out_dir=str(tmp_path))
    trajs = [t for t in play_embedded(ckpt, cfg) if t.status in ("ok", "truncated")]
    assert trajs and all(t.routing is not None and len(t.routing) == len(t) - 1 for t in trajs)
    replayed, free = score(ckpt, trajs, replay=True, batch_size=2), score(ckpt, trajs, replay=False, batch_size=2)
    model = load_pretrained(ckpt).eval()
    for i, t in enumerate(trajs):
        ids = torch.from_numpy(t.tokens)[None]
        rows = torch.zeros(1, len(t), *t.routing.experts.shape[1:], dtype=torch.long)
        rows[0, :-1] = torch.from_numpy(t.routing.experts.astype(np.int64))
        rows[0, -1] = torch.arange(rows.shape[-1])  # the last token has no row: distinct ids, routed freely
        has = torch.zeros(1, len(t), dtype=torch.bool)
        has[0, :-1] = True
        with torch.no_grad():
            lp_r = torch.log_softmax(model(ids, routing=rows, routing_mask=has).logits[0, :-1].float(), -1)
            lp_f = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        gen = np.flatnonzero(t.loss_mask)
        want_r = lp_r.gather(-1, ids[0, 1:, None])[:, 0][gen - 1]
        want_f = lp_f.gather(-1, ids[0, 1:, None])[:, 0][gen - 1]
        assert torch.allclose(replayed.logp[i, gen], want_r, atol=1e-4)
        assert torch.allclose(free.logp[i, gen], want_f, atol=1e-4)
        np.testing.assert_array_equal(np.sort(replayed.used_rows[i], -1), np.sort(t.routing.experts, -1))


@pytest.mark.parametrize("bad", [{"moe_preset": "nope"}])
def test_unknown_preset_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="unknown preset"):
        from agentrl.bench.mismatch import warm_checkpoint

        warm_checkpoint(bad["moe_preset"], MismatchConfig.quick(out_dir=str(tmp_path)))
