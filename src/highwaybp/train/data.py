"""Offline datasets: nothing here downloads.

- `load_mnist1d`: the MNIST-1D benchmark generated locally with `mnist1d.make_dataset`
  (package `mnist1d`, extra `experiments`); 40 features, 10 classes.
- `load_digits`: scikit-learn's bundled 8x8 digits (extra `experiments`).
- `char_corpus`: characters of a text file the user names, or by default text built from
  the Python standard library's own sources (present on every Python install).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TensorSplit:
    """A classification dataset: x_train [N, ...] float32, y_train [N] int64, same for test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def _need(package: str, extra: str = "experiments"):
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(
            f"this dataset needs the '{package}' package: pip install 'highway-bp[{extra}]'"
        ) from err


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> TensorSplit:
    """MNIST-1D generated locally (no download). Inputs are standardised with train stats.

    Returns x of shape [N, 40] (float32) and labels in 0..9.
    """
    _need("mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)
    x_train = torch.as_tensor(data["x"], dtype=torch.float32)
    x_test = torch.as_tensor(data["x_test"], dtype=torch.float32)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    return TensorSplit(
        (x_train - mean) / std,
        torch.as_tensor(data["y"], dtype=torch.int64),
        (x_test - mean) / std,
        torch.as_tensor(data["y_test"], dtype=torch.int64),
        10,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> TensorSplit:
    """scikit-learn's bundled 8x8 digits as images [N, 1, 8, 8] scaled to [0, 1]."""
    datasets = _need("sklearn").datasets
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return TensorSplit(x[train], y[train], x[test], y[test], 10)


def stdlib_text(max_chars: int = 2_000_000) -> str:
    """Text built from the Python standard library's .py sources (sorted, deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not pieces:
        raise FileNotFoundError(f"no Python sources found under {root}; pass a text file")
    return "".join(pieces)[:max_chars]


@dataclass
class CharCorpus:
    """A character-level corpus: token ids [N] int64 split 90/10 and its vocabulary."""

    train: torch.Tensor
    valid: torch.Tensor
    vocab: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator):
        """Random windows: inputs [B, T] and next-char targets [B, T]."""
        data = self.train if split == "train" else self.valid
        if len(data) <= seq_len + 1:
            raise ValueError(f"corpus split '{split}' has {len(data)} chars, need > {seq_len + 1}")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        window = data[idx]
        return window[:, :-1], window[:, 1:]


def char_corpus(path: str | Path | None = None, max_chars: int = 2_000_000) -> CharCorpus:
    """Char-level corpus from a text file, or by default from the stdlib sources."""
    if path is None:
        text = stdlib_text(max_chars)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text corpus {path} not found: pass an existing text file")
        text = path.read_text(encoding="utf-8", errors="replace")[:max_chars]
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)
    split = int(len(ids) * 0.9)
    return CharCorpus(ids[:split], ids[split:], vocab)
