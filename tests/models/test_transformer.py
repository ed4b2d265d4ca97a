"""Transformers: pre-LN GPT and post-LN encoder are exact at k = L; gamma = 1 is FixedPoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import highwaybp as hbp
from highwaybp.models.transformer import GPT, EncoderClassifier, FeedForward, PostLNBlock

V, T, B = 11, 5, 3


def _gpt(**kw):
    torch.manual_seed(0)
    return GPT(V, block_size=8, d_model=16, n_layer=2, n_head=2, **kw).double()


def _encoder(**kw):
    torch.manual_seed(0)
    return EncoderClassifier(V, 3, max_len=8, d_model=16, n_layer=2, n_head=2, **kw).double()


def _ids(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def _grads(model, method, seed=0):
    """Gradients of a loss w.r.t. the chain input h_0 and every parameter."""
    ids = _ids()
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with hbp.use_method(model, method):
        if isinstance(model, GPT):
            h0 = model.embed(ids)
            h0.retain_grad()
            logits = model.lm_head(model.ln_f(model.chain(h0)))
            loss = F.cross_entropy(logits.reshape(-1, V), ids.roll(1, 1).reshape(-1))
        else:
            h0 = model.drop(model.emb_ln(model.tok(ids) + model.pos(torch.arange(T))))
            h0.retain_grad()
            logits = model.head(model.chain(h0)[:, 0])
            loss = F.cross_entropy(logits, torch.arange(B) % 3)
    loss.backward()
    return [h0.grad] + [p.grad for p in model.parameters()]


MODELS = {
    "gpt": lambda **kw: _gpt(**kw),
    "encoder": lambda **kw: _encoder(**kw),
    "encoder_no_affine": lambda **kw: _encoder(layer_norm_affine=False, **kw),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_highway_k_equals_L_is_exact(name, dropout):
    model = MODELS[name](dropout=dropout)
    assert model.num_layers == 4
    exact = _grads(model, hbp.Exact())
    highway = _grads(model, hbp.Highway(k=model.num_layers))
    for g_e, g_h in zip(exact, highway):
        assert g_e is not None and g_h is not None
        torch.testing.assert_close(g_h, g_e, atol=1e-9, rtol=1e-9)
    low = _grads(model, hbp.Highway(k=0))
    assert max(float((a - b).abs().max()) for a, b in zip(low, exact)) > 1e-8


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gamma_one_highway_equals_fixedpoint(name):
    model = MODELS[name](gamma=1.0)
    for k in (0, 1, 2):
        hw = _grads(model, hbp.Highway(k=k))
        fp = _grads(model, hbp.FixedPoint(k=k))
        for a, b in zip(hw, fp):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_gamma_does_not_change_the_function():
    ids = _ids()
    outs = []
    for gamma in (0.0, 0.2, 1.0):
        outs.append(_gpt(gamma=gamma)(ids))
    for gamma in (0.0, 0.8, 1.0):
        outs.append(_encoder(gamma=gamma)(ids))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[4], outs[3], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[5], outs[3], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_post_ln_rewrite_matches_layer_norm(affine):
    torch.manual_seed(0)
    block = PostLNBlock(FeedForward(16), 16, gamma=0.8, affine=affine).double()
    if affine:
        with torch.no_grad():
            block.ln.weight.uniform_(0.5, 1.5)
            block.ln.bias.normal_()
    x = torch.randn(B, T, 16, dtype=torch.float64)
    a, b = block(x)
    assert a.shape == ((B, T, 16) if affine else (B, T, 1))  # per-token K without affine
    ref = F.layer_norm(x + block.sub(x), (16,), block.ln.weight, block.ln.bias, block.ln.eps)
    torch.testing.assert_close(a * x + b, ref, atol=1e-12, rtol=1e-12)


def test_bad_gamma_and_inputs():
    with pytest.raises(ValueError, match="gamma"):
        GPT(V, gamma=1.5)
    with pytest.raises(ValueError, match="block_size"):
        _gpt()(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPT(V, d_model=10, n_head=3)
