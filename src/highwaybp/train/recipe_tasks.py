"""The recipes of `highwaybp experiment recipes`: each one a model, its optimizer, its data
(a pure function of the step, so every arm of a seed sees the same batches) and its metric.

- wordlm-gru / wordlm-lstm: pytorch/examples' word LM (embedding 200, a 2-layer GRU/LSTM
  of 200, dropout 0.2, the hidden state carried across batches) on the shipped word-level
  text; SGD lr 20, clip 0.25, bptt 35, batch 20; metric: valid perplexity.
- charlm-gru: embedding 64, GRU 256 on the shipped text's characters; Adam 3e-3, clip 1,
  windows of 128 x 32; metric: valid loss (nats / char).
- pixel-gru: GRU 64 over the 64 pixels of scikit-learn's 8x8 digits, one per step; Adam
  3e-3, clip 1, batch 64; metric: test error (%).
- resnet20: pre-activation ResNet20 (updown, K = I), width 16, on the digits upsampled to
  16x16; Adam 1e-3, batch 64; metric: test error (%).
- chargpt: GPT pre-LN (gamma 0.2), 4 blocks of width 64, 4 heads, on the shipped text's
  characters; AdamW 3e-3, clip 1, windows of 64 x 32; metric: valid loss (nats / char).

The CLI flags `--embed --hidden --layers --bptt --batch --lr --clip --dropout` set the word
LMs' sizes; the other recipes are fixed CPU-sized settings (stated in the table) and take
only `--lr`, `--batch` and `--clip` from the command line when given.
"""

from __future__ import annotations

import gzip
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from highwaybp.models.rnn import GRU, LSTM

WORD_RECIPES = ("wordlm-gru", "wordlm-lstm")
RECIPES = (*WORD_RECIPES, "charlm-gru", "pixel-gru", "resnet20", "chargpt")
GRU_RECIPES = ("wordlm-gru", "charlm-gru", "pixel-gru")  # the ones --split applies to


@dataclass
class Recipe:
    """What an arm of the study needs. `loss(model, batch, carry)` returns the loss and the
    state carried to the next step (the word LM's hidden state; None elsewhere), `carry` is
    detached by the caller. `evaluate` is the metric on held-out data (lower is better)."""

    name: str
    metric: str  # its label, e.g. "valid perplexity"
    make_model: Callable[[], nn.Module]  # called after the seed is set
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batch: Callable[[int], tuple[Tensor, Tensor]]
    loss: Callable[[nn.Module, tuple[Tensor, Tensor], Any], tuple[Tensor, Any]]
    evaluate: Callable[[nn.Module], float]
    clip: float  # gradient-norm clip over all parameters (0: off)
    init_carry: Callable[[], Any] = lambda: None
    new_epoch: Callable[[int], bool] = lambda step: False  # reset the carry at this step
    config: dict[str, Any] = field(default_factory=dict)


def _given(value: Any, default: Any) -> Any:
    """A command-line value, or the recipe's default where none was given (None; a 0 given
    stays 0: `value or default` would silently replace it)."""
    return default if value is None else value


def _split(args: Any) -> str:
    """The GRU recipes' `split` (highwaybp.GRU's K_t: "gate" or "diagonal")."""
    return getattr(args, "split", "gate")


def _split_text(args: Any) -> str:
    return "" if _split(args) == "gate" else f", split={_split(args)}"


def detach(carry: Any) -> Any:
    if carry is None:
        return None
    return tuple(h.detach() for h in carry) if isinstance(carry, tuple) else carry.detach()


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---------------------------------------------------------------------------- the text
def shipped_text() -> str:
    """The text shipped with the package (tinyshakespeare, public domain)."""
    data = resources.files("highwaybp.train").joinpath("corpora/tinyshakespeare.txt.gz")
    return gzip.decompress(data.read_bytes()).decode("utf-8")


