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
left unfilled), no cross-attention, no `head_mask`, and `output_hidden_states`/
`output_attentions` are not recorded for the stack under Highway/FixedPoint. The cache is
recognised by what it is (a `Cache` object or a legacy tuple of tensors), whatever the
release calls the argument (`layer_past`, `past_key_value`, `past_key_values`, `cache`).

Versions: tested with transformers 4.40.0 to 5.24.x (`highwaybp._compat.TESTED_RANGES`).
An older release is refused with an error (unless HIGHWAYBP_ALLOW_UNTESTED=1: then a
warning). A newer release is checked on the model being adapted (`self_check`): the
model's own block loop and the adapted one run on a tiny probe batch, in the model's dtype
and on its device, and their outputs must agree, and so must one Highway(k = L) gradient
with exact backprop's. Pass: the model is adapted, with one warning naming the release.
Fail: `UntestedVersionError` says what differed. Inside the tested range no probe runs
(the suite checks those releases; a probe of a deep model costs O(L^2) sub-layer VJPs).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator
from typing import Any, Optional

from torch import Tensor, nn

import highwaybp._compat as _compat
from highwaybp.core.adapter import ChainAdapter
from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import Exact, Highway, Method, check_method
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
        # No cache argument: its name differs between transformers releases (layer_past,
        # past_key_value, past_key_values, cache), and every one defaults to "no cache".
        z = self.attn(self.ln(x), attention_mask=self.mask, **self.kwargs)[0]
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


class HighwayStack(ChainAdapter, nn.ModuleList):
    """The HF block list, unchanged as modules, whose iteration runs Highway-BP.

    `method` (switchable, also by `highwaybp.use_method`) and every `ResidualChain` switch
    (`vjp`, `scan`, `record_step_norms`, `layerwise_sweeps`, `recompute`,
    `preserve_rng_state`: attributes of the same names, read at each forward) configure
    the chain built for each forward call; `last_diagnostics` reports the last backward
    (see `highwaybp.core.adapter.ChainAdapter`).
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        kind: str,
        gamma: float,
        method: Method,
        returns_tuple: bool = False,
        **switches: Any,
    ) -> None:
        super().__init__(list(blocks))
        self.kind = kind
        self.gamma = gamma
        self._configure(method, **switches)
        self.returns_tuple = returns_tuple  # how this transformers release's blocks return
        self._signature = inspect.signature(blocks[0].forward)
        self._warned_cache = False

    @property
    def num_chain_layers(self) -> int:
        return 2 * len(self)  # attention and MLP of each block (see build_chain)

    def __iter__(self) -> Iterator[nn.Module]:
        import torch

        if self.method.exact or not torch.is_grad_enabled():
            self._ran_original(
                torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            )
            return super().__iter__()
        return iter([self._run_chain])

    def _run_chain(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind(hidden_states, *args, **kwargs).arguments
        extra = dict(bound.pop("kwargs", {}))
        named = dict(list(bound.items())[1:])  # every argument but the hidden states
        self._check_unsupported(named, extra)
        chain = self._running(self.build_chain(named.get("attention_mask"), extra))
        out = chain(hidden_states)
        # transformers 4.x blocks (and some 5.x ones) return (hidden, present, attentions,
        # cross-attentions) and the model reads outputs[0], outputs[1], ...: a bare tensor
        # would be indexed as a batch (row 0 taken as the output). The cache and attention
        # entries are not recorded under Highway-BP (see the module limits).
        return (out, None, None, None) if self.returns_tuple else out

    def _check_unsupported(self, named: dict, extra: dict) -> None:
        """Refuse what the chain cannot run; drop cache objects from `extra` (forwarded)."""
        if named.get("encoder_hidden_states") is not None:
            raise NotImplementedError(
                "from_huggingface: cross-attention (encoder_hidden_states) is not supported "
                "under Highway-BP; use method=Exact() for this model"
            )
        if named.get("head_mask") is not None:  # transformers 4.x: one mask per layer
            raise NotImplementedError(
                "from_huggingface: head_mask is not supported under Highway-BP (the stack runs "
                "as one chain and each layer has its own mask); use method=Exact() with it"
            )
        # The KV cache reaches the block under a name that changes between releases
        # (layer_past, past_key_value, past_key_values, cache): find it by what it is.
        caches = [(k, v) for k, v in (*named.items(), *extra.items()) if _is_kv_cache(v)]
        for name, _ in caches:
            extra.pop(name, None)
        if any(_cache_length(cache) for _, cache in caches):
            raise ValueError(
                "from_huggingface: a filled KV cache cannot be used with Highway-BP training "
                "(the stack would attend to the new tokens only); call the model with "
                "use_cache=False and no cache, or generate under torch.no_grad() or with "
                "method=Exact()"
            )
        if (caches or named.get("use_cache")) and not self._warned_cache:
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
        return self._chain_of(layers)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, gamma={self.gamma}, method={self.method!r}, vjp={self.vjp}"


def _is_kv_cache(value: Any) -> bool:
    """A KV cache in any form a block receives: a `transformers` `Cache` object (it has
    `get_seq_length`), or a legacy tuple of (key, value) tensors (transformers 4.x)."""
    if hasattr(value, "get_seq_length"):
        return True
    return isinstance(value, (tuple, list)) and any(
        isinstance(leaf, Tensor) or _is_kv_cache(leaf) for leaf in value
    )


def _cache_length(cache: Any) -> int:
    """How many tokens `cache` holds (0: empty, to be filled by this call)."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return max(
        (leaf.shape[-2] if leaf.dim() >= 2 else leaf.numel()) if isinstance(leaf, Tensor)
        else _cache_length(leaf)
        for leaf in cache
    )


