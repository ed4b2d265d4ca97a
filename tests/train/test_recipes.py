"""`highwaybp experiment recipes` on a tiny generated corpus: the output file, the arms'
shared batches and dropout masks, the cosine curves and the controller summaries."""

from __future__ import annotations

import json
import random

import pytest
import torch

import highwaybp as hbp
from highwaybp.cli import main
from highwaybp.train.recipe_tasks import batchify, shipped_text, word_corpus


def _corpus(path):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_word_corpus_tokenises_as_pytorch_examples(tmp_path):
    text = _corpus(tmp_path / "c.txt")
    corpus = word_corpus(text)
    lines = text.read_text().splitlines()
    n_words = sum(len(line.split()) + 1 for line in lines)  # + <eos> per line
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == n_words
    assert corpus.vocab_size == 31  # 30 words + <eos>
    data = batchify(corpus.train, 4)
    assert data.shape == (len(corpus.train) // 4, 4)
    assert data[1, 0] == corpus.train[1]  # column 0 is one contiguous stream


def test_wikitext_preparation_splits_punctuation_and_unks_rare_words(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the cat, the dog.\n" * 220 + "the cat's hat; zebra!\n")
    corpus = word_corpus(path, tokenize="wikitext")
    ids = torch.cat([corpus.train, corpus.valid, corpus.test]).tolist()
    # 220 x [the cat , the dog . <eos>] + [the cat's hat ; zebra ! <eos>]
    assert len(ids) == 220 * 7 + 7
    # kept (>= 3 times): the cat , dog . <eos>; cat's hat ; zebra ! (once each): <unk>
    assert corpus.vocab_size == 7
    assert ids[:7] == [0, 1, 2, 0, 3, 4, 5]  # punctuation split off the words
    assert ids[-7:] == [0, 6, 6, 6, 6, 6, 5]
    with pytest.raises(ValueError, match="tokenize must be one of"):
        word_corpus(path, tokenize="bpe")


def test_shipped_corpus_is_the_word_level_text():
    text = shipped_text()
    assert text.startswith("First Citizen:")
    assert len({w for line in text.splitlines() for w in line.split()}) > 20_000


def test_recipes_tiny_run(tmp_path):
    corpus = _corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    rc = main(["experiment", "recipes", "--text", str(corpus), "--layers", "1",
               "--embed", "8", "--hidden", "8", "--bptt", "6", "--batch", "4",
               "--eval-batch", "2", "--steps", "4", "--eval-every", "2", "--probe-every", "2",
               "--probe-k", "1,2", "--probe-anderson", "3", "--lr", "20",
               "--arms", "exact;highway:k=6;highway:k=2,anderson=3;auto;auto:break_even=3",
               "--seeds", "0",
               "--threads", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "wordlm-gru" / "recipes.json").read_text())
    rows = {r["arm"]: r for r in doc["summary"]}
    assert set(rows) == {"exact", "highway:k=6", "highway:k=2,anderson=3", "auto",
                         "auto:break_even=3"}
    wide = rows["auto:break_even=3"]["controller"][0]
    assert wide["schedule"] == "auto:break_even=3"  # the option reached the controller
    # k = bptt is exact backprop: with the same batches and dropout masks (seeded per step)
    # its run is exact's to rounding; with masks drawn from one stream they would differ.
    assert rows["highway:k=6"]["final_mean"] == pytest.approx(
        rows["exact"]["final_mean"], rel=1e-5)
    assert rows["highway:k=2,anderson=3"]["final_mean"] != pytest.approx(
        rows["exact"]["final_mean"], rel=1e-5)
    assert rows["exact"]["sweeps_per_step"] == 2.0
    assert rows["highway:k=2,anderson=3"]["sweeps_per_step"] == 3.0
    auto = rows["auto"]["controller"][0]
    assert auto["schedule"] == "auto" and auto["probes"] >= 1
    curves = doc["cosine_curves"]["0"]
    assert set(curves) == {"0", "2", "4"}
    assert set(curves["4"]) == {"plain", "anderson=3"}
    assert curves["4"]["plain"]["1"] == pytest.approx(curves["4"]["anderson=3"]["1"], abs=1e-12)
    assert (out / "wordlm-gru" / "recipes.png").exists()


@pytest.mark.parametrize("recipe", ["charlm-gru", "pixel-gru", "resnet20", "chargpt"])
def test_other_recipes_tiny_run(tmp_path, recipe):
    """Each recipe trains its arms from one initialisation on one batch sequence: Highway
    at k >= L is exact backprop, so its run equals exact's; a mixed k = 1 + Anderson run
    differs (the method is applied); the cosine curves cover the changed parameters."""
    out = tmp_path / "out"
    # L: the RNN recipes' T (128 / 64 steps); ResNet20's chain 9; the GPT's 8
    big_k = {"charlm-gru": 128, "pixel-gru": 64, "resnet20": 9, "chargpt": 8}[recipe]
    rc = main(["experiment", "recipes", "--recipe", recipe, "--steps", "2",
               "--eval-every", "2", "--probe-every", "2", "--probe-k", "1",
               "--probe-anderson", "3", "--batch", "4",
               "--arms", f"exact;highway:k={big_k};highway:k=2,anderson=3", "--seeds", "0",
               "--threads", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / recipe / "recipes.json").read_text())
    rows = {r["arm"]: r for r in doc["summary"]}
    assert rows[f"highway:k={big_k}"]["final_mean"] == pytest.approx(
        rows["exact"]["final_mean"], rel=1e-4)
    runs = {r["arm"]: r for r in doc["runs"]}
    assert doc["metric"] in ("valid loss (nats/char)", "test error (%)")
    curves = doc["cosine_curves"]["0"]["2"]
    assert set(curves) == {"plain", "anderson=3"}
    assert curves["plain"]["1"] == pytest.approx(curves["anderson=3"]["1"], abs=1e-12)
    assert runs["highway:k=2,anderson=3"]["controller"]["train_sweeps"] == 2 * 3.0


def _run(arm, seed, final, sweeps=2.0, probe=0.0):
    return {"arm": arm, "seed": seed, "steps_done": 10, "train_seconds": 1.0,
            "history": [{"step": 10, "metric": final, "train_seconds": 1.0}],
            "controller": {"train_sweeps": 10 * sweeps, "probe_sweeps": probe}}


def test_summary_within_seed_noise_uses_exacts_spread():
    from highwaybp.train.recipes import summarize

    exact = [100.0, 110.0, 120.0]  # std 10: noise 2 * 10 * sqrt(2/3) = 16.33
    runs = [_run("exact", s, v) for s, v in enumerate(exact)]
    runs += [_run("close", s, v + 16.0) for s, v in enumerate(exact)]
    runs += [_run("far", s, v + 16.7) for s, v in enumerate(exact)]
    # a mean far off with a huge spread of its own must not pass by that spread
    runs += [_run("wild", s, v) for s, v in enumerate([100.0, 110.0, 5000.0])]
    runs += [_run("probed", s, v, probe=2.0) for s, v in enumerate(exact)]
    rows = {r["arm"]: r for r in summarize(runs)}
    assert rows["close"]["within_noise"] and not rows["far"]["within_noise"]
    assert not rows["wild"]["within_noise"]
    assert rows["close"]["vs_exact"] == pytest.approx(126.0 / 110.0)
    assert rows["probed"]["probe_share"] == pytest.approx(0.1)
    assert rows["probed"]["sweeps_per_step"] == pytest.approx(2.2)


def test_summary_of_an_exact_metric_at_zero_has_no_ratio():
    """A test error of 0% on exact (a small test set) leaves the ratio undefined rather
    than crashing the run that writes the summary."""
    from highwaybp.train.recipes import summarize

    runs = [_run("exact", 0, 0.0), _run("exact", 1, 0.0), _run("k1", 0, 0.3), _run("k1", 1, 0.0)]
    rows = {r["arm"]: r for r in summarize(runs)}
    assert rows["k1"]["vs_exact"] is None
    assert rows["k1"]["within_noise"] is False  # exact's spread is 0: any difference is out


def test_recipe_flags_reach_the_recipe_and_a_zero_clip_is_kept():
    import argparse

    from highwaybp.train.recipe_tasks import make_recipe

    args = argparse.Namespace(recipe="pixel-gru", lr=1e-4, batch=16, clip=0.0)
    recipe = make_recipe(args, 0)
    assert recipe.clip == 0.0  # off, not the recipe's default 1.0
    opt = recipe.make_optimizer(recipe.make_model())
    assert opt.param_groups[0]["lr"] == 1e-4
    assert len(recipe.batch(0)[1]) == 16
    default = make_recipe(argparse.Namespace(recipe="pixel-gru", lr=None, batch=None,
                                             clip=None), 0)
    assert default.clip == 1.0 and len(default.batch(0)[1]) == 64
    with pytest.raises(SystemExit):
        main(["experiment", "recipes", "--recipe", "pixel-gru", "--lr", "0"])


@pytest.mark.parametrize("recipe", ["wordlm-gru", "charlm-gru", "pixel-gru"])
def test_split_reaches_every_gru_recipe_and_other_recipes_refuse_it(recipe, tmp_path):
    import argparse

    from highwaybp.train.recipe_tasks import make_recipe

    args = argparse.Namespace(recipe=recipe, lr=None, batch=None, clip=None, split="diagonal",
                              text=str(_corpus(tmp_path / "c.txt")), tokenize="raw",
                              embed=8, hidden=8, layers=1, dropout=0.0, bptt=5, eval_batch=2)
    if recipe == "wordlm-gru":
        args.batch = 2
    model = make_recipe(args, 0).make_model()
    grus = [m for m in model.modules() if isinstance(m, hbp.GRU)]
    assert [m.split for m in grus] == ["diagonal"]
    assert "split=diagonal" in make_recipe(args, 0).config["model"]
    for other in ("wordlm-lstm", "resnet20", "chargpt"):
        with pytest.raises(SystemExit, match="--split diagonal is for the GRU recipes"):
            main(["experiment", "recipes", "--recipe", other, "--split", "diagonal",
                  "--out", str(tmp_path / "o")])


def test_combine_and_resume_treat_a_missing_added_option_as_its_earlier_value(tmp_path, capsys):
    """A file written before --split existed ran the gate split: it combines with a gate
    run and is refused beside a diagonal run in either order; a run folder from before
    resumes at the gate split and refuses the diagonal one."""
    from highwaybp.train.recipes import combine

    def tiny(seed, split, out, expect=0):
        rc = main(["experiment", "recipes", "--recipe", "pixel-gru", "--steps", "1",
                   "--eval-every", "1", "--probe-every", "0", "--batch", "4", "--arms", "exact",
                   "--seeds", str(seed), "--split", split, "--threads", "1", "--out", str(out)])
        assert rc == expect
        return out / "pixel-gru" / "recipes.json"

    gate, diagonal = tiny(0, "gate", tmp_path / "g"), tiny(1, "diagonal", tmp_path / "d")
    gate1 = tiny(1, "gate", tmp_path / "g1")
    old = tmp_path / "old.json"  # as written before the option existed
    doc = json.loads(gate.read_text())
    del doc["config"]["split"]
    old.write_text(json.dumps(doc))
    for pair in ((old, diagonal), (diagonal, old)):
        with pytest.raises(ValueError, match="split"):
            combine([str(p) for p in pair], str(tmp_path / "c"))
    merged = combine([str(old), str(gate1)], str(tmp_path / "c"))
    assert sorted(r["seed"] for r in merged["runs"]) == [0, 1]
    # resume: a folder whose config.json has no split key
    folder = tmp_path / "g" / "pixel-gru" / "config.json"
    config = json.loads(folder.read_text())
    config.pop("split", None)
    folder.write_text(json.dumps(config))
    tiny(0, "gate", tmp_path / "g")  # resumes (nothing left to train)
    capsys.readouterr()
    tiny(0, "diagonal", tmp_path / "g", expect=2)
    assert "split: None (in config.json) -> 'diagonal' (now)" in capsys.readouterr().err