@dataclass
class WordCorpus:
    """Token ids of the train / valid / test splits and the vocabulary size."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab_size: int


TOKENIZERS = ("raw", "wikitext")
_WIKITEXT_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")


def word_corpus(path: str | Path | None = None, tokenize: str = "raw",
                min_count: int = 3) -> WordCorpus:
    """Token ids of a text's 90/5/5 split (in order) and its vocabulary size.

    tokenize "raw" is pytorch/examples' tokenisation (each line's whitespace words plus
    `<eos>`; on the shipped text: 243k tokens, a 25.7k-word vocabulary, 58% of its words seen
    once). "wikitext" prepares the text as Wikitext-2 (the corpus that recipe is run on) is
    prepared: punctuation split off as tokens, and words seen fewer than `min_count` times
    in the whole text replaced by `<unk>` (on the shipped text: 294k tokens, a 5.5k-word
    vocabulary).
    """
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize must be one of {TOKENIZERS}, got {tokenize!r}")
    text = shipped_text() if path is None else Path(path).read_text(encoding="utf-8")
    if tokenize == "raw":
        words = [w for line in text.splitlines() for w in (*line.split(), "<eos>")]
    else:
        words = [w for line in text.splitlines()
                 for w in (*_WIKITEXT_TOKEN.findall(line), "<eos>")]
        counts = Counter(words)
        words = [w if counts[w] >= min_count else "<unk>" for w in words]
    vocab: dict[str, int] = {}
    ids = torch.tensor([vocab.setdefault(w, len(vocab)) for w in words], dtype=torch.long)
    n = len(ids)
    a, b = int(0.9 * n), int(0.95 * n)
    if b - a < 2 * 36:
        raise ValueError(f"corpus {path} has {n} words: too few for a validation split")
    return WordCorpus(ids[:a], ids[a:b], ids[b:], len(vocab))


def batchify(ids: Tensor, batch: int) -> Tensor:
    """[N] -> [N // batch, batch]: `batch` contiguous streams, one per column."""
    rows = len(ids) // batch
    return ids[: rows * batch].view(batch, rows).t().contiguous()


# ---------------------------------------------------------------------------- word LM
def zero_hidden(cell: str, layers: int, batch: int, hidden: int) -> Any:
    """The word LM's initial state: h [layers, batch, hidden] (GRU), (h, c) (LSTM)."""
    h = torch.zeros(layers, batch, hidden)
    return h if cell == "gru" else (h, h.clone())


class WordLM(nn.Module):
    """Embedding -> dropout -> highwaybp GRU/LSTM (with dropout between layers) -> dropout
    -> Linear, pytorch/examples' RNNModel (untied, uniform(-0.1, 0.1) init)."""

    def __init__(self, vocab: int, cell: str, embed: int, hidden: int, layers: int,
                 dropout: float, split: str = "gate") -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, embed)
        rnn = GRU if cell == "gru" else LSTM
        self.rnn = rnn(embed, hidden, num_layers=layers, dropout=dropout, split=split)
        self.decoder = nn.Linear(hidden, vocab)
        self.cell, self.layers, self.hidden = cell, layers, hidden
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch: int) -> Any:
        return zero_hidden(self.cell, self.layers, batch, self.hidden)

    def forward(self, x: Tensor, hidden: Any) -> tuple[Tensor, Any]:
        """x [T, B] -> logits [T, B, V], the new hidden state."""
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


@torch.no_grad()
def perplexity(model: WordLM, data: Tensor, bptt: int) -> float:
    """exp(mean cross-entropy) over `data` [N, B] in bptt windows, hidden carried."""
    was = model.training
    model.eval()
    hidden = model.init_hidden(data.shape[1])
    total, count = 0.0, 0
    for i in range(0, data.shape[0] - 1, bptt):
        n = min(bptt, data.shape[0] - 1 - i)
        logits, hidden = model(data[i : i + n], hidden)
        total += float(_ce(logits, data[i + 1 : i + 1 + n])) * n
        count += n
    model.train(was)
    return math.exp(total / count)


