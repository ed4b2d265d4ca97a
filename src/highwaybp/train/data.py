"""Offline datasets: nothing here downloads.

- `load_mnist1d`: the MNIST-1D benchmark generated locally with `mnist1d.make_dataset`
  (package `mnist1d`, extra `experiments`); 40 features, 10 classes.
- `load_digits`: scikit-learn's bundled 8x8 digits (extra `experiments`).
- `char_corpus`: characters of a text file the user names, or by default text built from
  the Python standard library's own sources (present on every Python install).
- The paper's datasets in their standard on-disk formats, from a folder the user already
  has (`--data-dir`): `load_cifar` (CIFAR-10/100 python batches: pickled dicts),
  `load_idx` / `load_mnist_idx` (MNIST-style IDX files, gzipped or not), `text_splits` /
  `word_corpus` / `char_corpus_splits` (plain text train / valid / test files, Wikitext-103
  raw's `wiki.train.raw` names included), and `pixel_sequences` (images read one grey
  pixel per time step: the paper's pixel tasks). Each error says which file it looked for.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


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
    return char_corpus_of_text(text)


def char_corpus_of_text(text: str) -> CharCorpus:
    """`text`'s characters as ids, split 90/10 in order, with its sorted vocabulary."""
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)
    split = int(len(ids) * 0.9)
    return CharCorpus(ids[:split], ids[split:], vocab)


# ---- the paper's datasets in their on-disk formats (nothing downloads) ----------------------

CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
         b"labels", 10),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _find(data_dir: Path, names: list[str], what: str) -> Path:
    """The first of `names` (paths relative to `data_dir`) that exists, or an error naming
    them all."""
    for name in names:
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(
        f"{what}: none of {', '.join(str(data_dir / n) for n in names)} exists; point "
        "--data-dir at the folder holding it (nothing is downloaded)")


def load_cifar(data_dir: str | Path, classes: int = 10) -> TensorSplit:
    """CIFAR-10 or CIFAR-100 from the python version's pickled batches (the files
    `cifar-10-python.tar.gz` unpacks to): `data_dir` is either the batches' folder
    (`cifar-10-batches-py` / `cifar-100-python`) or its parent. Each batch is a dict with
    b"data" uint8 [N, 3072] (the red, green and blue planes of a 32x32 image) and b"labels"
    (CIFAR-100: b"fine_labels"). Returns images [N, 3, 32, 32] float32 in [0, 1]."""
    if classes not in CIFAR_LAYOUT:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {classes}")
    folder, train_names, test_names, label_key, n_classes = CIFAR_LAYOUT[classes]
    data_dir = Path(data_dir)
    root = data_dir / folder if (data_dir / folder).is_dir() else data_dir

    def read(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in names:
            path = _find(root, [name], f"CIFAR-{classes} batch")
            with path.open("rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{path}: b'data' should be uint8 [N, 3072], got {data.shape}")
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            ys.append(torch.as_tensor(list(batch[label_key]), dtype=torch.int64))
        return torch.cat(xs).float() / 255.0, torch.cat(ys)

    x_train, y_train = read(train_names)
    x_test, y_test = read(test_names)
    return TensorSplit(x_train, y_train, x_test, y_test, n_classes)


IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
              0x0E: ">f8"}


