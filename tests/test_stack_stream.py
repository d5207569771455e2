"""Streaming stack_fuse through StackCarry equals the offline call exactly."""
import pytest
import torch

from conftest import TEST_DEVICE
from kernels import StackCarry, stack_fuse, stack_fuse_flush, stack_fuse_stream


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    # Exact equality is a property of the CPU reference path.
    monkeypatch.setenv("NESTVOX_STACK_FUSE", "torch")


def random_splits(total, gen, max_chunk):
    """Chunk lengths summing to total, with 0- and 1-frame chunks mixed in."""
    sizes = []
    while sum(sizes) < total:
        pick = int(torch.randint(0, 4, (1,), generator=gen))
        size = (0, 1, int(torch.randint(2, max_chunk + 1, (1,), generator=gen)), max_chunk)[pick]
        sizes.append(min(size, total - sum(sizes)))
    return sizes


def stream(hidden, weights, S, sizes, carry=None):
    pieces, t = [], 0
    for n in sizes:
        carry, groups = stack_fuse_stream(carry, hidden[:, :, t:t + n], weights, S)
        complete = (t + n) // S - t // S
        t += n
        assert groups.shape == (hidden.shape[1], complete, S * hidden.shape[3])
        assert carry.pending == t - (t // S) * S, "carry must hold exactly the incomplete tail"
        pieces.append(groups)
    pieces.append(stack_fuse_flush(carry, weights, S))
    assert carry.pending == 0
    return torch.cat(pieces, dim=1), carry


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("S", [1, 3, 8])
@pytest.mark.parametrize("K,B,D,layout", [(1, 1, 13, "kbtd"), (4, 3, 13, "kbtd"), (4, 2, 13, "btkd"), (33, 2, 40, "kbtd")])
def test_random_chunking_equals_offline(K, B, D, layout, S, seed):
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.randint(0, 40, (1,), generator=gen))
    if layout == "kbtd":
        hidden = torch.randn(K, B, T, D, generator=gen)
    else:  # layers interleaved in memory, as a stack of per-frame layer outputs would be
        hidden = torch.randn(B, T, K, D, generator=gen).permute(2, 0, 1, 3)
    weights = torch.softmax(torch.randn(K, generator=gen), 0)
    sizes = random_splits(T, gen, max_chunk=2 * S + 3)
    got, _ = stream(hidden, weights, S, sizes, StackCarry.empty(K, B, D))
    expect = stack_fuse(hidden, weights, S)
    assert got.shape == expect.shape
    assert torch.equal(got, expect)


def test_named_edge_splits():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 2, 21, 5, generator=gen)
    weights = torch.softmax(torch.randn(3, generator=gen), 0)
    expect = stack_fuse(hidden, weights, 4)
    for sizes in ([21], [0, 21, 0], [1] * 21, [3, 0, 1, 9, 8], [4, 4, 4, 4, 4, 1], [20, 1]):
        got, _ = stream(hidden, weights, 4, sizes)
        assert torch.equal(got, expect), sizes


def test_flush_pads_and_resets_for_next_turn():
    hidden = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).reshape(2, 1, 5, 2)
    weights = torch.tensor([0.5, 0.5])
    carry, groups = stack_fuse_stream(None, hidden, weights, 4)
    assert groups.shape == (1, 1, 8) and carry.pending == 1
    tail = stack_fuse_flush(carry, weights, 4)
    frame4 = (hidden[0, 0, 4] + hidden[1, 0, 4]) / 2
    assert torch.equal(tail, torch.cat([frame4, torch.zeros(6)]).view(1, 1, 8))
    assert carry.pending == 0
    # Flushing again yields no group; the carry still knows B and D.
    assert stack_fuse_flush(carry, weights, 4).shape == (1, 0, 8)
    # Next turn starts clean from the same carry object.
    carry, groups = stack_fuse_stream(carry, hidden, weights, 4)
    assert torch.equal(groups, stack_fuse(hidden[:, :, :4], weights, 4))


def test_stream_does_not_modify_input_carry():
    weights = torch.tensor([1.0])
    carry, _ = stack_fuse_stream(None, torch.randn(1, 1, 3, 2), weights, 4)
    before = carry.frames.clone()
    new_carry, groups = stack_fuse_stream(carry, torch.randn(1, 1, 2, 2), weights, 4)
    assert torch.equal(carry.frames, before) and carry.pending == 3
    assert new_carry.pending == 1 and groups.shape == (1, 1, 8)


def test_empty_carry_and_mismatches():
    weights = torch.ones(2) / 2
    assert StackCarry.empty().pending == 0
    assert stack_fuse_flush(StackCarry.empty(2, 3, 4), weights, 2).shape == (3, 0, 8)
    with pytest.raises(ValueError, match="never saw frames"):
        stack_fuse_flush(None, weights, 2)
    with pytest.raises(ValueError, match="num_layers, batch, dim"):
        StackCarry.empty(2, 3)
    carry, _ = stack_fuse_stream(None, torch.randn(2, 1, 3, 4), weights, 2)
    with pytest.raises(ValueError, match="K, B or D"):
        stack_fuse_stream(carry, torch.randn(2, 2, 3, 4), weights, 2)
    with pytest.raises(ValueError, match="float64"):
        stack_fuse_stream(carry, torch.randn(2, 1, 3, 4, dtype=torch.float64), weights, 2)
    with pytest.raises(ValueError, match="stack"):
        stack_fuse_stream(carry, torch.randn(2, 1, 3, 4), weights, 0)


def test_streamed_gradients_equal_offline():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 2, 13, 4, generator=gen, requires_grad=True)
    weights = torch.softmax(torch.randn(3, generator=gen), 0).requires_grad_()
    got, _ = stream(hidden, weights, 4, [5, 0, 2, 6])
    probe = torch.randn(got.shape, generator=gen)
    streamed = torch.autograd.grad((got * probe).sum(), (hidden, weights))
    offline = torch.autograd.grad((stack_fuse(hidden, weights, 4) * probe).sum(), (hidden, weights))
    torch.testing.assert_close(streamed, offline)


def test_stream_on_triton_path(monkeypatch):
    pytest.importorskip("triton")
    from kernels import triton_stack_fuse as tsf

    device = TEST_DEVICE  # cpu: the interpreter; cuda: the compiled kernel
    if device.type == "cpu" and not tsf.interpreting():  # pragma: no cover
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    monkeypatch.setenv("NESTVOX_STACK_FUSE", "triton")
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 3, 27, 33, generator=gen).to(device)
    weights = torch.softmax(torch.randn(4, generator=gen), 0).to(device)
    got, _ = stream(hidden, weights, 8, [1, 0, 9, 8, 3, 6])
    torch.testing.assert_close(got, stack_fuse_reference_cpu(hidden, weights, 8).to(device), rtol=1e-5, atol=1e-6)


def stack_fuse_reference_cpu(hidden, weights, S):
    from kernels import stack_fuse_reference

    return stack_fuse_reference(hidden.cpu(), weights.cpu(), S)
