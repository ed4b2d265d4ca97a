"""Transformers cast for Highway-BP: each attention and each MLP sub-layer is one layer.

- `GPT`: GPT-2-style pre-LN causal language model. A sub-layer is f(x) = x + Sub(LN(x));
  with the paper's gamma split the block is g(x) = Sub(LN(x)) + gamma x and the residual
  `Scaled(1 - gamma)`: K = (1 - gamma) I (default gamma = 0.2, the paper's GPT-2 value).
- `EncoderClassifier`: post-LN encoder in the BERT/RoBERTa form. A sub-layer is
  f(x) = LN(x + Sub(x)) = x * a(x) + b(x) with a = alpha / sigma(x + Sub(x)) (per token and
  channel; per token [..., 1] when the LN has no affine weight) and
  b = (Sub(x) - mu) * a + beta. With gamma the block returns
  (a', b') = ((1 - gamma) a, b + gamma x a) for residual `Gated()`: K = diag((1 - gamma) a)
  (default gamma = 0.8, the paper's RoBERTa value).

Both are plain `nn.Module`s: every gradient method (Exact, Highway, FixedPoint) trains
them; the function computed does not depend on gamma (only the split does). gamma = 1 makes
K = 0, i.e. Highway(k) = FixedPoint(k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from highwaybp.core.chain import ResidualChain
from highwaybp.core.methods import Method
from highwaybp.core.residual import Gated, ResidualLayer, Scaled


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(
            f"gamma must be a number in [0, 1] (0.2 for GPT-2, 0.8 for RoBERTa), got {gamma!r}"
        )
    return float(gamma)


class SelfAttention(nn.Module):
    """Multi-head self-attention, [B, T, D] -> [B, T, D] (causal or bidirectional).

    Written with plain matmuls so it also runs under torch.func.vmap (batched VJP backend).
    """

    def __init__(self, d_model: int, n_head: int, causal: bool, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        hd = d // self.n_head
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (u.reshape(b, t, self.n_head, hd).transpose(1, 2) for u in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        att = self.attn_drop(torch.softmax(scores, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU -> Linear(4D, D) -> Dropout."""

    def __init__(self, d_model: int, hidden: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class PreLNBlock(nn.Module):
    """g(x) = Sub(LN(x)) + gamma x, for the residual Scaled(1 - gamma)."""

    def __init__(self, sub: nn.Module, d_model: int, gamma: float, eps: float = 1e-5) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model, eps=eps)
        self.sub = sub
        self.gamma = _check_gamma(gamma)

    def forward(self, x: Tensor) -> Tensor:
        z = self.sub(self.ln(x))
        return z + self.gamma * x if self.gamma else z

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


