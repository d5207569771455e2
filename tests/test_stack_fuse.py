"""stack_fuse: the Triton kernel (interpreter on CPU, real kernel on a GPU)
against the torch reference, forward and backward, plus the reference against
a naive loop, gradcheck, validation and dispatch."""
import math
import sys

import pytest
import torch

from conftest import TEST_DEVICE
from kernels import stack_fuse, stack_fuse_reference, use_triton

pytest.importorskip("triton")
from kernels import triton_stack_fuse as tsf  # noqa: E402  (after conftest set TRITON_INTERPRET)

# NESTVOX_TEST_DEVICE: cpu runs the kernel in the interpreter, cuda compiles it.
DEVICE = TEST_DEVICE
if DEVICE.type == "cpu" and not tsf.interpreting():  # pragma: no cover
    pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported",
                allow_module_level=True)

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    # The interpreter truncates fp32->bf16 while torch rounds: 1 ulp apart.
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
}


def nan_view(shape, dtype, gen):
    """Random values in a strided view of a NaN-filled buffer, layers not
    outermost in memory: any read past the T/D masks or any stride mix-up
    turns into NaN in the result."""
    K, B, T, D = shape
    buf = torch.full((B, T + 3, K, D + 5), math.nan, dtype=dtype, device=DEVICE)
    view = buf[:, 1:T + 1, :, 2:D + 2].permute(2, 0, 1, 3)
    view.copy_(torch.randn(shape, generator=gen).to(dtype))
    return view


def nan_grad_out(B, G, width, dtype, gen):
    buf = torch.full((B, G + 2, width + 7), math.nan, dtype=dtype, device=DEVICE)
    view = buf[:, 1:G + 1, 3:width + 3]
    view.copy_(torch.randn((B, G, width), generator=gen).to(dtype))
    return view


def run_both(K, B, T, D, S, dtype, seed=0):
    """Forward+backward through Triton and through the reference on the same inputs."""
    gen = torch.Generator().manual_seed(seed)
    hidden = nan_view((K, B, T, D), dtype, gen).detach().requires_grad_()
    weights = torch.softmax(torch.randn(K, generator=gen), 0).to(DEVICE).requires_grad_()
    out = tsf.stack_fuse_triton(hidden, weights, S)
    ref = stack_fuse_reference(hidden, weights, S)
    grad_out = nan_grad_out(B, ref.shape[1], S * D, dtype, gen)
    grads = torch.autograd.grad(out, (hidden, weights), grad_out)
    ref_grads = torch.autograd.grad(ref, (hidden, weights), grad_out)
    return out, ref, grads, ref_grads


def check(K, B, T, D, S, dtype):
    out, ref, (gh, gw), (rgh, rgw) = run_both(K, B, T, D, S, dtype)
    G = -(-T // S)
    assert out.shape == (B, G, S * D) and out.dtype == dtype
    assert not out.isnan().any() and not gh.isnan().any() and not gw.isnan().any()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gh, rgh, **TOL[dtype])
    # grad_w sums B*T*D products: scale the tolerance with the magnitude.
    torch.testing.assert_close(gw, rgw, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(1.0, math.sqrt(B * T * D)))
    if T % S:
        assert (out[:, -1, (T % S) * D:] == 0).all(), "tail padding must be exactly zero"
    return out


@pytest.mark.parametrize("S", [1, 2, 8])
@pytest.mark.parametrize("T", [0, 5, 19])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_triton_matches_reference_fp32(K, B, T, S):
    out = check(K, B, T, 33, S, torch.float32)
    if T:
        assert out.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,B,T,S", [(4, 3, 19, 8), (2, 1, 5, 2), (1, 3, 7, 1), (2, 1, 3, 8)])
def test_triton_matches_reference_half(K, B, T, S, dtype):
    check(K, B, T, 33, S, dtype)


@pytest.mark.parametrize("K,B,T,D,S", [(3, 2, 19, 33, 8), (2, 3, 9, 40, 2), (1, 1, 4, 17, 8)])
def test_small_tiles_many_programs(monkeypatch, K, B, T, D, S):
    # Tiny tiles: several programs on every grid axis, ragged in T and D.
    monkeypatch.setattr(tsf, "pick_blocks", lambda rows, dim: (4, 16))
    check(K, B, T, D, S, torch.float32)


def test_backward_only_what_is_needed():
    gen = torch.Generator().manual_seed(1)
    hidden = nan_view((3, 2, 11, 33), torch.float32, gen)
    weights = torch.softmax(torch.randn(3, generator=gen), 0).to(DEVICE)
    h = hidden.detach().requires_grad_()
    (g,) = torch.autograd.grad(tsf.stack_fuse_triton(h, weights, 4).sum(), h)
    torch.testing.assert_close(g, weights.view(3, 1, 1, 1).expand(3, 2, 11, 33).contiguous())
    w = weights.clone().requires_grad_()
    (gw,) = torch.autograd.grad(tsf.stack_fuse_triton(hidden, w, 4).sum(), w)
    torch.testing.assert_close(gw, hidden.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)