def word_recipe(args: Any) -> Recipe:
    cell = args.recipe.split("-")[1]
    corpus = word_corpus(args.text, args.tokenize)
    train, valid = batchify(corpus.train, args.batch), batchify(corpus.valid, args.eval_batch)
    windows = (train.shape[0] - 1) // args.bptt

    def batch(step: int) -> tuple[Tensor, Tensor]:
        i = (step % windows) * args.bptt  # the carried streams, wrapping at an epoch's end
        return train[i : i + args.bptt], train[i + 1 : i + 1 + args.bptt]

    def loss(model: nn.Module, b: tuple[Tensor, Tensor], hidden: Any) -> tuple[Tensor, Any]:
        logits, hidden = model(b[0], hidden)
        return _ce(logits, b[1]), hidden

    return Recipe(
        args.recipe, "valid perplexity",
        lambda: WordLM(corpus.vocab_size, cell, args.embed, args.hidden, args.layers,
                       args.dropout, _split(args)),
        lambda m: torch.optim.SGD(m.parameters(), lr=args.lr), batch, loss,
        lambda m: perplexity(m, valid, args.bptt), args.clip,
        init_carry=lambda: zero_hidden(cell, args.layers, args.batch, args.hidden),
        new_epoch=lambda step: step % windows == 0,
        config={"corpus": f"{len(corpus.train)} train tokens, vocab {corpus.vocab_size} "
                          f"({args.tokenize})",
                "model": f"{args.layers}-layer {cell.upper()} {args.hidden}, embedding "
                         f"{args.embed}, dropout {args.dropout}{_split_text(args)}",
                "optimizer": f"SGD lr {args.lr}, clip {args.clip}",
                "batch": f"bptt {args.bptt} x {args.batch}"})


# ---------------------------------------------------------------------------- char models
class CharGRU(nn.Module):
    """Embedding [V, 64] -> highwaybp GRU (hidden 256) -> Linear; x [B, T] ids."""

    def __init__(self, vocab: int, embed: int = 64, hidden: int = 256,
                 split: str = "gate") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = GRU(embed, hidden, batch_first=True, split=split)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(x))[0])


def _char_data(seq: int, batch: int, seed: int) -> tuple[Any, Callable, Callable]:
    from highwaybp.train.data import char_corpus_of_text

    corpus = char_corpus_of_text(shipped_text())

    def batch_of(step: int) -> tuple[Tensor, Tensor]:
        return corpus.batch("train", batch, seq,
                            torch.Generator().manual_seed(seed * 1_000_003 + step))

    g = torch.Generator().manual_seed(12345)
    valid = [corpus.batch("valid", 32, seq, g) for _ in range(8)]

    def valid_loss(model: nn.Module, loss_of: Callable) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            value = sum(float(loss_of(model, b)) for b in valid) / len(valid)
        model.train(was)
        return value

    return corpus, batch_of, valid_loss