def post_ln_gate(
    x: Tensor, sub_out: Tensor, ln: nn.LayerNorm | None, eps: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """(a', b') with a' * x + b' = LN(x + sub_out) and K = diag(a').

    a = alpha / sigma (shape [..., D], or [..., 1] without an affine LN), b = (sub - mu) a + beta;
    the gamma split moves gamma of the residual into the block: a' = (1 - gamma) a,
    b' = b + gamma x a.
    """
    s = x + sub_out
    mu = s.mean(dim=-1, keepdim=True)
    var = s.var(dim=-1, unbiased=False, keepdim=True)
    a = torch.rsqrt(var + eps)
    if ln is not None and ln.weight is not None:
        a = a * ln.weight
    b = (sub_out - mu) * a
    if ln is not None and ln.bias is not None:
        b = b + ln.bias
    if gamma:
        return (1.0 - gamma) * a, b + gamma * x * a
    return a, b


class PostLNBlock(nn.Module):
    """Returns (a', b') for residual Gated(): a' x + b' = LN(x + Sub(x)) (see `post_ln_gate`)."""

    def __init__(
        self, sub: nn.Module, d_model: int, gamma: float, eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__()
        self.sub = sub
        self.ln = nn.LayerNorm(d_model, eps=eps, elementwise_affine=affine)
        self.gamma = _check_gamma(gamma)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return post_ln_gate(x, self.sub(x), self.ln, self.ln.eps, self.gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


class GPT(nn.Module):
    """GPT-2-style causal LM: ids [B, T] -> logits [B, T, vocab]; 2 * n_layer chain layers.

    Args:
        vocab_size, block_size: vocabulary and the longest sequence (learned positions).
        d_model, n_layer, n_head: width, transformer blocks (each = attention + MLP layer),
            heads.
        gamma: residual split, K = (1 - gamma) I (paper: 0.2 for GPT-2; 1 = FixedPoint).
        dropout: GPT-2 dropout (embeddings, attention, residual); replayed exactly in the
            Highway backward.
        method, vjp, scan: passed to `self.chain`.

    Weights are tied (lm_head = token embedding) and initialised as GPT-2 (normal 0.02,
    output projections scaled by 1/sqrt(2 n_layer)).
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 128,
        d_model: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        *,
        gamma: float = 0.2,
        dropout: float = 0.0,
        method: Method | None = None,
        vjp: str = "loop",
        scan: str | None = None,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.gamma = _check_gamma(gamma)
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        layers = []
        for _ in range(n_layer):
            attn = PreLNBlock(SelfAttention(d_model, n_head, True, dropout), d_model, gamma)
            mlp = PreLNBlock(FeedForward(d_model, dropout=dropout), d_model, gamma)
            layers += [
                ResidualLayer(attn, Scaled(1.0 - gamma)),
                ResidualLayer(mlp, Scaled(1.0 - gamma)),
            ]
        self.chain = ResidualChain(layers, method=method, vjp=vjp, scan=scan)
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
        self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed(self, idx: Tensor) -> Tensor:
        """ids [B, T] -> the residual stream h_0 [B, T, D]."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"GPT expects integer token ids [B, T], got {idx.dtype} {tuple(idx.shape)}"
            )
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(self.chain(self.embed(idx))))

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy; targets [B, T]."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @property
    def num_layers(self) -> int:
        return len(self.chain)


class EncoderClassifier(nn.Module):
    """Post-LN encoder classifier (RoBERTa form): ids [B, T] -> logits [B, num_classes].

    Embeddings (token + position, LN, dropout) -> chain of 2 * n_layer post-LN sub-layers
    (each r = a' x + b', residual Gated()) -> RoBERTa head on the first token
    (dense-tanh-dropout-dense).

    Args:
        gamma: the post-LN split, K = diag((1 - gamma) alpha / sigma) (paper: 0.8).
        layer_norm_affine: False drops the LN's weight/bias (then K is per token: a is
            [B, T, 1]).
    Other args as `GPT`. Sequences are unpadded (all positions attend to all).
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        max_len: int = 128,
        d_model: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        *,
        gamma: float = 0.8,
        dropout: float = 0.0,
        layer_norm_affine: bool = True,
        method: Method | None = None,
        vjp: str = "loop",
        scan: str | None = None,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.gamma = _check_gamma(gamma)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.emb_ln = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        layers = []
        for _ in range(n_layer):
            attn = SelfAttention(d_model, n_head, False, dropout)
            mlp = FeedForward(d_model, dropout=dropout)
            for sub in (attn, mlp):
                block = PostLNBlock(sub, d_model, gamma, affine=layer_norm_affine)
                layers.append(ResidualLayer(block, Gated()))
        self.chain = ResidualChain(layers, method=method, vjp=vjp, scan=scan)
        self.head = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(d_model, num_classes),
        )
        self.apply(GPT._init)

    def forward(self, idx: Tensor) -> Tensor:
        if idx.dim() != 2:
            raise ValueError(f"EncoderClassifier expects token ids [B, T], got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.max_len}")
        h = self.drop(self.emb_ln(self.tok(idx) + self.pos(torch.arange(t, device=idx.device))))
        return self.head(self.chain(h)[:, 0])

    @property
    def num_layers(self) -> int:
        return len(self.chain)