def test_reference_matches_naive_loop():
    gen = torch.Generator().manual_seed(2)
    K, B, T, D, S = 3, 2, 7, 5, 3
    hidden = torch.randn(K, B, T, D, generator=gen, dtype=torch.float64)
    weights = torch.softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)
    out = stack_fuse_reference(hidden, weights, S)
    G = math.ceil(T / S)
    expect = torch.zeros(B, G, S * D, dtype=torch.float64)
    for b in range(B):
        for g in range(G):
            for s in range(S):
                t = g * S + s
                if t < T:
                    for d in range(D):
                        expect[b, g, s * D + d] = sum(float(weights[k]) * float(hidden[k, b, t, d]) for k in range(K))
    assert out.shape == (B, G, S * D)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    assert (out[:, -1, (T % S) * D:] == 0).all()


def test_reference_gradcheck():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.softmax(torch.randn(3, generator=gen, dtype=torch.float64), 0).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: stack_fuse_reference(h, w, 2), (hidden, weights))


def test_reference_half_accumulates_in_fp32():
    # 2048 + 63 * 1.0: in fp16 (ulp 2 at 2048) every +1 ties to even and is
    # lost, giving 2048; an fp32 sum gives 2111, which rounds to 2112.
    hidden = torch.ones((64, 1, 1, 1), dtype=torch.float16)
    hidden[0] = 2048
    weights = torch.ones(64)
    out = stack_fuse_reference(hidden, weights, 1)
    assert out.dtype == torch.float16
    assert out.item() == 2112


def test_empty_time_axis():
    for fn in (stack_fuse_reference, tsf.stack_fuse_triton, stack_fuse):
        out = fn(torch.zeros(2, 3, 0, 5, device=DEVICE), torch.ones(2, device=DEVICE) / 2, 4)
        assert out.shape == (3, 0, 20)


@pytest.mark.parametrize("fn", [stack_fuse, stack_fuse_reference, "triton"])
def test_validation_errors(fn):
    fn = tsf.stack_fuse_triton if fn == "triton" else fn
    h = torch.zeros(2, 1, 3, 4)
    w = torch.ones(2) / 2
    with pytest.raises(ValueError, match="4-D"):
        fn(h[0], w, 2)
    with pytest.raises(ValueError, match=r"weights must be \[K\]"):
        fn(h, torch.ones(3), 2)
    with pytest.raises(ValueError, match=r"weights must be \[K\]"):
        fn(h, torch.ones(2, 1), 2)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="stack"):
            fn(h, w, bad)
    with pytest.raises(ValueError, match="floating"):
        fn(h.long(), w, 2)
    with pytest.raises(ValueError, match="at least one layer"):
        fn(torch.zeros(0, 1, 3, 4), torch.ones(0), 2)


def test_dispatch_env_switch(monkeypatch):
    calls = []
    real = tsf.stack_fuse_triton
    monkeypatch.setattr(tsf, "stack_fuse_triton", lambda *a: calls.append(1) or real(*a))
    h = torch.randn(2, 1, 5, 8, device=DEVICE)
    w = torch.tensor([0.25, 0.75], device=DEVICE)
    ref = stack_fuse_reference(h, w, 2)

    monkeypatch.setenv("NESTVOX_STACK_FUSE", "triton")
    torch.testing.assert_close(stack_fuse(h, w, 2), ref)
    assert calls == [1]

    monkeypatch.setenv("NESTVOX_STACK_FUSE", "torch")
    assert torch.equal(stack_fuse(h, w, 2), ref)
    assert calls == [1]

    monkeypatch.delenv("NESTVOX_STACK_FUSE")
    stack_fuse(h, w, 2)
    assert calls == ([1, 1] if h.is_cuda else [1]), "auto: Triton on CUDA tensors only"

    monkeypatch.setenv("NESTVOX_STACK_FUSE", "cuda-please")
    with pytest.raises(ValueError, match="NESTVOX_STACK_FUSE"):
        stack_fuse(h, w, 2)


def test_auto_dispatch_picks_triton_on_cuda_and_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("NESTVOX_STACK_FUSE", raising=False)
    h = torch.randn(2, 1, 5, 8, device=DEVICE)
    assert use_triton(h) == (h.is_cuda and torch.cuda.is_available())
    assert not use_triton(h.cpu())  # even with the interpreter on: CPU serving uses the reference
    calls = []
    real_t, real_r = tsf.stack_fuse_triton, stack_fuse_reference
    dispatch = sys.modules["kernels.stack_fuse"]  # the module (the package's name is the function)

    monkeypatch.setattr(tsf, "stack_fuse_triton", lambda *a: calls.append("triton") or real_t(*a))
    monkeypatch.setattr(dispatch, "stack_fuse_reference", lambda *a: calls.append("torch") or real_r(*a))
    w = torch.tensor([0.5, 0.5], device=DEVICE)
    stack_fuse(h, w, 2)
    stack_fuse(h.cpu(), w.cpu(), 2)
    assert calls == (["triton", "torch"] if DEVICE.type == "cuda" else ["torch", "torch"])
    if DEVICE.type == "cuda":  # a real kernel: no interpreter anywhere in this process
        assert not tsf.interpreting()


def test_weights_are_used_as_given():
    # No softmax inside: unnormalized weights scale the output linearly.
    h = torch.ones(2, 1, 2, 3, device=DEVICE)
    w = torch.tensor([2.0, 3.0], device=DEVICE)
    for fn in (stack_fuse_reference, tsf.stack_fuse_triton):
        assert torch.equal(fn(h, w, 2), torch.full((1, 1, 6), 5.0, device=DEVICE))