def load_idx(path: str | Path) -> np.ndarray:
    """One IDX file (MNIST's format: two zero bytes, a type code, the number of
    dimensions, big-endian uint32 sizes, then the data), gzipped (".gz") or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def load_mnist_idx(data_dir: str | Path) -> TensorSplit:
    """MNIST (or Fashion-MNIST, same file names) from its four IDX files in `data_dir`
    (or its `raw/` subfolder, torchvision's layout), each gzipped or not. Images
    [N, 1, H, W] float32 in [0, 1]."""
    data_dir = Path(data_dir)
    found = {}
    for key, stem in MNIST_FILES.items():
        names = [f"{sub}{stem}{ext}" for sub in ("", "raw/") for ext in ("", ".gz")]
        names += [n.replace("-idx", ".idx") for n in names]  # the t10k-images.idx3-ubyte spelling
        found[key] = load_idx(_find(data_dir, names, f"MNIST {key.replace('_', ' ')}"))
    for split in ("train", "test"):
        if len(found[f"{split}_images"]) != len(found[f"{split}_labels"]):
            raise ValueError(f"MNIST {split}: {len(found[f'{split}_images'])} images but "
                             f"{len(found[f'{split}_labels'])} labels")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    labels = [torch.from_numpy(found[k].astype(np.int64)) for k in ("train_labels", "test_labels")]
    return TensorSplit(images(found["train_images"]), labels[0], images(found["test_images"]),
                       labels[1], int(max(int(labels[0].max()), int(labels[1].max()))) + 1)


PIXEL_SOURCES = ("digits", "cifar10", "mnist")


def pixel_source_in(data_dir: str | Path | None) -> str:
    """"cifar10" if `data_dir` holds CIFAR-10's first batch, "mnist" if MNIST's train
    images, else "digits" (by file presence: nothing is loaded twice)."""
    if data_dir is None:
        return "digits"
    d = Path(data_dir)
    if any((d / sub / "data_batch_1").is_file() for sub in ("", CIFAR_LAYOUT[10][0])):
        return "cifar10"
    stem = MNIST_FILES["train_images"]
    if any((d / f"{sub}{stem}{ext}").is_file() for sub in ("", "raw/") for ext in ("", ".gz")):
        return "mnist"
    return "digits"


def pixel_sequences(side: int, data_dir: str | Path | None = None, source: str = "auto"
                    ) -> tuple[TensorSplit, str]:
    """Images read one grey pixel per time step: x [N, side * side, 1] (batch first), and a
    description. Sources: "cifar10" (CIFAR-10's python batches in `data_dir`, converted
    to grey with the ITU-R 601 weights: the paper's pixel-CIFAR at side 32, T = 1024),
    "mnist" (IDX files in `data_dir`), "digits" (scikit-learn's bundled 8x8 digits);
    "auto": CIFAR-10 if `data_dir` holds it, else MNIST if it holds that, else digits.
    Images of another size are resized bilinearly to side x side; pixels are normalised
    with the training set's mean and std."""
    if source not in ("auto", *PIXEL_SOURCES):
        raise ValueError(f"pixel source must be auto or one of {PIXEL_SOURCES}, got {source!r}")
    if source == "auto":
        source = pixel_source_in(data_dir)
    if source in ("cifar10", "mnist") and data_dir is None:
        raise ValueError(f"pixel source {source} needs --data-dir")
    if source == "cifar10":
        data = load_cifar(data_dir, 10)
        grey = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        data = TensorSplit((data.x_train * grey).sum(1, keepdim=True), data.y_train,
                           (data.x_test * grey).sum(1, keepdim=True), data.y_test, 10)
        what = f"CIFAR-10 grey from {data_dir}"
    elif source == "mnist":
        data, what = load_mnist_idx(data_dir), f"MNIST IDX from {data_dir}"
    else:
        data, what = load_digits(), "scikit-learn digits"

    def seq(x: torch.Tensor) -> torch.Tensor:  # [N, 1, h, w] -> [N, side * side, 1]
        if x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return x.reshape(len(x), side * side, 1)

    x_train, x_test = seq(data.x_train), seq(data.x_test)
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
    split = TensorSplit((x_train - mean) / std, data.y_train, (x_test - mean) / std,
                        data.y_test, data.num_classes)
    return split, (f"{what}, {len(data.y_train)} train / {len(data.y_test)} test, read pixel "
                   f"by pixel at {side}x{side} (T = {side * side})")


# Plain-text corpora: train / valid / test file names, first match wins (Wikitext-103 raw,
# Wikitext's tokenised files, Penn Treebank's, then generic names).
TEXT_SPLIT_NAMES = {
    "train": ("wiki.train.raw", "wiki.train.tokens", "ptb.train.txt", "train.txt"),
    "valid": ("wiki.valid.raw", "wiki.valid.tokens", "ptb.valid.txt", "valid.txt"),
    "test": ("wiki.test.raw", "wiki.test.tokens", "ptb.test.txt", "test.txt"),
}
TEXT_SUBFOLDERS = ("", "wikitext-103-raw/", "wikitext-103/", "wikitext-2-raw/", "wikitext-2/")


def text_splits(data_dir: str | Path, max_chars: int | None = None) -> dict[str, str]:
    """The train / valid / test texts of a plain-text corpus in `data_dir` (or its
    wikitext-103-raw/ ... subfolder), by `TEXT_SPLIT_NAMES`; read as UTF-8, at most
    `max_chars` characters each."""
    data_dir = Path(data_dir)
    out = {}
    for split, names in TEXT_SPLIT_NAMES.items():
        path = _find(data_dir, [sub + n for sub in TEXT_SUBFOLDERS for n in names],
                     f"{split} text")
        with path.open(encoding="utf-8", errors="replace") as f:
            out[split] = f.read(max_chars) if max_chars else f.read()
    return out


def char_corpus_splits(data_dir: str | Path, max_chars: int | None = None) -> CharCorpus:
    """A character-level `CharCorpus` from a corpus folder (`text_splits`): train and valid
    files as they are (the test file is left for a final evaluation), vocabulary from all
    three; a character only in valid/test still gets an id."""
    texts = text_splits(data_dir, max_chars)
    vocab = sorted(set("".join(texts.values())))
    lookup = {ch: i for i, ch in enumerate(vocab)}

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)

    return CharCorpus(ids(texts["train"]), ids(texts["valid"]), vocab)


@dataclass
class WordCorpus:
    """A word-level corpus: token ids per split, its vocabulary (the train words, plus
    "<unk>" for the rest and "<eos>" at each line end, as the usual word-LM setup)."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def word_corpus(data_dir: str | Path, max_chars: int | None = None) -> WordCorpus:
    """Whitespace-separated words of a corpus folder (`text_splits`), "<eos>" after each
    line; the vocabulary is the train split's words ("<unk>" for others)."""
    texts = text_splits(data_dir, max_chars)

    def words(text: str) -> list[str]:
        return [w for line in text.splitlines() for w in (*line.split(), "<eos>")]

    split_words = {k: words(v) for k, v in texts.items()}
    vocab = sorted(set(split_words["train"]) | {"<unk>", "<eos>"})
    lookup = {w: i for i, w in enumerate(vocab)}
    unk = lookup["<unk>"]

    def ids(ws: list[str]) -> torch.Tensor:
        return torch.tensor([lookup.get(w, unk) for w in ws], dtype=torch.int64)

    return WordCorpus(ids(split_words["train"]), ids(split_words["valid"]),
                      ids(split_words["test"]), vocab)
