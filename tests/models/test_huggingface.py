"""from_huggingface: Highway-BP through tiny GPT-2 / RoBERTa / BERT built from configs."""

from __future__ import annotations

import copy

import pytest
import torch

import highwaybp as hbp
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
    # A filled KV cache cannot be trained through.
    ids = torch.randint(0, V, (1, 4))
    with torch.no_grad():
        past = gpt(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="use_cache=False"):
        gpt(ids[:, -1:], past_key_values=past, use_cache=True)
    with pytest.warns(UserWarning, match="use_cache=False"):
        gpt(ids, use_cache=True).logits.sum().backward()
