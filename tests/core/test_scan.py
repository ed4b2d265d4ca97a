"""The stacked scans (sequential, Hillis-Steele, blocked) agree with each other and with a
float64 loop; the list scan too."""

from __future__ import annotations

import pytest
import torch

from highwaybp.core.scan import (
    get_scan,
    reverse_scan,
    reverse_scan_blocked,
    reverse_scan_hillis_steele,
    reverse_scan_list,
    reverse_scan_sequential,
)

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def loop_reference(x, a):
    """Plain float64 recurrence: y_{N-1} = x_{N-1}, y_i = x_i + a_i y_{i+1}."""
    x64 = x.double()
    a64 = torch.ones_like(x64) if a is None else a.double().expand_as(x64)
    ys = [x64[-1]]
    for i in range(x.shape[0] - 2, -1, -1):
        ys.append(x64[i] + a64[i] * ys[-1])
    return torch.stack(ys[::-1])


def coefficients(kind, shape, dtype, gen):
    if kind == "none":
        return None
    if kind == "near0":
        return torch.rand(shape, generator=gen, dtype=dtype) * 1e-3
    if kind == "near1":
        return 1 - torch.rand(shape, generator=gen, dtype=dtype) * 1e-3
    if kind == "scalar":  # one coefficient per index, broadcast over the state
        return torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen, dtype=dtype)
    return torch.rand(shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
@pytest.mark.parametrize("kind", ["none", "uniform", "near0", "near1", "scalar"])
def test_scans_agree(dtype, n, kind):
    gen = torch.Generator().manual_seed(n)
    shape = (n, 3, 5)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    a = coefficients(kind, shape, dtype, gen)
    expected = loop_reference(x, a).to(dtype)
    seq = reverse_scan_sequential(x, a)
    hs = reverse_scan_hillis_steele(x, a)
    torch.testing.assert_close(seq, expected, **TOL[dtype])
    torch.testing.assert_close(hs, expected, **TOL[dtype])
    for block in (None, 1, 2, 5, n + 3):  # default ~log2 N; degenerate, padded, one block
        got = reverse_scan_blocked(x, a, block)
        assert got.shape == x.shape
        torch.testing.assert_close(got, expected, **TOL[dtype])
    assert torch.isfinite(hs).all() and torch.isfinite(seq).all()


def test_last_coefficient_is_never_read():
    x = torch.randn(5, 4, dtype=torch.float64)
    a = torch.rand(5, 4, dtype=torch.float64)
    b = a.clone()
    b[-1] = float("nan")
    for scan in (reverse_scan_sequential, reverse_scan_hillis_steele, reverse_scan_blocked):
        torch.testing.assert_close(scan(x, a), scan(x, b))


def test_long_products_do_not_underflow():
    # Gates near 0 over a long sequence: a cumprod-based scan would divide by 0 here.
    n = 2000
    x = torch.randn(n, 8)
    a = torch.full((n, 8), 1e-3)
    for scan in (reverse_scan_sequential, reverse_scan_hillis_steele, reverse_scan_blocked):
        y = scan(x, a)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, loop_reference(x, a).float(), rtol=1e-5, atol=1e-5)


def test_list_scan_matches_stacked_scan_with_diagonal_maps():
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    a = torch.rand(6, 2, 3, dtype=torch.float64)
    maps = [(lambda v, i=i: a[i] * v) for i in range(6)]
    ys = reverse_scan_list(list(x.unbind(0)), maps)
    torch.testing.assert_close(torch.stack(ys), reverse_scan_sequential(x, a))


def test_default_scan_and_registry():
    x = torch.randn(4, 3)
    torch.testing.assert_close(reverse_scan(x), reverse_scan_sequential(x))
    assert get_scan(None) is reverse_scan_sequential
    assert get_scan("hillis_steele") is reverse_scan_hillis_steele
    assert get_scan("blocked") is reverse_scan_blocked
    with pytest.raises(ValueError, match="unknown scan"):
        get_scan("nope")


