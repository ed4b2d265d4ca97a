"""The paper's on-disk formats (CIFAR python batches, IDX, plain text corpora), read from tiny
files written here in those formats, and the two paper experiments run end to end on them."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from highwaybp.cli import main
from highwaybp.train import data as D


def write_cifar(root, classes: int = 10, n_train: int = 6, n_test: int = 4, seed: int = 0):
    """CIFAR's python layout: pickled dicts of uint8 [N, 3072] rows (R, G, B planes)."""
    folder, train_names, test_names, label_key, _ = D.CIFAR_LAYOUT[classes]
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, names, n in (("train", train_names, n_train), ("test", test_names, n_test)):
        xs, ys = [], []
        for name in names:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.integers(0, classes, n)]
            with (d / name).open("wb") as f:
                pickle.dump({b"data": x, label_key: y, b"batch_label": b"x"}, f)
            xs.append(x)
            ys += y
        written[split] = (np.concatenate(xs), ys)
    return written


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    body = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape) + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(body)


def write_mnist(root, side: int = 6, n_train: int = 5, n_test: int = 3, gz: bool = True):
    rng = np.random.default_rng(1)
    arrays = {"train_images": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test).astype(np.uint8)}
    for key, stem in D.MNIST_FILES.items():
        write_idx(root / (stem + (".gz" if gz else "")), arrays[key], gz)
    return arrays


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_batches_load_as_written(tmp_path, classes):
    written = write_cifar(tmp_path, classes)
    for where in (tmp_path, tmp_path / D.CIFAR_LAYOUT[classes][0]):  # parent or the folder
        split = D.load_cifar(where, classes)
        x, y = written["train"]
        assert split.x_train.shape == (len(y), 3, 32, 32) and split.num_classes == classes
        # pixel (c, i, j) of image n is byte c * 1024 + i * 32 + j of its row
        assert torch.equal((split.x_train * 255).round().to(torch.uint8),
                           torch.from_numpy(x.reshape(-1, 3, 32, 32)))
        assert split.y_train.tolist() == y and split.y_test.tolist() == written["test"][1]


def test_cifar_missing_batch_names_the_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        D.load_cifar(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_loads_as_written(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    split = D.load_mnist_idx(tmp_path)
    assert torch.equal((split.x_train[:, 0] * 255).round().to(torch.uint8),
                       torch.from_numpy(arrays["train_images"]))
    assert split.y_test.tolist() == arrays["test_labels"].tolist()


def test_idx_int32_big_endian_and_bad_magic(tmp_path):
    a = np.arange(-3, 9, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "a.idx", a, gz=False)
    assert np.array_equal(D.load_idx(tmp_path / "a.idx"), a)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.load_idx(tmp_path / "bad.idx")


def test_pixel_sequences_from_cifar_are_grey_pixels_in_order(tmp_path):
    written = write_cifar(tmp_path)
    assert D.pixel_source_in(tmp_path) == "cifar10"
    split, what = D.pixel_sequences(32, tmp_path)
    n = len(written["train"][1])  # 5 batches of 6
    assert split.x_train.shape == (n, 1024, 1) and "CIFAR-10 grey" in what
    rgb = torch.from_numpy(written["train"][0].reshape(-1, 3, 32, 32)).float() / 255
    grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).reshape(n, 1024)
    expected = (grey - grey.mean()) / grey.std()
    torch.testing.assert_close(split.x_train[..., 0], expected)


def test_pixel_source_detects_mnist_and_falls_back_to_digits(tmp_path):
    write_mnist(tmp_path)
    assert D.pixel_source_in(tmp_path) == "mnist"
    assert D.pixel_source_in(tmp_path / "nothing") == "digits"


WIKI = {"train": "= Title =\n the cat sat \n", "valid": " the dog sat \n", "test": " a cat \n"}


def write_wikitext(root):
    d = root / "wikitext-103-raw"
    d.mkdir()
    for split, text in WIKI.items():
        (d / f"wiki.{split}.raw").write_text(text, encoding="utf-8")


def test_wikitext_raw_names_and_char_corpus(tmp_path):
    write_wikitext(tmp_path)
    assert D.text_splits(tmp_path) == WIKI
    corpus = D.char_corpus_splits(tmp_path)
    assert "".join(corpus.vocab[i] for i in corpus.valid.tolist()) == WIKI["valid"]
    assert "g" in corpus.vocab  # a character only in valid still has an id


def test_word_corpus_unknown_words_and_line_ends(tmp_path):
    write_wikitext(tmp_path)
    corpus = D.word_corpus(tmp_path)
    words = [corpus.vocab[i] for i in corpus.valid.tolist()]
    assert words == ["the", "<unk>", "sat", "<eos>"]  # "dog" is not a train word
    assert [corpus.vocab[i] for i in corpus.test.tolist()] == ["<unk>", "cat", "<eos>"]


def test_text_missing_split_names_the_files(tmp_path):
    (tmp_path / "train.txt").write_text("a b")
    with pytest.raises(FileNotFoundError, match=r"wiki\.valid\.raw"):
        D.text_splits(tmp_path)


def test_pixel_gru_experiment_runs_on_cifar_files(tmp_path):
    write_cifar(tmp_path / "data", n_train=16, n_test=4)
    out = tmp_path / "out"
    assert main(["experiment", "pixel-gru", "--data-dir", str(tmp_path / "data"), "--tiny",
                 "--quiet", "--out", str(out)]) == 0
    task = json.loads((out / "paper_results.json").read_text())["tasks"]["pixel-gru_seed0"]
    assert set(task["runs"]) == {"exact", "highway_k0", "highway_k1", "fixedpoint_k1"}
    assert task["config"]["L"] == 16 and "CIFAR-10 grey" in task["config"]["data"]


def test_pixel_gru_experiment_refuses_a_folder_without_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither CIFAR-10"):
        main(["experiment", "pixel-gru", "--data-dir", str(tmp_path), "--tiny", "--quiet",
              "--out", str(tmp_path / "out")])


def test_resnet32_experiment_runs_on_cifar_files(tmp_path):
    write_cifar(tmp_path / "data", n_train=16, n_test=4)
    out = tmp_path / "out"
    assert main(["experiment", "resnet32-cifar10", "--data-dir", str(tmp_path / "data"),
                 "--tiny", "--quiet", "--out", str(out)]) == 0
    task = json.loads((out / "paper_results.json").read_text())["tasks"][
        "resnet32-cifar10_seed0"]
    assert set(task["runs"]) == {"exact", "highway_k0", "highway_k1", "fixedpoint_k1"}
    assert "SGD" in task["config"]["optimizer"]


def test_augment_crops_and_flips_within_the_padded_image():
    from highwaybp.train.paper_experiment import augment

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    out = augment(x, torch.Generator().manual_seed(0), pad=1)
    assert out.shape == x.shape
    for i in range(2):  # every non-zero value comes from the same image, rows contiguous
        vals = out[i][out[i] != 0]
        assert set(vals.tolist()) <= set(x[i].flatten().tolist())
