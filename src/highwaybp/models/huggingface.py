"""Highway-BP through the residual stack of a Hugging Face `transformers` model.

    model = GPT2LMHeadModel(GPT2Config(...))
    highwaybp.from_huggingface(model, gamma=0.2, method=highwaybp.Highway(k=3))
    model(input_ids, labels=input_ids, use_cache=False).loss.backward()

`from_huggingface` finds the stack of transformer blocks (`transformer.h` of GPT-2,
`encoder.layer` of BERT/RoBERTa) and swaps the `nn.ModuleList` holding it for a
`HighwayStack` that holds the *same* block modules (so parameter names, `state_dict`,
`save_pretrained` and weight loading are unchanged). When the model's forward loops over
the stack with gradients enabled and a non-exact method, the stack runs as one
`ResidualChain` of 2 * n_layer sub-layers (attention, MLP), cast as in the paper:

- GPT-2 (pre-LN): g(x) = Sub(LN(x)) + gamma x, residual Scaled(1 - gamma), K = (1 - gamma) I
  (default gamma = 0.2);
- BERT/RoBERTa (post-LN): LN(x + Sub(x)) = a' x + b', residual Gated(),
  K = diag((1 - gamma) alpha / sigma) per token (default gamma = 0.8).

Everything else (embeddings, final LN, heads, the loss) stays with autograd. With
`Exact()` or under `torch.no_grad()` the original blocks run unchanged (bit-identical).

Limits: no KV cache contents (training only; a non-empty cache raises, an empty one is
left unfilled), no cross-attention, and `output_hidden_states`/`output_attentions` are not
recorded for the stack under Highway/FixedPoint. Tested with transformers 5.x.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from typing import Any, Optional

from torch import Tensor, nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.iteration import Diagnostics
from highwaybp.core.methods import Exact, Method
from highwaybp.core.residual import Gated, ResidualLayer, Scaled
from highwaybp.models.transformer import _check_gamma, post_ln_gate

DEFAULT_GAMMA = {"gpt2": 0.2, "bert": 0.8}


# ---------------------------------------------------------------------------------------
# Sub-layer blocks: they register the HF submodules (so the per-call chain sees their
# parameters) and carry this call's attention mask and extra kwargs.
# ---------------------------------------------------------------------------------------


class _GPT2Attention(nn.Module):
    def __init__(self, hf_block: nn.Module, gamma: float, mask: Any, kwargs: dict) -> None:
        super().__init__()
        self.ln = hf_block.ln_1
        self.attn = hf_block.attn
        self.gamma, self.mask, self.kwargs = gamma, mask, kwargs

    def forward(self, x: Tensor) -> Tensor:
        z = self.attn(
            self.ln(x),
            past_key_values=None,
            attention_mask=self.mask,
            use_cache=False,
            **self.kwargs,
        )[0]
        return z + self.gamma * x if self.gamma else z


class _GPT2MLP(nn.Module):
    def __init__(self, hf_block: nn.Module, gamma: float) -> None:
        super().__init__()
        self.ln = hf_block.ln_2
        self.mlp = hf_block.mlp
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        z = self.mlp(self.ln(x))
        return z + self.gamma * x if self.gamma else z


class _BertAttention(nn.Module):
    def __init__(self, hf_layer: nn.Module, gamma: float, mask: Any, kwargs: dict) -> None:
        super().__init__()
        self.attn = hf_layer.attention.self
        self.out = hf_layer.attention.output  # dense, dropout, LayerNorm
        self.gamma, self.mask, self.kwargs = gamma, mask, kwargs

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ctx = self.attn(x, attention_mask=self.mask, **self.kwargs)[0]
        sub = self.out.dropout(self.out.dense(ctx))
        ln = self.out.LayerNorm
        return post_ln_gate(x, sub, ln, ln.eps, self.gamma)


class _BertFeedForward(nn.Module):
    def __init__(self, hf_layer: nn.Module, gamma: float) -> None:
        super().__init__()
        self.intermediate = hf_layer.intermediate
        self.out = hf_layer.output  # dense, dropout, LayerNorm
        self.gamma = gamma

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sub = self.out.dropout(self.out.dense(self.intermediate(x)))
        ln = self.out.LayerNorm
        return post_ln_gate(x, sub, ln, ln.eps, self.gamma)


# ---------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------


class HighwayStack(nn.ModuleList):
    """The HF block list, unchanged as modules, whose iteration runs Highway-BP.

    `method` (switchable, also by `highwaybp.use_method`), `vjp`, `scan` configure the
    chain built for each forward call; `last_diagnostics` reports the last backward.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        kind: str,
        gamma: float,
        method: Method,
        vjp: str = "loop",
        scan: Optional[str] = None,
    ) -> None:
        super().__init__(list(blocks))
        self.kind = kind
        self.gamma = gamma
        self.method = method
        self.vjp = vjp
        self.scan = scan
        self._signature = inspect.signature(blocks[0].forward)
        self._last_chain: list[ResidualChain] = []  # a list: not registered as a submodule
        self._warned_cache = False

    @property
    def last_diagnostics(self) -> Optional[Diagnostics]:
        return self._last_chain[0].last_diagnostics if self._last_chain else None

    def __iter__(self) -> Iterator[nn.Module]:
        import torch

        if isinstance(self.method, Exact) or not torch.is_grad_enabled():
            return super().__iter__()
        return iter([self._run_chain])

    def _run_chain(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        bound = self._signature.bind(hidden_states, *args, **kwargs).arguments
        extra = dict(bound.pop("kwargs", {}))
        self._check_unsupported(bound)
        mask = bound.get("attention_mask")
        chain = self.build_chain(mask, extra)
        self._last_chain[:] = [chain]
        return chain(hidden_states)

    def _check_unsupported(self, bound: dict) -> None:
        if bound.get("encoder_hidden_states") is not None:
            raise NotImplementedError(
                "from_huggingface: cross-attention (encoder_hidden_states) is not supported "
                "under Highway-BP; use method=Exact() for this model"
            )
        cache = bound.get("past_key_values")
        if cache is not None:
            seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 1
            if seen:
                raise ValueError(
                    "from_huggingface: a filled KV cache (past_key_values) cannot be used with "
                    "Highway-BP training; call the model with use_cache=False"
                )
            if not self._warned_cache:
                warnings.warn(
                    "from_huggingface: the KV cache is not filled under Highway-BP; pass "
                    "use_cache=False when training",
                    stacklevel=3,
                )
                self._warned_cache = True

    def build_chain(self, mask: Any = None, kwargs: Optional[dict] = None) -> ResidualChain:
        """The `ResidualChain` of 2 * n_layer sub-layers for one call (mask/kwargs bound)."""
        kwargs = {} if kwargs is None else kwargs
        kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "output_attentions")}
        layers: list[nn.Module] = []
        for block in super().__iter__():
            if self.kind == "gpt2":
                k = Scaled(1.0 - self.gamma)
                layers += [
                    ResidualLayer(_GPT2Attention(block, self.gamma, mask, kwargs), k),
                    ResidualLayer(_GPT2MLP(block, self.gamma), Scaled(1.0 - self.gamma)),
                ]
            else:
                layers += [
                    ResidualLayer(_BertAttention(block, self.gamma, mask, kwargs), Gated()),
                    ResidualLayer(_BertFeedForward(block, self.gamma), Gated()),
                ]
        return ResidualChain(layers, method=self.method, vjp=self.vjp, scan=self.scan)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, gamma={self.gamma}, method={self.method!r}, vjp={self.vjp}"


