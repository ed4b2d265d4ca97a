"""from_huggingface: Highway-BP through tiny GPT-2 / RoBERTa / BERT built from configs."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import highwaybp as hbp
from highwaybp import _compat
from highwaybp.models.huggingface import from_huggingface, highway_stack

transformers = pytest.importorskip("transformers")

V, T, B = 13, 6, 3


def _gpt2(dropout=0.0):
    cfg = transformers.GPT2Config(
        vocab_size=V,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def _encoder(kind, dropout=0.0):
    cls = {"roberta": transformers.RobertaConfig, "bert": transformers.BertConfig}[kind]
    cfg = cls(
        vocab_size=V + 3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    model_cls = {
        "roberta": transformers.RobertaForSequenceClassification,
        "bert": transformers.BertForSequenceClassification,
    }[kind]
    return model_cls(cfg).double()


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0  # padding in one sequence: the mask must reach every re-run block
    return ids, emb, mask


def _grads(model, method, kind, seed=0):
    ids, emb, mask = _inputs(model)
    emb = emb.detach().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with hbp.use_method(model, method):
        if kind == "gpt2":
            out = model(inputs_embeds=emb, attention_mask=mask, labels=ids, use_cache=False)
        else:
            out = model(inputs_embeds=emb, attention_mask=mask, labels=torch.arange(B) % 3)
    out.loss.backward()
    return [emb.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "kind,dropout", [("gpt2", 0.0), ("gpt2", 0.1), ("roberta", 0.1), ("bert", 0.1)]
)
def test_k_equals_L_matches_plain_autograd(kind, dropout):
    model = _gpt2(dropout) if kind == "gpt2" else _encoder(kind, dropout)
    model.train()
    reference = copy.deepcopy(model)  # never converted: plain transformers + autograd
    names_before = [n for n, _ in model.named_parameters()]
    from_huggingface(model)
    assert [n for n, _ in model.named_parameters()] == names_before  # state_dict unchanged
    stack = highway_stack(model)
    L = 2 * len(stack)
    # Reference: plain transformers (no highwaybp involved at all).
    ids, emb, mask = _inputs(reference)
    torch.manual_seed(0)
    if kind == "gpt2":
        out = reference(inputs_embeds=emb, attention_mask=mask, labels=ids, use_cache=False)
    else:
        out = reference(inputs_embeds=emb, attention_mask=mask, labels=torch.arange(B) % 3)
    out.loss.backward()
    expected = [emb.grad] + [p.grad for p in reference.parameters()]

    exact = _grads(model, hbp.Exact(), kind)
    highway = _grads(model, hbp.Highway(k=L), kind)
    assert stack.last_diagnostics.iterations == L
    assert expected[0] is not None
    assert sum(g is not None for g in expected) >= len(expected) - 1  # word emb unused
    for g_ref, g_e, g_h in zip(expected, exact, highway):
        if g_ref is None:  # the token embedding is unused with inputs_embeds
            assert g_e is None and g_h is None
            continue
        torch.testing.assert_close(g_e, g_ref, atol=0, rtol=0)  # Exact = the original blocks
        torch.testing.assert_close(g_h, g_ref, atol=1e-9, rtol=1e-9)
    low = _grads(model, hbp.Highway(k=0), kind)
    pairs = [(a, b) for a, b in zip(low, expected) if b is not None]
    assert max(float((a - b).abs().max()) for a, b in pairs) > 1e-8


@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_gamma_one_is_fixedpoint(kind):
    model = _gpt2() if kind == "gpt2" else _encoder(kind)
    from_huggingface(model, gamma=1.0)
    for k in (0, 2):
        hw = _grads(model, hbp.Highway(k=k), kind)
        fp = _grads(model, hbp.FixedPoint(k=k), kind)
        for a, b in zip(hw, fp):
            if a is None:
                assert b is None
                continue
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_defaults_and_errors():
    gpt = from_huggingface(_gpt2(), method=hbp.Highway(k=1))
    assert highway_stack(gpt).gamma == 0.2 and highway_stack(gpt).kind == "gpt2"
    rob = from_huggingface(_encoder("roberta"))
    assert highway_stack(rob).gamma == 0.8 and highway_stack(rob).kind == "bert"
    from_huggingface(rob, gamma=0.5)  # a second call re-configures
    assert highway_stack(rob).gamma == 0.5
    with pytest.raises(TypeError, match="GPT-2"):
        from_huggingface(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="gamma"):
        from_huggingface(_gpt2(), gamma=2.0)
    # A cache requested but not filled: a warning, once.
    with pytest.warns(UserWarning, match="use_cache=False"):
        gpt(torch.randint(0, V, (1, 4)), use_cache=True).logits.sum().backward()


# ---------------------------------------------------------------------------------------
# The KV cache, whatever this transformers release calls it (layer_past, past_key_value,
# past_key_values, cache), and the tuple/tensor block returns of 4.x and 5.x.
# Run against both ends of the tested range: constraints/lowest.txt and newest.txt.
# ---------------------------------------------------------------------------------------


def _decoder(kind):
    """A tiny causal LM that fills a KV cache: GPT-2, or BERT as a decoder."""
    if kind == "gpt2":
        return _gpt2()
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        is_decoder=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertLMHeadModel(cfg).double()


def _cache_name(model):
    """The model's keyword for the KV cache in this release (5.24 renamed it to `cache`)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prefill(model, ids):
    """A KV cache filled with `ids` (a fresh one per call: a Cache object is grown in place)."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return next(v for k, v in out.items() if k in ("cache", "past_key_values"))


def _logits_with_cache(model, prompt, new, **kw):
    name = _cache_name(model)
    return model(new, **{name: _prefill(model, prompt)}, use_cache=True, **kw).logits


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_filled_cache_is_refused_under_highway_and_exact_elsewhere(kind, chunk):
    """Fails on eab6026 (before this fix): with transformers 5.24 the block takes the cache as
    `cache`, the stack looked for `past_key_values` only and computed logits without the cached
    tokens (a 3-token chunk crashed inside sdpa); with 4.40 it crashed (GPT-2: unexpected
    keyword `past_key_values`) or took row 0 of the batch (BERT, tuple returns)."""
    model = _decoder(kind)
    reference = copy.deepcopy(model)  # never converted
    from_huggingface(model, method=hbp.Highway(k=1))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (2, 5), generator=g)
    new = torch.randint(0, V, (2, chunk), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated argument name of ours
        with torch.no_grad():
            expected = _logits_with_cache(reference, prompt, new)
        # Training through a filled cache: refused, whatever the argument is called.
        with pytest.raises(ValueError, match="filled KV cache"):
            _logits_with_cache(model, prompt, new)
        # Generation (no gradients): the original blocks run, the cache is used.
        with torch.no_grad():
            torch.testing.assert_close(
                _logits_with_cache(model, prompt, new), expected, atol=0, rtol=0
            )
        with hbp.use_method(model, hbp.Exact()):
            torch.testing.assert_close(
                _logits_with_cache(model, prompt, new), expected, atol=0, rtol=0
            )
    # The cached logits are those of the whole sequence: the test can tell a cache that was
    # dropped (as eab6026 did under 5.24) from one that was used.
    with torch.no_grad():
        full = reference(torch.cat([prompt, new], dim=1), use_cache=False).logits[:, -chunk:]
        no_cache = reference(new, use_cache=False).logits
    torch.testing.assert_close(expected, full)
    assert float((no_cache - expected).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "bert", "roberta"])
def test_highway_forward_matches_and_warns_nothing(kind):
    """Fails on eab6026 (before this fix): under 5.24 every GPT-2 forward passed the deprecated
    `past_key_values` and emitted a FutureWarning; under 4.40 it crashed (GPT-2) or returned
    row 0 of the batch (BERT/RoBERTa blocks return tuples there)."""
    model = _decoder(kind) if kind != "roberta" else _encoder(kind, dropout=0.0)
    reference = copy.deepcopy(model)
    from_huggingface(model, method=hbp.Highway(k=1))
    ids = torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(ids, use_cache=False) if kind != "roberta" else model(ids)
        out.logits.sum().backward()
    expected = reference(ids, use_cache=False) if kind != "roberta" else reference(ids)
    # The forward of the chain is the model's forward (only the backward is approximate).
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-12, rtol=1e-12)
    assert highway_stack(model).last_diagnostics is not None


def test_conversion_leaves_the_rng_alone():
    """from_huggingface calls one block on a dummy input to learn its return convention: the
    random stream (dropout) the user sees must not move."""
    model = _gpt2(dropout=0.5)
    model.train()
    torch.manual_seed(7)
    from_huggingface(model, method=hbp.Highway(k=1))
    after = torch.rand(3)
    torch.manual_seed(7)
    torch.testing.assert_close(after, torch.rand(3), atol=0, rtol=0)


def _pretend_installed(monkeypatch, name, version):
    real = _compat.installed_version
    monkeypatch.setattr(
        _compat, "installed_version", lambda n: version if n == name else real(n)
    )


@pytest.mark.parametrize("installed", ["4.39.3", "3.5.1"])
def test_older_transformers_is_refused(installed, monkeypatch):
    """Fails on eab6026 (before the range check): any transformers release was run. Older
    than the tested range: an error that says what to do."""
    _pretend_installed(monkeypatch, "transformers", installed)
    monkeypatch.delenv(_compat.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(_compat.UntestedVersionError) as error:
        from_huggingface(_gpt2())
    message = str(error.value)
    assert f"transformers {installed} is installed" in message
    assert _compat.specifier("transformers") in message
    assert _compat.ALLOW_UNTESTED_ENV in message
    # The explicit opt-in turns the refusal into a warning; the model is converted.
    monkeypatch.setenv(_compat.ALLOW_UNTESTED_ENV, "1")
    monkeypatch.setattr(_compat, "_warned", set())
    with pytest.warns(RuntimeWarning, match=f"transformers {installed} is installed"):
        model = from_huggingface(_gpt2())
    assert highway_stack(model).kind == "gpt2"


def _adapt_recording(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_huggingface(model, **kwargs)
    return [w for w in caught if issubclass(w.category, _compat.UntestedVersionWarning)]


@pytest.mark.parametrize("installed", ["5.25.0", "5.25.0.dev0", "6.0.0"])
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_newer_transformers_is_checked_and_adapted_with_one_warning(installed, kind,
                                                                    monkeypatch):
    """Failed before issue 21 (a newer release was refused by its number): the probe runs
    the model's own block loop and the adapted one, they agree, so the model is adapted,
    with one warning that names the release; the converted model trains as usual."""
    _pretend_installed(monkeypatch, "transformers", installed)
    monkeypatch.delenv(_compat.ALLOW_UNTESTED_ENV, raising=False)
    model = _gpt2() if kind == "gpt2" else _encoder("bert")
    reference = copy.deepcopy(model)
    rng = torch.get_rng_state()
    caught = _adapt_recording(model, method=hbp.Highway(k=1))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"transformers {installed} is newer than the tested range" in message
    assert "Highway(k=4) gradient within" in message
    assert highway_stack(model).kind == kind
    assert highway_stack(model).method == hbp.Highway(k=1)
    # The probe leaves the model, its mode and the random stream as they were.
    torch.testing.assert_close(torch.get_rng_state(), rng, atol=0, rtol=0)
    assert model.training == reference.training
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)
        assert p.grad is None, name


def _scale_output(monkeypatch, cls, factor, gradient_only=False):
    """Plant an incompatibility in the adapted block loop: one sub-layer's output (or only
    its gradient) scaled, as a changed block convention would."""
    forward = cls.forward

    def patched(self, x):
        z = forward(self, x)
        z, rest = (z[0], z[1:]) if isinstance(z, tuple) else (z, None)
        z = z + (factor - 1) * (z - z.detach() if gradient_only else z)
        return z if rest is None else (z, *rest)

    monkeypatch.setattr(cls, "forward", patched)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_newer_transformers_with_a_different_block_loop_is_refused(kind, monkeypatch):
    """A planted incompatibility (the adapted MLP / feed-forward's output scaled by 1.01):
    on a newer release the probe sees the forward differ and refuses, naming it."""
    from highwaybp.models import huggingface

    _pretend_installed(monkeypatch, "transformers", "5.25.0")
    cls = huggingface._GPT2MLP if kind == "gpt2" else huggingface._BertFeedForward
    _scale_output(monkeypatch, cls, 1.01)
    model = _gpt2() if kind == "gpt2" else _encoder("bert")
    with pytest.raises(_compat.UntestedVersionError) as error:
        from_huggingface(model, method=hbp.Highway(k=1))
    message = str(error.value)
    assert "transformers 5.25.0 is newer than the tested range" in message
    assert "the last hidden state differs by" in message
    assert highway_stack(model, required=False) is None  # refused: nothing swapped in


def test_newer_transformers_with_a_different_gradient_is_refused(monkeypatch):
    """The forward unchanged, the adapted attention's gradient scaled by 1.5: the
    Highway(k = L) gradient differs from exact backprop's, and the message names the
    parameter where it differs most."""
    from highwaybp.models import huggingface

    _pretend_installed(monkeypatch, "transformers", "6.0.0")
    _scale_output(monkeypatch, huggingface._GPT2Attention, 1.5, gradient_only=True)
    model = _gpt2()
    with pytest.raises(_compat.UntestedVersionError,
                       match=r"Highway\(k=4\) gradient of transformer\.h\.\d\..* differs "
                             r"from exact backprop's by"):
        from_huggingface(model, method=hbp.Highway(k=1))


def test_a_loop_that_raises_on_a_newer_release_is_refused(monkeypatch):
    """A changed call convention makes the adapted loop raise: refused, the error named."""
    from highwaybp.models import huggingface

    _pretend_installed(monkeypatch, "transformers", "5.25.0")

    def broken(self, hidden_states, *args, **kwargs):
        raise TypeError("unexpected keyword argument 'cache_position'")

    monkeypatch.setattr(huggingface.HighwayStack, "_run_chain", broken)
    with pytest.raises(_compat.UntestedVersionError,
                       match="the adapted loop raised TypeError: unexpected keyword"):
        from_huggingface(_gpt2(), method=hbp.Highway(k=1))


def test_inside_the_tested_range_no_probe_runs(monkeypatch):
    """A tested release is adapted as before: no probe (nothing changes), no warning."""
    from highwaybp.models import huggingface

    _pretend_installed(monkeypatch, "transformers", "5.24.0")

    def fail(*args, **kwargs):
        raise AssertionError("the probe ran inside the tested range")

    monkeypatch.setattr(huggingface, "self_check", fail)
    assert _adapt_recording(_gpt2(), method=hbp.Highway(k=1)) == []


@pytest.mark.parametrize("installed", ["4.40.0", "5.24.0"])
def test_tested_ends_are_accepted(installed, monkeypatch):
    _pretend_installed(monkeypatch, "transformers", installed)
    monkeypatch.delenv(_compat.ALLOW_UNTESTED_ENV, raising=False)
    assert highway_stack(from_huggingface(_gpt2())).kind == "gpt2"


def test_head_mask_is_refused_under_highway():
    """transformers 4.x passes one head mask per layer, which one chain cannot honour."""
    model = from_huggingface(_gpt2(), method=hbp.Highway(k=1))
    if "head_mask" not in inspect.signature(model.forward).parameters:
        pytest.skip(f"transformers {transformers.__version__} has no head_mask")
    head_mask = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="head_mask"):
        model(torch.randint(0, V, (1, 4)), head_mask=head_mask, use_cache=False)