def _block_returns_tuple(block: nn.Module, width: int) -> bool:
    """Whether `block` returns a tuple (transformers 4.x, GPT-2 up to 5.x) or a tensor.

    The convention changed per model and release, so it is read from the block itself: one
    call of its own `forward` on a 1 x 1 x width zero input, without gradients, in a forked
    RNG (dropout draws no random numbers the user sees). Forward hooks registered on the
    block's submodules do see this call.
    """
    import torch

    param = next(block.parameters())
    x = torch.zeros(1, 1, width, dtype=param.dtype, device=param.device)
    devices = [param.device.index or 0] if param.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        out = type(block).forward(block, x)
    return isinstance(out, tuple)


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
    **switches: Any,
) -> nn.Module:
    """Make `model`'s transformer stack train with Highway-BP (in place; returns `model`).

    Args:
        model: a `transformers` GPT-2 (`GPT2Model`, `GPT2LMHeadModel`, ...) or BERT/RoBERTa
            model (any head).
        gamma: residual split; default 0.2 for GPT-2 (K = 0.8 I), 0.8 for BERT/RoBERTa
            (K = diag(0.2 alpha / sigma)). gamma = 1 gives the fixed-point baseline.
        method: the gradient method (default `Exact()`); switch later with
            `highwaybp.use_method(model, ...)` or `stack.method = ...`.
        **switches: any keyword switch of `ResidualChain` (vjp, scan, recompute,
            record_step_norms, layerwise_sweeps, preserve_rng_state; defaults as there),
            for the chain built at each forward; also attributes of the stack.

    Returns the same model; `highwaybp.models.huggingface.highway_stack(model)` gives the
    `HighwayStack` (for `last_diagnostics`). Calling it twice re-configures the stack
    (switches not given return to their defaults).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_huggingface needs a torch nn.Module, got {type(model).__name__}")
    method = Exact() if method is None else check_method(method)
    existing = highway_stack(model, required=False)
    if existing is not None:
        g = DEFAULT_GAMMA[existing.kind] if gamma is None else _check_gamma(gamma)
        existing._configure(method, **switches)
        existing.gamma = g
        return model
    parent, attr, kind = _find_stack(model)
    # An older transformers is refused; a newer one is checked on this model below (see
    # highwaybp._compat.SELF_CHECKED).
    version = _compat.installed_version("transformers")
    newer = _compat.newer_than_tested("transformers", version)
    if not newer:
        _compat.require_tested("transformers", "highwaybp.from_huggingface")
    g = DEFAULT_GAMMA[kind] if gamma is None else _check_gamma(gamma)
    blocks = getattr(parent, attr)
    first = blocks[0]
    ln = first.ln_1 if kind == "gpt2" else first.attention.output.LayerNorm
    returns_tuple = _block_returns_tuple(first, ln.normalized_shape[-1])
    stack = HighwayStack(blocks, kind, g, method, returns_tuple=returns_tuple, **switches)
    if newer:
        report = self_check(model, parent, attr, stack)  # raises if the loops differ
        warnings.warn(
            f"from_huggingface: transformers {version} is newer than the tested range "
            f"(transformers{_compat.specifier('transformers')}); the adapted block loop was "
            f"checked against {type(model).__name__}'s own on a probe batch and agrees "
            f"({report}), so the model is adapted",
            _compat.UntestedVersionWarning,
            stacklevel=2,
        )
    setattr(parent, attr, stack)
    return model


# ---------------------------------------------------------------------------------------
# The self-check run on a transformers release newer than the tested range
# ---------------------------------------------------------------------------------------

# Relative tolerance of the probe per dtype (of the largest magnitude of each compared
# tensor). The adapter re-associates sums (K x + g(x)) and Highway(k = L) re-orders the
# backward's sums, so agreement is to a few rounding errors of the dtype; what a changed
# block loop breaks (a dropped residual or mask, a swapped order, a new argument) is O(1).
_PROBE_RTOL = {"float64": 1e-8, "float32": 1e-4, "float16": 5e-2, "bfloat16": 1e-1}
_PROBE_SHAPE = (2, 5)  # batch, tokens: the second sequence is right-padded by one token


def _base_model(model: nn.Module, parent: nn.Module) -> nn.Module:
    """The innermost module above the block list that takes `input_ids` (GPT2Model,
    BertModel, RobertaModel): it owns the embeddings, the mask preparation and the loop."""
    path = next(name for name, m in model.named_modules() if m is parent)
    parts = path.split(".") if path else []
    for n in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:n]))
        get = getattr(module, "get_input_embeddings", None)
        if callable(get) and isinstance(get(), nn.Embedding):
            return module
    raise TypeError(
        f"from_huggingface: no module above the block list of {type(model).__name__} has "
        f"input embeddings, so the adapter cannot be checked on this transformers release"
    )


def _probe_run(
    base: nn.Module, parent: nn.Module, attr: str, blocks: nn.Module, ids: Tensor,
    mask: Tensor, weight: Tensor, params: list[nn.Parameter],
) -> tuple[Tensor, list[Optional[Tensor]]]:
    """The base model's last hidden state on the probe with `blocks` as its block list, and
    the gradients of sum(weight * hidden) for `params`."""
    import torch

    saved = getattr(parent, attr)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "use_cache" in inspect.signature(base.forward).parameters:
        kwargs["use_cache"] = False
    setattr(parent, attr, blocks)
    try:
        with torch.enable_grad():
            hidden = base(**kwargs)[0]
            if hidden.shape != weight.shape:
                raise ValueError(f"the last hidden state has shape {tuple(hidden.shape)}, "
                                 f"expected {tuple(weight.shape)}")
            grads = torch.autograd.grad((hidden * weight).sum(), params, allow_unused=True)
    finally:
        setattr(parent, attr, saved)
    return hidden.detach(), list(grads)


def _relative_error(got: Optional[Tensor], expected: Optional[Tensor],
                    floor: float = 0.0) -> float:
    """max |got - expected| / max(max |expected|, floor) (inf when only one is missing or a
    value is not finite). `floor` keeps a gradient that is zero in exact arithmetic (an
    attention key bias: softmax ignores it) from comparing rounding noise with noise."""
    if got is None or expected is None:
        return 0.0 if got is None and expected is None else math.inf
    scale = max(float(expected.double().abs().max()), floor) or 1.0
    error = float((got.double() - expected.double()).abs().max()) / scale
    return error if math.isfinite(error) else math.inf


def self_check(model: nn.Module, parent: nn.Module, attr: str, stack: HighwayStack) -> str:
    """Check the adapted block loop against the model's own, on a tiny probe batch.

    The base model (embeddings, mask preparation, block loop) runs twice on the same probe
    (2 x 5 random token ids, the second sequence right-padded), in eval mode (no dropout),
    in the model's dtype and on its device, in a forked RNG: once with its original block
    list and exact autograd, once with a `HighwayStack` of the same blocks running
    Highway(k = L) with L = 2 * blocks (exact in exact arithmetic). The last hidden states
    and the gradients of a fixed random projection of them, for every block parameter and
    the input embeddings, must agree to `_PROBE_RTOL` of the dtype (each relative to its
    largest value, or to 1e-3 of the largest of all where that is smaller). Parameters, buffers,
    `.grad` and the random stream are left as they were.

    Returns a short summary of the largest differences; raises
    `highwaybp._compat.UntestedVersionError` naming what differed (or what raised).
    """
    import torch

    version = _compat.installed_version("transformers")
    blocks = getattr(parent, attr)
    base = _base_model(model, parent)
    embedding = base.get_input_embeddings()
    param = embedding.weight
    dtype_name = str(param.dtype).replace("torch.", "")
    rtol = _PROBE_RTOL.get(dtype_name, 1e-4)
    params = [embedding.weight] + [p for p in blocks.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    probe_method = Highway(k=2 * len(blocks))
    probe_stack = HighwayStack(blocks, stack.kind, stack.gamma, probe_method,
                               returns_tuple=stack.returns_tuple, **stack.chain_options())

    def refuse(what: str) -> _compat.UntestedVersionError:
        return _compat.UntestedVersionError(
            f"from_huggingface: transformers {version} is newer than the tested range "
            f"(transformers{_compat.specifier('transformers')}), and on a probe batch the "
            f"adapted block loop of {type(model).__name__} does not match the original: "
            f"{what}. Highway-BP would train this model with a wrong forward or gradient, "
            f"so it is refused. Install a tested release "
            f"(pip install 'transformers{_compat.specifier('transformers')}')."
        )

    training = [(m, m.training) for m in model.modules()]
    devices = [param.device.index or 0] if param.device.type == "cuda" else []
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, embedding.num_embeddings, _PROBE_SHAPE, generator=g)
    mask = torch.ones(_PROBE_SHAPE, dtype=torch.long)
    mask[1, -1] = 0
    weight = torch.randn((*_PROBE_SHAPE, embedding.embedding_dim), generator=g)
    ids, mask = ids.to(param.device), mask.to(param.device)
    weight = weight.to(device=param.device, dtype=param.dtype)
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            runs = []
            for label, loop in (("original", blocks), ("adapted", probe_stack)):
                try:
                    runs.append(_probe_run(base, parent, attr, loop, ids, mask, weight, params))
                except Exception as error:  # a changed call convention: name it
                    raise refuse(
                        f"the {label} loop raised {type(error).__name__}: {error}"
                    ) from error
    finally:
        for m, mode in training:
            m.training = mode
    (expected, exact), (got, highway) = runs
    forward = _relative_error(got, expected)
    if not forward <= rtol:
        raise refuse(
            f"the last hidden state differs by {forward:.3g} (max abs difference relative "
            f"to the largest value; tolerance {rtol:g} for {dtype_name})"
        )
    floor = 1e-3 * max((float(e.double().abs().max()) for e in exact if e is not None),
                       default=0.0)
    errors = [(_relative_error(h, e, floor), names.get(id(p), "?"))
              for p, h, e in zip(params, highway, exact)]
    gradient, where = max(errors, key=lambda t: t[0])
    if not gradient <= rtol:
        raise refuse(
            f"the Highway(k={probe_method.k}) gradient of {where} differs from exact "
            f"backprop's by {gradient:.3g} (relative to its largest value; tolerance "
            f"{rtol:g} for {dtype_name})"
        )
    return (f"{dtype_name} probe {_PROBE_SHAPE[0]}x{_PROBE_SHAPE[1]}: hidden states within "
            f"{forward:.1e}, Highway(k={probe_method.k}) gradient within {gradient:.1e} of exact")


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
