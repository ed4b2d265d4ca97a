"""Anderson-mixed Highway-BP (`Highway(k, anderson=m)`, `FixedPoint(k, anderson=m)`) against an
independent dense reference: explicit Jacobian matrices (the K_i and J_i of every layer, by
torch.autograd.functional.jacobian), the map F(w) = w^0 + N w formed row by row from them, and
Anderson's update written in its difference form (Walker & Ni 2011: gamma = argmin
||r_j - dR gamma||, x = f_j - dF gamma), not the library's constrained Gram solve. Plus the
mixer's own rules (restart, safeguard, exactness frontier), on hand-built inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import highwaybp as hbp
from highwaybp.core.anderson import AndersonMixer
from tests.core.helpers import make_chain
from tests.core.test_paths import layer_matrices, upstream


# ---- the dense reference -------------------------------------------------------------------
def dense_map(mats, g, keeps_residual=True):
    """(w0, F) for the iteration on explicit matrices: states are [L+1, n] float64 arrays."""
    num_layers = len(mats)
    ks = [k.numpy() for k, _ in mats]
    js = [j.numpy() for _, j in mats]
    if not keeps_residual:  # FixedPoint: K = 0, J = the whole layer Jacobian
        js = [k + j for k, j in zip(ks, js)]
        ks = [np.zeros_like(k) for k in ks]
    g = np.stack([t.numpy() for t in g])

    def scan(v):
        y = v.copy()
        for i in range(num_layers - 1, -1, -1):
            y[i] = v[i] + y[i + 1] @ ks[i]
        return y

    def block(w):
        v = np.zeros_like(w)
        for i in range(num_layers):
            v[i] = w[i + 1] @ js[i]
        return v

    w0 = scan(g)
    return w0, lambda w: w0 + scan(block(w))


COND_LIMIT = 0.01 / np.finfo(np.float64).eps  # the library's default for float64


def dense_anderson(w0, F, k, m, cond_limit=COND_LIMIT):
    """k iterations of type-II Anderson in the difference form, window m, with the same
    restart rule on the unit-diagonal Gram of the window's residuals (no regularisation)."""
    x = w0
    fs, rs = [], []
    for _ in range(k):
        f = F(x)
        r = f - x
        fs.append(f.ravel())
        rs.append(r.ravel())
        fs, rs = fs[-m:], rs[-m:]
        if len(rs) > 1:
            R = np.stack(rs, 1)
            gram = R.T @ R
            d = np.sqrt(np.diag(gram))
            eig = np.linalg.eigvalsh(gram / np.outer(d, d))
            if not eig[0] > 0 or eig[-1] / eig[0] > cond_limit:
                fs, rs = fs[-1:], rs[-1:]
        if len(rs) == 1:
            x = fs[-1].reshape(w0.shape)
            continue
        dR = np.diff(np.stack(rs, 1), axis=1)
        dF = np.diff(np.stack(fs, 1), axis=1)
        gamma = np.linalg.lstsq(dR, rs[-1], rcond=None)[0]
        x = (fs[-1] - dF @ gamma).reshape(w0.shape)
    return x


def exact_dense(w0, F, num_layers):
    x = w0
    for _ in range(num_layers):
        x = F(x)
    return x


CHAINS = [["identity"] * 6, ["relu", "gated", "scaled", "relu", "identity", "gated", "relu"]]


@pytest.mark.parametrize("kinds", CHAINS)
@pytest.mark.parametrize("per_layer_loss", [False, True])
@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("method_cls", [hbp.Highway, hbp.FixedPoint])
def test_chain_mix_equals_the_dense_reference_at_every_k(kinds, per_layer_loss, m, method_cls):
    torch.manual_seed(11)
    n = 3
    chain = make_chain(kinds, n, scale=2.0).double()  # scale: blocks that matter
    x = torch.randn(1, n, dtype=torch.float64)
    num_layers = len(kinds)
    grad_out, g = upstream(num_layers, n, per_layer_loss)
    mats = layer_matrices(chain, x)
    w0, F = dense_map(mats, g, keeps_residual=method_cls is hbp.Highway)
    exact = exact_dense(w0, F, num_layers)
    differs = 0
    for k in range(num_layers + 2):
        method = method_cls(k=k, anderson=m)
        ws = chain.state_gradients(x, grad_out, method, return_states=per_layer_loss)
        got = torch.stack([w.reshape(-1) for w in ws]).numpy()
        if k >= num_layers:  # plain steps: exact backprop
            np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)
            continue
        want = dense_anderson(w0, F, k, m)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
        plain = torch.stack([w.reshape(-1) for w in chain.state_gradients(
            x, grad_out, method_cls(k=k), return_states=per_layer_loss)]).numpy()
        differs += not np.allclose(got, plain, rtol=1e-6, atol=1e-9)
    assert differs >= 2  # the mix did something: it is not the plain partial sum