def test_scan_rejects_bad_shapes():
    with pytest.raises(ValueError, match="coefficients"):
        reverse_scan_sequential(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="non-empty"):
        reverse_scan_sequential(torch.randn(0, 3))
    with pytest.raises(RuntimeError):
        reverse_scan_hillis_steele(torch.randn(4, 3), torch.randn(4, 2))


def test_in_place_list_scan_equals_the_reference():
    from highwaybp.core.scan import reverse_scan_list_

    shapes = [(2, 6), (2, 6), (2, 3), (2, 3)]
    xs = [torch.randn(s, dtype=torch.float64) for s in shapes]
    maps = [None, lambda v: v[:, :3].repeat(1, 2) * 0.5, lambda v: -v, None]
    expected = reverse_scan_list([x.clone() for x in xs], maps)
    result = reverse_scan_list_(xs, maps)
    assert result is xs
    for a, b in zip(result, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["none", "uniform", "scalar"])
def test_hillis_steele_holds_two_buffers_not_a_clone_per_round(kind):
    """Lean scan: the result and one spare buffer (plus the coefficients in their own
    broadcast shape, twice). The clone-per-round version held 3-5 copies of the state."""
    from highwaybp.bench.tensor_memory import TensorMemory

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=gen, dtype=torch.float64)
    a = coefficients(kind, (64, 1000), torch.float64, gen)
    a_bytes = 0 if a is None else a.numel() * a.element_size()
    with TensorMemory() as mem:
        y = reverse_scan_hillis_steele(x, a)
    assert mem.peak_bytes <= 2 * x.numel() * x.element_size() + 2 * a_bytes + 64
    torch.testing.assert_close(y, loop_reference(x, a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["none", "uniform", "scalar"])
def test_hillis_steele_leaves_inputs_alone_and_is_differentiable(kind):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 3, 4, generator=gen, dtype=torch.float64).transpose(1, 2)  # strided
    a = coefficients(kind, (11, 4, 3), torch.float64, gen)
    x0, a0 = x.clone(), None if a is None else a.clone()
    torch.testing.assert_close(reverse_scan_hillis_steele(x, a), loop_reference(x, a))
    assert torch.equal(x, x0) and (a is None or torch.equal(a, a0))
    xg = x.clone().requires_grad_(True)
    ag = None if a is None else a.clone().requires_grad_(True)
    leaves = [xg] if ag is None else [xg, ag]
    w = torch.randn(11, 4, 3, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((reverse_scan_hillis_steele(xg, ag) * w).sum(), leaves)
    want = torch.autograd.grad((reverse_scan_sequential(xg, ag) * w).sum(), leaves)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["none", "uniform", "scalar"])
def test_blocked_scan_leaves_inputs_alone_and_is_differentiable(kind):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(13, 3, 4, generator=gen, dtype=torch.float64).transpose(1, 2)  # strided
    a = coefficients(kind, (13, 4, 3), torch.float64, gen)
    x0, a0 = x.clone(), None if a is None else a.clone()
    torch.testing.assert_close(reverse_scan_blocked(x, a), loop_reference(x, a))
    assert torch.equal(x, x0) and (a is None or torch.equal(a, a0))
    xg = x.clone().requires_grad_(True)
    ag = None if a is None else a.clone().requires_grad_(True)
    leaves = [xg] if ag is None else [xg, ag]
    w = torch.randn(13, 4, 3, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((reverse_scan_blocked(xg, ag) * w).sum(), leaves)
    want = torch.autograd.grad((reverse_scan_sequential(xg, ag) * w).sum(), leaves)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_blocked_scan_is_log_depth():
    """O(log N) ops, not O(N): the op count at N = 4096 is at most 3x that at N = 64
    (a sequential scan's is 64x)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for n in (64, 4096):
        x, a = torch.randn(n, 2), torch.rand(n, 2)
        Count.n = 0
        with Count():
            reverse_scan_blocked(x, a)
        counts[n] = Count.n
    assert counts[4096] <= 3 * counts[64], counts
