"""The model's float32 CPU GEMMs on oneDNN (agentrl/model/gemm.py) against float64 matrix products."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from agentrl.model import MoEForCausalLM, gemm, preset


def assert_fp32_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 result vs a float64 reference: within a few float32 roundings of the largest value."""
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=4e-6 * ref.abs().max().item())


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """The path is opt-in (AGENTRL_CPU_GEMM=onednn); these tests turn it on in this process."""
    assert gemm.AVAILABLE, "torch.ops.mkldnn._linear_pointwise is missing from this torch build"
    monkeypatch.setattr(gemm, "ENABLED", True)


def test_this_machine_takes_the_onednn_path():
    # the tests below would otherwise only check F.linear against itself
    assert gemm.use_onednn(torch.zeros(200, 128), torch.zeros(512, 128))


@pytest.mark.parametrize("shape", [(200, 128), (3, 67, 128), (1000, 128), (64, 128)])
@pytest.mark.parametrize("grads", ["both", "input", "weight"])
def test_forward_and_both_backward_gemms_match_float64(shape, grads):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    w = torch.randn(512, 128, generator=g)
    dy = torch.randn(*shape[:-1], 512, generator=g)
    x.requires_grad_(grads in ("both", "input"))
    w.requires_grad_(grads in ("both", "weight"))
    assert gemm.use_onednn(x, w)
    y = gemm.linear(x, w)
    y.backward(dy)
    xd, wd, dyd = x.detach().double(), w.detach().double(), dy.double()
    assert y.shape == (*shape[:-1], 512) and y.dtype == torch.float32
    assert_fp32_close(y, xd @ wd.T)
    if x.requires_grad:
        assert_fp32_close(x.grad, dyd @ wd)
    else:
        assert x.grad is None
    if w.requires_grad:
        assert_fp32_close(w.grad, dyd.reshape(-1, 512).T @ xd.reshape(-1, 128))
    else:
        assert w.grad is None


def test_rows_do_not_depend_on_the_padding_bucket():
    """The rows appended to reach a kernel size are zeros and cut off: a row's result is the same when
    computed alone in a bucket of 80 rows or among 200 (and equal to float64 within fp32 rounding)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 128, generator=g), torch.randn(512, 128, generator=g)
    for m in (73, 80, 129, 200):
        assert gemm.bucket(m) >= m
        torch.testing.assert_close(gemm.linear(x[:m], w), gemm.linear(x, w)[:m], rtol=0, atol=1e-5)


def test_buckets_waste_little_and_stay_few():
    sizes = range(1, 20_000)
    b = [gemm.bucket(m) for m in sizes]
    f = [gemm.bucket_floor(m) for m in sizes]
    assert all(fm <= m <= bm and gemm.bucket(fm) == fm for m, bm, fm in zip(sizes, b, f) if fm)
    assert all(m - fm < m / 8 for m, fm in zip(sizes, f) if m >= 64)  # MKL takes under 1/8 of the rows
    assert set(f) - {0} <= set(b)
    assert all(bm <= 1.125 * m for m, bm in zip(sizes, b) if m > 64)  # at most 12.5% more rows
    assert all(x <= y for x, y in zip(b, b[1:]))  # monotone
    assert len(set(b)) <= 4 + 8 * 9  # 4 sizes up to 64, then 8 per octave up to 2^15


def test_what_stays_on_f_linear():
    w32, x32 = torch.randn(512, 128), torch.randn(200, 128)
    assert not gemm.use_onednn(torch.randn(4, 128), w32)  # too small: oneDNN's fixed cost loses
    x40 = torch.randn(40, 128)
    assert gemm.use_onednn(x40, w32) and not gemm.use_onednn(x40.requires_grad_(), w32)  # autograd: 3 GEMMs
    assert not gemm.use_onednn(x32.bfloat16(), w32.bfloat16())  # bf16 already runs on oneDNN
    assert not gemm.use_onednn(x32.double(), w32.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.use_onednn(x32, w32)  # autocast decides the dtype
        assert gemm.linear(x32, w32).dtype == torch.bfloat16
    small = torch.randn(4, 128)
    assert torch.equal(gemm.linear(small, w32), F.linear(small, w32))


def test_env_var_chooses_the_path_and_the_default_is_f_linear():
    code = ("from agentrl.model import gemm; import torch; "
            "print(gemm.ENABLED, gemm.use_onednn(torch.zeros(999, 128), torch.zeros(512, 128)))")
    env = {k: v for k, v in os.environ.items() if k != "AGENTRL_CPU_GEMM"}

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)

    assert run().stdout.split() == ["False", "False"]
    assert run(AGENTRL_CPU_GEMM="torch").stdout.split() == ["False", "False"]
    assert run(AGENTRL_CPU_GEMM="onednn").stdout.split() == ["True", "True"]
    bad = run(AGENTRL_CPU_GEMM="mkl2")
    assert bad.returncode != 0 and "AGENTRL_CPU_GEMM" in bad.stderr


def test_model_training_step_matches_float64(monkeypatch):
    """A whole forward + backward of the MoE model (attention, router, experts, LM head on the oneDNN
    path where large enough) against the same model in float64 (which stays on F.linear)."""
    cfg = preset("tiny-moe")
    m32 = MoEForCausalLM(cfg).init_weights(0)
    m64 = MoEForCausalLM(cfg).init_weights(0).double()
    ids = torch.randint(9, cfg.vocab_size, (4, 120), generator=torch.Generator().manual_seed(1))
    calls = []
    real = gemm._mm_t
    monkeypatch.setattr(gemm, "_mm_t", lambda a, b: calls.append(a.shape) or real(a, b))
    out32 = m32(ids)
    rows = m32.routing_replay.selected_rows()
    out32.logits.logsumexp(-1).sum().backward()
    assert len(calls) > 3 * cfg.num_hidden_layers  # forward and backward GEMMs went through oneDNN
    out64 = m64(ids, routing=rows.view(4, 120, *rows.shape[1:]))  # the same experts, so the sums compare
    out64.logits.logsumexp(-1).sum().backward()
    torch.testing.assert_close(out32.logits.double(), out64.logits, rtol=0, atol=1e-4)
    for (name, p32), p64 in zip(m32.named_parameters(), m64.parameters()):
        scale = p64.grad.abs().max().item()
        torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=0, atol=1e-4 * max(scale, 1e-3), msg=name)