CHAIN_OPTIONS = [
    dict(vjp="batched"),
    dict(layerwise_sweeps=True),
    dict(scan="hillis_steele"),
    dict(recompute=False),
]


@pytest.mark.parametrize("options", CHAIN_OPTIONS, ids=lambda o: ",".join(map(str, o.items())))
@pytest.mark.parametrize("per_layer_loss", [False, True])
def test_every_chain_backend_mixes_the_same(options, per_layer_loss):
    """The batched VJP backend (same-function layers), the layer-by-layer sweep, the
    Hillis-Steele scan and recorded graphs equal the dense reference too."""
    torch.manual_seed(12)
    n, num_layers, m = 3, 6, 3
    chain = make_chain(["identity"] * num_layers, n, scale=2.0, **options).double()
    x = torch.randn(1, n, dtype=torch.float64)
    grad_out, g = upstream(num_layers, n, per_layer_loss)
    w0, F = dense_map(layer_matrices(chain, x), g)
    for k in (2, 4):
        ws = chain.state_gradients(x, grad_out, hbp.Highway(k=k, anderson=m),
                                   return_states=per_layer_loss)
        got = torch.stack([w.reshape(-1) for w in ws]).numpy()
        np.testing.assert_allclose(got, dense_anderson(w0, F, k, m), rtol=1e-9, atol=1e-11)


def test_adaptive_mix_is_not_called_exact_at_L():
    """After mixes, L iterations are not exact backprop (the frontier lags): an adaptive
    run that cannot meet tol ends at max_k and applies its fallback, never "exact_after_L"."""
    torch.manual_seed(13)
    num_layers = 5
    chain = make_chain(["relu", "gated", "scaled", "relu", "gated"], 3, scale=2.0).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    grad_out, g = upstream(num_layers, 3, False)
    w0, F = dense_map(layer_matrices(chain, x), g)
    exact = exact_dense(w0, F, num_layers)
    method = hbp.Highway(tol=1e-300, max_k=num_layers, anderson=3, fallback="last")
    ws = chain.state_gradients(x, grad_out, method)
    diag = chain.last_diagnostics
    assert any(diag.mixed) and diag.iterations == num_layers
    assert diag.stop_reason == "max_k" and diag.fallback == "last"
    got = torch.stack([w.reshape(-1) for w in ws]).numpy()
    np.testing.assert_allclose(got, dense_anderson(w0, F, num_layers, 3), rtol=1e-9, atol=1e-11)
    assert not np.allclose(got, exact, rtol=1e-6)
    # the default fallback makes the same run exact
    ws = chain.state_gradients(x, grad_out, hbp.Highway(tol=1e-300, max_k=num_layers,
                                                         anderson=3))
    got = torch.stack([w.reshape(-1) for w in ws]).numpy()
    np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)


def test_mix_is_plain_at_k1_and_differs_from_k2():
    """k = 1 has one F value, nothing to mix: the plain estimate, bit for bit."""
    torch.manual_seed(2)
    chain = make_chain(["relu", "gated", "scaled", "identity"], 4, scale=2.0).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    grad_out = torch.randn(2, 4, dtype=torch.float64)
    a = chain.state_gradients(x, grad_out, hbp.Highway(k=1, anderson=3))
    b = chain.state_gradients(x, grad_out, hbp.Highway(k=1))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    c = chain.state_gradients(x, grad_out, hbp.Highway(k=2, anderson=3))
    d = chain.state_gradients(x, grad_out, hbp.Highway(k=2))
    assert not torch.allclose(c[0], d[0])