def charlm_recipe(args: Any, seed: int) -> Recipe:
    lr, bsz, clip = _given(args.lr, 3e-3), _given(args.batch, 32), _given(args.clip, 1.0)
    corpus, batch_of, valid_loss = _char_data(128, bsz, seed)

    def loss_of(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return _ce(model(b[0]), b[1])

    return Recipe(
        "charlm-gru", "valid loss (nats/char)",
        lambda: CharGRU(corpus.vocab_size, split=_split(args)),
        lambda m: torch.optim.Adam(m.parameters(), lr=lr), batch_of,
        lambda m, b, carry: (loss_of(m, b), None), lambda m: valid_loss(m, loss_of), clip,
        config={"corpus": f"{len(corpus.train)} train chars, vocab {corpus.vocab_size}",
                "model": f"GRU 256, embedding 64{_split_text(args)}",
                "optimizer": f"Adam lr {lr}, clip {clip}",
                "batch": f"128 x {bsz}"})


def chargpt_recipe(args: Any, seed: int) -> Recipe:
    from highwaybp.models.transformer import GPT

    lr, bsz, clip = _given(args.lr, 3e-3), _given(args.batch, 32), _given(args.clip, 1.0)
    corpus, batch_of, valid_loss = _char_data(64, bsz, seed)

    def loss_of(model: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return model.loss(*b)

    return Recipe(
        "chargpt", "valid loss (nats/char)",
        lambda: GPT(corpus.vocab_size, block_size=64, d_model=64, n_layer=4, n_head=4,
                    gamma=0.2),
        lambda m: torch.optim.AdamW(m.parameters(), lr=lr), batch_of,
        lambda m, b, carry: (loss_of(m, b), None), lambda m: valid_loss(m, loss_of), clip,
        config={"corpus": f"{len(corpus.train)} train chars, vocab {corpus.vocab_size}",
                "model": "GPT pre-LN, 4 blocks (L = 8), d 64, 4 heads, gamma 0.2",
                "optimizer": f"AdamW lr {lr}, clip {clip}", "batch": f"64 x {bsz}"})


# ---------------------------------------------------------------------------- digits
class PixelGRU(nn.Module):
    """The pixel GRU classifier: one pixel per time step (T = 64 for 8x8 digits), GRU 64,
    a linear head on the last hidden state. x [B, 1, 8, 8] -> logits [B, 10]."""

    def __init__(self, hidden: int = 64, classes: int = 10, split: str = "gate") -> None:
        super().__init__()
        self.rnn = GRU(1, hidden, batch_first=True, split=split)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.reshape(x.shape[0], -1, 1)
        return self.head(self.rnn(seq)[0][:, -1])


def _digits_recipe(name: str, side: int, make_model: Callable[[], nn.Module],
                   model_text: str, lr: float, bsz: int, clip: float, seed: int) -> Recipe:
    from highwaybp.train.deep_experiment import digits_task

    task = digits_task(side, bsz, 1, seed)
    return Recipe(
        name, "test error (%)", make_model,
        lambda m: torch.optim.Adam(m.parameters(), lr=lr), task.batch,
        lambda m, b, carry: (task.loss(m, b), None), lambda m: 100.0 - task.evaluate(m), clip,
        config={"data": task.describe(side), "model": model_text,
                "optimizer": f"Adam lr {lr}, clip {clip}", "batch": str(task.batch_size)})


def pixel_recipe(args: Any, seed: int) -> Recipe:
    clip = _given(args.clip, 1.0)
    return _digits_recipe("pixel-gru", 8, lambda: PixelGRU(split=_split(args)),
                          f"GRU 64 over 64 pixels (T = 64){_split_text(args)}",
                          _given(args.lr, 3e-3), _given(args.batch, 64), clip, seed)


def resnet_recipe(args: Any, seed: int) -> Recipe:
    from highwaybp.models.resnet import CifarResNet

    clip = _given(args.clip, 0.0)
    return _digits_recipe(
        "resnet20", 16,
        lambda: CifarResNet(20, form="pre", downsample="updown", in_channels=1, width=16),
        "pre-act ResNet20 (updown, K = I), width 16, L = 9", _given(args.lr, 1e-3),
        _given(args.batch, 64), clip, seed)


def make_recipe(args: Any, seed: int) -> Recipe:
    """The recipe `args.recipe` for one seed (the digits' split and the char batches are
    drawn from the seed; the word LM's batches are the corpus in order)."""
    if args.recipe in WORD_RECIPES:
        return word_recipe(args)
    return {"charlm-gru": charlm_recipe, "pixel-gru": pixel_recipe, "resnet20": resnet_recipe,
            "chargpt": chargpt_recipe}[args.recipe](args, seed)