def _is_gpt2_block(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("ln_1", "attn", "ln_2", "mlp"))


def _is_bert_layer(m: nn.Module) -> bool:
    att = getattr(m, "attention", None)
    out = getattr(m, "output", None)
    return (
        att is not None
        and hasattr(att, "self")
        and all(hasattr(getattr(att, "output", None), a) for a in ("dense", "dropout", "LayerNorm"))
        and hasattr(m, "intermediate")
        and out is not None
        and all(hasattr(out, a) for a in ("dense", "dropout", "LayerNorm"))
    )


def _find_stack(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(parent module, attribute name, kind) of the block list."""
    for module in model.modules():
        for attr, kind, test in (("h", "gpt2", _is_gpt2_block), ("layer", "bert", _is_bert_layer)):
            blocks = getattr(module, attr, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) and all(map(test, blocks)):
                return module, attr, kind
    raise TypeError(
        f"from_huggingface: no GPT-2 block list (`.h` of blocks with ln_1/attn/ln_2/mlp) or "
        f"BERT/RoBERTa layer list (`.layer` with attention/intermediate/output) found in "
        f"{type(model).__name__}; supported: GPT-2 and BERT/RoBERTa models of transformers"
    )


def from_huggingface(
    model: nn.Module,
    gamma: Optional[float] = None,
    method: Optional[Method] = None,
    *,
    vjp: str = "loop",
    scan: Optional[str] = None,
) -> nn.Module:
    """Make `model`'s transformer stack train with Highway-BP (in place; returns `model`).

    Args:
        model: a `transformers` GPT-2 (`GPT2Model`, `GPT2LMHeadModel`, ...) or BERT/RoBERTa
            model (any head).
        gamma: residual split; default 0.2 for GPT-2 (K = 0.8 I), 0.8 for BERT/RoBERTa
            (K = diag(0.2 alpha / sigma)). gamma = 1 gives the fixed-point baseline.
        method: the gradient method (default `Exact()`); switch later with
            `highwaybp.use_method(model, ...)` or `stack.method = ...`.
        vjp, scan: the chain's VJP backend and scan.

    Returns the same model; `highwaybp.models.huggingface.highway_stack(model)` gives the
    `HighwayStack` (for `last_diagnostics`). Calling it twice re-configures the stack.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_huggingface needs a torch nn.Module, got {type(model).__name__}")
    method = Exact() if method is None else method
    if not isinstance(method, Method):
        raise TypeError(
            f"method must be a highwaybp method (Exact(), Highway(k), ...), got {method!r}"
        )
    existing = highway_stack(model, required=False)
    if existing is not None:
        g = DEFAULT_GAMMA[existing.kind] if gamma is None else _check_gamma(gamma)
        existing.gamma, existing.method, existing.vjp, existing.scan = g, method, vjp, scan
        return model
    parent, attr, kind = _find_stack(model)
    g = DEFAULT_GAMMA[kind] if gamma is None else _check_gamma(gamma)
    ResidualChain([ResidualLayer(nn.Identity())], vjp=vjp, scan=scan)  # validate names now
    setattr(parent, attr, HighwayStack(getattr(parent, attr), kind, g, method, vjp, scan))
    return model


def highway_stack(model: nn.Module, required: bool = True) -> Optional[HighwayStack]:
    """The `HighwayStack` inside a model converted by `from_huggingface`."""
    for m in model.modules():
        if isinstance(m, HighwayStack):
            return m
    if required:
        raise ValueError(
            "no HighwayStack in this model: call highwaybp.from_huggingface(model) first"
        )
    return None