# ---- the mixer's rules on hand-built inputs --------------------------------------------------
def _vec(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_safeguard_refuses_a_mix_whose_residual_exceeds_the_plain_step():
    """A heavy Tikhonov term pulls the weights to the average of the window; here that
    average has a larger residual than the newest one, so the mix is refused: the step is
    plain (x = f) and the window restarts. The same inputs with a light term do mix."""
    def run(reg):
        mixer = AndersonMixer(2, _vec(0, 0), num_layers=10, reg=reg)
        x0 = _vec(0.0, 0.0)
        f0 = _vec(4.0, 0.0)  # r0 = (4, 0)
        x1, _ = mixer.step(x0, f0)  # plain: x1 = f0
        x1 = x1.clone()
        f1 = x1 + _vec(0.0, 1.0)  # r1 = (0, 1): much smaller than r0
        return mixer.step(x1, f1), f1

    (x_heavy, heavy), f1 = run(reg=1e6)
    naive = 0.5 * _vec(4.0, 0.0) + 0.5 * _vec(0.0, 1.0)  # what the near-average mix would give
    assert naive.norm() > 1.0  # the naive mix's residual exceeds the plain step's (||r1|| = 1)
    assert heavy.safeguarded and heavy.restarted and not heavy.mixed
    assert torch.equal(x_heavy, f1)
    (_, light), _ = run(reg=1e-14)
    assert light.mixed and not light.safeguarded
    # alpha minimises ||a r0 + (1 - a) r1||: a = 1/17, residual^2 = 16/17 < 1
    a = light.weights[0]
    assert a == pytest.approx(1 / 17, rel=1e-9)


def test_restart_on_an_ill_conditioned_window():
    """Two parallel residuals: the unit-diagonal Gram is singular, the window restarts and
    the step is plain."""
    mixer = AndersonMixer(3, _vec(0, 0, 0), num_layers=10)
    x0 = _vec(0, 0, 0)
    x1, s1 = mixer.step(x0, _vec(1.0, 2.0, 3.0))
    assert not s1.mixed
    x1 = x1.clone()
    f1 = x1 + _vec(2.0, 4.0, 6.0)  # residual parallel to the first
    x2, s2 = mixer.step(x1, f1)
    assert s2.restarted and not s2.safeguarded and not s2.mixed
    assert torch.equal(x2, f1)


def test_frontier_tracks_the_rows_known_exact():
    """Plain steps: frontier j + 1 after j steps (exact at L); a mix takes the smallest
    frontier of the F values it combines."""
    mixer = AndersonMixer(2, _vec(0, 0), num_layers=3)
    assert mixer.frontier == 1
    x, _ = mixer.step(_vec(0, 0), _vec(1.0, 0.0))
    assert mixer.frontier == 2
    x = x.clone()
    x, s = mixer.step(x, x + _vec(0.0, 1.0))
    assert s.mixed and mixer.frontier == 2  # min(2, 3)
    assert not mixer.is_exact


def test_fixed_k_at_or_above_L_runs_plain_steps_and_is_exact():
    torch.manual_seed(5)
    chain = make_chain(["relu", "gated", "scaled"], 3, scale=2.0).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for k in (3, 7):
        chain.record_step_norms = True
        out = chain(x, method=hbp.Highway(k=k, anderson=4))
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        diag = chain.last_diagnostics
        assert diag.anderson == 0 and diag.stop_reason in ("fixed_k", "exact_after_L")
        out = chain(x, method=hbp.Exact())
        (ex,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(gx, ex, rtol=1e-10, atol=1e-12)


def test_adaptive_mix_stops_on_the_residual_and_records_it():
    torch.manual_seed(6)
    chain = make_chain(["relu", "gated", "scaled", "relu", "identity", "gated"], 3,
                       scale=2.0).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 3, dtype=torch.float64)
    method = hbp.Highway(tol=1e-6, max_k=5, anderson=4, fallback="last")
    ws = chain.state_gradients(x, grad_out, method)
    diag = chain.last_diagnostics
    assert diag.anderson == 4 and len(diag.step_norms) == diag.iterations == len(diag.mixed)
    assert any(diag.mixed)
    if diag.stop_reason == "tol":
        assert diag.step_norms[-1] < 1e-6
    else:
        assert diag.stop_reason == "max_k" and min(diag.step_norms) >= 1e-6
    assert len(ws) == 7


def test_anderson_option_validation_and_text():
    assert hbp.Highway(k=3, anderson=5).to_string() == "highway:k=3,anderson=5"
    assert hbp.method_from_string("highway:k=3,anderson=5") == hbp.Highway(k=3, anderson=5)
    assert hbp.method_from_string("fixedpoint:k=2,anderson=3") == hbp.FixedPoint(k=2, anderson=3)
    assert hbp.Highway(k=3).to_string() == "highway:k=3"
    with pytest.raises(ValueError, match="anderson=0"):
        hbp.Highway(k=3, anderson=1)
    with pytest.raises(ValueError, match="window"):
        hbp.FixedPoint(k=3, anderson=-2)
    with pytest.raises(TypeError, match="anderson"):
        hbp.Highway(k=3, anderson=2.0)


def test_best_fallback_returns_F_of_the_best_measured_iterate():
    """fallback="best": F(x) of the iteration whose relative residual was smallest, from the
    dense reference's own iterates."""
    num_layers, m, k = 8, 2, 7
    for seed in range(40):  # a chain whose residual is not smallest at the last iteration
        torch.manual_seed(seed)
        chain = make_chain(["identity"] * num_layers, 3, scale=4.0).double()
        x = torch.randn(1, 3, dtype=torch.float64)
        grad_out, g = upstream(num_layers, 3, False)
        w0, F = dense_map(layer_matrices(chain, x), g)
        rel = [np.linalg.norm(F(xj) - xj) / np.linalg.norm(F(xj)) for xj in
               [w0, *(dense_anderson(w0, F, j, m) for j in range(1, k))]]
        if int(np.argmin(rel)) != k - 1:
            break
    ws = chain.state_gradients(x, grad_out, hbp.Highway(tol=1e-300, max_k=k, anderson=m,
                                                        fallback="best"))
    diag = chain.last_diagnostics
    assert diag.fallback == "best" and diag.iterations == k
    # the reference: F values and relative residuals of its iterates x_0 .. x_{k-1}
    fs, rel = [], []
    for j in range(k):
        xj = w0 if j == 0 else dense_anderson(w0, F, j, m)
        fj = F(xj)
        fs.append(fj)
        rel.append(np.linalg.norm(fj - xj) / np.linalg.norm(fj))
    np.testing.assert_allclose(diag.step_norms, rel, rtol=1e-8)
    best = int(np.argmin(rel))
    assert best != k - 1  # the case is not trivial: the last iterate is not the best
    got = torch.stack([w.reshape(-1) for w in ws]).numpy()
    np.testing.assert_allclose(got, fs[best], rtol=1e-9, atol=1e-11)


def test_mixed_estimate_is_homogeneous_even_when_float32_products_overflow():
    """The weights do not depend on the gradient's scale, so est(s g) = s est(g); at s = 1e30
    float32 inner products overflow (per element ~1e60) and are redone in float64 rather
    than turning the mix off."""
    torch.manual_seed(22)
    chain = make_chain(["relu", "gated", "scaled", "relu", "identity", "gated"], 4, scale=2.0)
    x = torch.randn(2, 4)
    grad_out = torch.randn(2, 4)
    method = hbp.Highway(k=4, anderson=3)
    small = chain.state_gradients(x, grad_out, method)
    assert any(chain.last_diagnostics.mixed)
    big = chain.state_gradients(x, grad_out * 1e30, method)
    diag = chain.last_diagnostics
    assert diag.mixed == [False, True, True, True]
    assert all(np.isfinite(diag.step_norms))
    for a, b in zip(small, big):
        torch.testing.assert_close(b / 1e30, a, rtol=1e-4, atol=1e-6)


def test_half_precision_states_still_mix():
    """bfloat16 states: inner products in float32 (the restart threshold of bfloat16's own
    eps would be ~1.3 and restart nearly every step)."""
    torch.manual_seed(23)
    chain = make_chain(["identity"] * 6, 8, scale=2.0).to(torch.bfloat16)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    grad_out = torch.randn(4, 8, dtype=torch.bfloat16)
    chain.state_gradients(x, grad_out, hbp.Highway(k=5, anderson=3))
    diag = chain.last_diagnostics
    assert diag.mixed[1:] == [True] * 4 and diag.restarts == 0
