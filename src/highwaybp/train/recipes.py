"""`highwaybp experiment recipes`: standard training recipes, as users run them, with exact
backprop, plain Highway(k), Anderson-mixed Highway(k, anderson=m) and the `auto` controller.

Recipe `wordlm-gru` / `wordlm-lstm` is pytorch/examples' word-level language model
(word_language_model/main.py defaults): embedding 200, a 2-layer GRU/LSTM of 200, dropout
0.2, the hidden state carried across batches (detached), plain SGD at lr 20, gradient-norm
clipping 0.25, bptt 35, batch 20, evaluation batch 10, perplexity on the validation split.
The corpus is the word-level text shipped with the package (tinyshakespeare, public domain,
tokenised as pytorch/examples does: whitespace words, `<eos>` per line; 243k tokens, a
25.7k-word vocabulary; 90/5/5 split) or `--text FILE`.

Every arm of a seed starts from the same initialisation and sees the same batches and dropout
masks (the RNG is seeded from (seed, step) before each step); the arms train round-robin,
one step each in turn, so a load change on a shared machine slows them alike. Per arm: eval
perplexity over training, VJP sweeps (training backward + probes, the `KController` unit),
training seconds per step, and time-to-quality (training seconds to reach exact's final
perplexity of the same seed, or None). Per seed, on the exact arm's
model every `--probe-every` steps: the cosine to exact of plain and mixed Highway(k)
gradients for k in `--probe-k`, over the recurrent and embedding parameters (the decoder's
gradient is exact under every method), in float64 (Fig. 6 of the paper, plain beside
accelerated).

Writes `<out>/<recipe>/recipes.json` (config, command, per seed and arm the history and the
summary, the cosine curves) and `recipes.png` after every evaluation round; resumes from
`<out>/<recipe>/checkpoints/`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from highwaybp.control import KController
from highwaybp.core.fidelity import compare_gradients, use_method
from highwaybp.core.methods import Exact, Highway, method_from_string
from highwaybp.models.rnn import GRU, LSTM
from highwaybp.train.cli_types import nonneg_int, out_dir, positive_int
from highwaybp.train.io import atomic_write_json, check_resume_config, save_figure
from highwaybp.train.loop import StopGuard, TrainLoop, echo, stopped_message
from highwaybp.train.threads import use_threads

RECIPES = ("wordlm-gru", "wordlm-lstm")
DEFAULT_ARMS = ("exact;highway:k=1;highway:k=3;highway:k=5;highway:k=3,anderson=5;"
                "highway:k=5,anderson=5;auto")
AUTO = "auto"


# ---------------------------------------------------------------------------- the corpus
@dataclass
class WordCorpus:
    """Token ids of the train / valid / test splits and the vocabulary size."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab_size: int


def shipped_text() -> str:
    """The word-level corpus shipped with the package (tinyshakespeare, public domain)."""
    data = resources.files("highwaybp.train").joinpath("corpora/tinyshakespeare.txt.gz")
    return gzip.decompress(data.read_bytes()).decode("utf-8")


def word_corpus(path: str | Path | None = None) -> WordCorpus:
    """pytorch/examples' tokenisation: each line's whitespace words plus `<eos>`; the
    vocabulary over the whole text; splits 90/5/5 in order."""
    text = shipped_text() if path is None else Path(path).read_text(encoding="utf-8")
    words = [w for line in text.splitlines() for w in (*line.split(), "<eos>")]
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


# ---------------------------------------------------------------------------- the model
class WordLM(nn.Module):
    """Embedding -> dropout -> highwaybp GRU/LSTM (with dropout between layers) -> dropout
    -> Linear, pytorch/examples' RNNModel (untied, uniform(-0.1, 0.1) init)."""

    def __init__(self, vocab: int, cell: str, embed: int, hidden: int, layers: int,
                 dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, embed)
        rnn = GRU if cell == "gru" else LSTM
        self.rnn = rnn(embed, hidden, num_layers=layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab)
        self.cell, self.layers, self.hidden = cell, layers, hidden
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch: int) -> Any:
        h = torch.zeros(self.layers, batch, self.hidden)
        return h if self.cell == "gru" else (h, h.clone())

    def forward(self, x: Tensor, hidden: Any) -> tuple[Tensor, Any]:
        """x [T, B] -> logits [T, B, V], the new hidden state."""
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden

    def changed_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradient a Highway/FixedPoint backward changes: the RNN's
        and the embedding's (upstream of it); the decoder's is exact under every method."""
        return [*self.rnn.parameters(), self.encoder.weight]


def detach(hidden: Any) -> Any:
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def perplexity(model: WordLM, data: Tensor, bptt: int) -> float:
    """exp(mean cross-entropy) over `data` [N, B] in bptt windows, hidden carried."""
    model.eval()
    hidden = model.init_hidden(data.shape[1])
    total, count = 0.0, 0
    for i in range(0, data.shape[0] - 1, bptt):
        n = min(bptt, data.shape[0] - 1 - i)
        logits, hidden = model(data[i : i + n], hidden)
        total += float(lm_loss(logits, data[i + 1 : i + 1 + n])) * n
        count += n
    model.train()
    return math.exp(total / count)


# ---------------------------------------------------------------------------- one arm
def arm_controller(model: nn.Module, arm: str) -> KController:
    """Every arm runs under a KController (the one owner of the sweep count): `auto` is
    the recommended controller, any other arm a constant method."""
    if arm == AUTO:
        return KController(model)
    return KController(model, "constant:" + method_from_string(arm).to_string())


class Arm:
    """One arm (a method, or `auto`) of one seed: model, optimizer, carried hidden state,
    history; trained through a `TrainLoop` that checkpoints and resumes it."""

    def __init__(self, args: Any, seed: int, name: str, corpus: WordCorpus,
                 train: Tensor, valid: Tensor, root: Path) -> None:
        self.args, self.seed, self.name = args, seed, name
        self.train, self.valid = train, valid
        torch.manual_seed(seed)  # the same initialisation for every arm of a seed
        self.model = WordLM(corpus.vocab_size, args.cell, args.embed, args.hidden,
                            args.layers, args.dropout)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr)
        self.ctl = arm_controller(self.model, name)
        self.hidden = self.model.init_hidden(args.batch)
        self.history: list[dict[str, Any]] = []
        self.failed = False
        safe = "".join(c if c.isalnum() else "_" for c in name)
        self.loop = TrainLoop(self._train_step, args.steps, state=self._state,
                              load_state=self._load_state,
                              checkpoint_path=root / "checkpoints" / f"seed{seed}_{safe}.pt",
                              after_step=self._after_step, name=f"seed {seed} {name}",
                              progress=False, log=lambda msg: echo(f"  {msg}"))
        self.loop.resume()
        if self.step == 0 and not self.history:
            self._evaluate(0)

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def done(self) -> bool:
        return self.failed or self.step >= self.args.steps

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Window `step` of the carried streams (wrapping around at the end of an epoch)."""
        bptt, windows = self.args.bptt, (self.train.shape[0] - 1) // self.args.bptt
        i = (step % windows) * bptt
        return self.train[i : i + bptt], self.train[i + 1 : i + 1 + bptt]

    def _train_step(self, step: int) -> float:
        x, y = self.batch(step)
        if step % ((self.train.shape[0] - 1) // self.args.bptt) == 0:
            self.hidden = self.model.init_hidden(self.args.batch)  # a new epoch
        hidden = detach(self.hidden)
        self.ctl.step(step, loss_fn=lambda: lm_loss(self.model(x, hidden)[0], y))
        # Dropout masks are a function of (seed, step): every arm of a seed draws the same
        # ones, whatever the other arms (round-robin) or the probes drew before.
        torch.manual_seed(self.seed * 1_000_003 + step)
        self.opt.zero_grad(set_to_none=True)
        logits, self.hidden = self.model(x, hidden)
        loss = lm_loss(logits, y)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.opt.step()
        return float(loss.detach())

    def _after_step(self, step: int, value: float) -> bool:
        done = step + 1
        if not math.isfinite(value):
            echo(f"  seed {self.seed} {self.name}: loss {value} at step {done}; stopping")
            self.failed = True
            self.loop.save(done)
            self.loop.end_early()
            return False
        if done % self.args.eval_every and done != self.args.steps:
            return False
        self._evaluate(done)
        last = self.history[-1]
        echo(f"  seed {self.seed} {self.name:24s} step {done:5d} valid ppl "
             f"{last['valid_ppl']:9.1f}  sweeps {last['vjp_sweeps']:7.0f}  "
             f"({last['train_seconds']:.0f} s) {last['method']}")
        return True

    def _evaluate(self, step: int) -> None:
        self.history.append({
            "step": step,
            "valid_ppl": perplexity(self.model, self.valid, self.args.bptt),
            "train_seconds": self.loop.train_seconds,
            "vjp_sweeps": self.ctl.total_sweeps(),
            "method": "" if self.ctl.method is None else repr(self.ctl.method),
        })

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "hidden": self.hidden, "history": self.history, "failed": self.failed,
                "ctl": self.ctl.state_dict(), "seconds": self.loop.train_seconds}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.hidden, self.history = state["hidden"], state["history"]
        self.failed = state["failed"]
        self.ctl.load_state_dict(state["ctl"])
        self.loop.train_seconds = state["seconds"]

    def result(self) -> dict[str, Any]:
        return {"arm": self.name, "seed": self.seed, "steps_done": self.step,
                "failed": self.failed, "train_seconds": self.loop.train_seconds,
                "history": self.history, "controller": self.ctl.summary()}


# ---------------------------------------------------------------------------- fidelity
def cosine_curve(model: WordLM, x: Tensor, y: Tensor, hidden: Any, ks: list[int],
                 windows: list[int]) -> dict[str, dict[int, float]]:
    """{"plain" / "anderson=m": {k: cosine to exact}} of the changed parameters' gradient,
    on a float64 copy of `model` in eval mode (no dropout), for the batch (x, y)."""
    import copy

    probe = copy.deepcopy(model).double().eval()
    params = probe.changed_parameters()
    hidden = (tuple(h.double() for h in hidden) if isinstance(hidden, tuple)
              else hidden.double())

    def grad(method: Any) -> list[Tensor]:
        with use_method(probe, method):
            loss = lm_loss(probe(x, hidden)[0], y)
            return list(torch.autograd.grad(loss, params))

    exact = grad(Exact())
    curves: dict[str, dict[int, float]] = {}
    for m in [0, *windows]:
        label = "plain" if m == 0 else f"anderson={m}"
        curves[label] = {k: compare_gradients(grad(Highway(k=k, anderson=m)), exact)["cosine"]
                         for k in ks}
    return curves


# ---------------------------------------------------------------------------- summary
def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm over seeds: final perplexity (mean, std, ratio to exact's mean), VJP sweeps
    per step, seconds per step and its ratio to exact's, and time-to-quality per seed."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    exact_by_seed = {r["seed"]: r for r in runs if r["arm"] == "exact"}
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm and r["steps_done"]]
        if not mine:
            continue
        finals = [r["history"][-1]["valid_ppl"] for r in mine]
        per_step = [r["train_seconds"] / r["steps_done"] for r in mine]
        sweeps = [(r["controller"]["train_sweeps"] + r["controller"]["probe_sweeps"])
                  / r["steps_done"] for r in mine]
        ttq = []
        for r in mine:
            ex = exact_by_seed.get(r["seed"])
            goal = ex["history"][-1]["valid_ppl"] if ex else None
            hit = None if goal is None else next(
                (h["train_seconds"] for h in r["history"] if h["valid_ppl"] <= goal), None)
            ttq.append(hit)
        row = {"arm": arm, "seeds": [r["seed"] for r in mine], "final_ppl": finals,
               "final_ppl_mean": statistics.fmean(finals),
               "final_ppl_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
               "sweeps_per_step": statistics.fmean(sweeps),
               "seconds_per_step": statistics.median(per_step),
               "time_to_exact_final": ttq,
               "controller": [r["controller"] for r in mine]}
        rows.append(row)
    exact = next((r for r in rows if r["arm"] == "exact"), None)
    for row in rows:
        if exact:
            row["ppl_vs_exact"] = row["final_ppl_mean"] / exact["final_ppl_mean"]
            row["seconds_per_step_vs_exact"] = row["seconds_per_step"] / exact["seconds_per_step"]
            row["sweeps_vs_exact"] = (row["sweeps_per_step"] / exact["sweeps_per_step"]
                                      if exact["sweeps_per_step"] else None)
    return rows


def write(root: Path, args: Any, arms: list[Arm], curves: dict) -> dict[str, Any]:
    runs = [a.result() for a in arms]
    doc = {"recipe": args.recipe, "command": "highwaybp " + " ".join(sys.argv[1:]),
           "config": {k: v for k, v in vars(args).items() if k != "func"},
           "torch_threads": torch.get_num_threads(),
           "summary": summarize(runs), "cosine_curves": curves, "runs": runs}
    atomic_write_json(root / "recipes.json", doc)
    return doc


def plot(root: Path, doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in doc["runs"]:
        hist = [h for h in r["history"] if h["step"] > 0]
        ax1.plot([h["step"] for h in hist], [h["valid_ppl"] for h in hist],
                 "-" if "anderson" in r["arm"] or r["arm"] in ("exact", AUTO) else "--",
                 label=f"{r['arm']} (seed {r['seed']})")
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("validation perplexity")
    ax1.legend(fontsize=6)
    seed0 = next(iter(doc["cosine_curves"].values()), {})
    for step, curves in seed0.items():
        for label, curve in curves.items():
            ax2.plot([int(k) for k in curve], list(curve.values()),
                     "-o" if label != "plain" else "--x", label=f"step {step} {label}",
                     markersize=3)
    ax2.set_xlabel("k")
    ax2.set_ylabel("cosine to exact (RNN + embedding)")
    if seed0:  # (no curves: --probe-every 0)
        ax2.legend(fontsize=6)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{doc['recipe']}: pytorch/examples word LM")
    fig.tight_layout()
    save_figure(fig, root / "recipes.png")


def arm_list(text: str) -> list[str]:
    """'exact;highway:k=3,anderson=5;auto' -> arm names (';' separates: methods hold ',')."""
    names = [t.strip() for t in text.split(";") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one arm")
    for n in names:
        if n != AUTO:
            try:
                method_from_string(n)
            except (ValueError, TypeError) as err:
                raise argparse.ArgumentTypeError(str(err)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an arm is listed twice in {text!r}")
    return names


def int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected ints >= 0, got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipes", help="standard recipes: exact vs plain vs Anderson-mixed Highway vs auto",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=RECIPES, default="wordlm-gru")
    p.add_argument("--text", default=None, help="a text file (default: the shipped corpus)")
    p.add_argument("--arms", type=arm_list, default=arm_list(DEFAULT_ARMS),
                   help=f"';'-separated methods and/or 'auto' (default {DEFAULT_ARMS!r})")
    p.add_argument("--seeds", type=int_list, default=[0, 1, 2])
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--eval-every", type=positive_int, default=100)
    p.add_argument("--probe-every", type=nonneg_int, default=100,
                   help="cosine curves on the exact arm every N steps (0: off)")
    p.add_argument("--probe-k", type=int_list, default=[1, 2, 3, 5, 8])
    p.add_argument("--probe-anderson", type=int_list, default=[5])
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--embed", type=positive_int, default=200)
    p.add_argument("--hidden", type=positive_int, default=200)
    p.add_argument("--bptt", type=positive_int, default=35)
    p.add_argument("--batch", type=positive_int, default=20)
    p.add_argument("--eval-batch", type=positive_int, default=10)
    p.add_argument("--lr", type=float, default=20.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's own default)")
    p.add_argument("--out", type=out_dir, default="results/recipes")
    p.add_argument("--combine", nargs="+", default=None, metavar="RECIPES_JSON",
                   help="instead of training: merge the recipes.json files of runs made "
                        "apart (e.g. one process per seed) into <out>/<recipe>/")
    p.set_defaults(func=run)


def combine(paths: list[str], out: str) -> dict[str, Any]:
    """Merge recipes.json files of one recipe and configuration (other seeds or arms,
    trained in separate processes) into one, re-summarised; refuses differing configs."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    keep = [k for k in docs[0]["config"] if k not in (*_NOT_CONFIG, "combine")]
    for path, d in zip(paths[1:], docs[1:]):
        diff = {k: (docs[0]["config"].get(k), d["config"].get(k)) for k in keep
                if docs[0]["config"].get(k) != d["config"].get(k)}
        if d["recipe"] != docs[0]["recipe"] or diff:
            raise ValueError(f"recipes --combine: {path} is another recipe or configuration: "
                             f"{diff or d['recipe']}")
    runs = [r for d in docs for r in d["runs"]]
    seen = [(r["seed"], r["arm"]) for r in runs]
    if len(set(seen)) != len(seen):
        raise ValueError("recipes --combine: a (seed, arm) run appears in two files")
    curves = {seed: c for d in docs for seed, c in d["cosine_curves"].items() if c}
    root = Path(out) / docs[0]["recipe"]
    doc = {"recipe": docs[0]["recipe"], "command": "highwaybp " + " ".join(sys.argv[1:]),
           "combined_from": [d["command"] for d in docs], "config": docs[0]["config"],
           "torch_threads": docs[0]["torch_threads"], "summary": summarize(runs),
           "cosine_curves": curves, "runs": runs}
    atomic_write_json(root / "recipes.json", doc)
    plot(root, doc)
    return doc


def _probe(args: Any, exact: Arm | None, seed_curves: dict) -> None:
    """Cosine curves on the exact arm's model at its current step, every --probe-every
    steps (on the batch of that step, with the hidden state it carries)."""
    if exact is None or not args.probe_every or exact.failed:
        return
    step = exact.step
    if step % args.probe_every or str(step) in seed_curves:
        return
    x, y = exact.batch(step)
    seed_curves[str(step)] = cosine_curve(exact.model, x, y, detach(exact.hidden),
                                          args.probe_k, args.probe_anderson)


_NOT_CONFIG = ("func", "threads", "arms", "seeds", "out", "probe_every", "probe_k",
               "probe_anderson", "eval_every", "combine")


def run(args: argparse.Namespace) -> int:
    if args.combine:
        doc = combine(args.combine, args.out)
        print(f"combined {len(args.combine)} files: {len(doc['runs'])} runs into "
              f"{Path(args.out) / doc['recipe'] / 'recipes.json'}")
        return 0
    args.cell = args.recipe.split("-")[1]
    root = Path(args.out) / args.recipe
    check_resume_config(root, {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG})
    use_threads(args.threads, "highwaybp experiment recipes")
    corpus = word_corpus(args.text)
    train, valid = batchify(corpus.train, args.batch), batchify(corpus.valid, args.eval_batch)
    print(f"  corpus: {len(corpus.train)} train words, vocab {corpus.vocab_size}; arms "
          f"{args.arms}; seeds {args.seeds}", flush=True)
    arms: list[Arm] = []
    curves: dict[str, dict[int, Any]] = {}
    with StopGuard() as guard:
        for seed in args.seeds:
            group = [Arm(args, seed, name, corpus, train, valid, root) for name in args.arms]
            arms.extend(group)
            exact = next((a for a in group if a.name == "exact"), None)
            seed_curves = curves.setdefault(str(seed), {})
            while not all(a.done for a in group):
                if guard.should_stop(0):
                    for a in group:
                        a.loop.save(a.step)
                    write(root, args, arms, curves)
                    print(stopped_message(guard, min(a.step for a in group), args.steps),
                          file=sys.stderr, flush=True)
                    return guard.exit_code()
                _probe(args, exact, seed_curves)
                for a in group:
                    if not a.done:
                        a.loop.advance()
                if all(a.done or a.step % args.eval_every == 0 for a in group):
                    write(root, args, arms, curves)
            _probe(args, exact, seed_curves)  # at the last step too
    doc = write(root, args, arms, curves)
    plot(root, doc)
    print(f"\n{'arm':26s} {'final ppl':>10} {'vs exact':>9} {'sweeps/step':>12} "
          f"{'s/step vs exact':>16}")
    for row in doc["summary"]:
        print(f"{row['arm']:26s} {row['final_ppl_mean']:10.1f} "
              f"{row.get('ppl_vs_exact', float('nan')):9.3f} {row['sweeps_per_step']:12.2f} "
              f"{row.get('seconds_per_step_vs_exact', float('nan')):16.2f}")
    print(f"\nwrote {root / 'recipes.json'}, recipes.png")
    return 0


def render(path: Path, d: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md's section of a recipes.json (`highwaybp report`)."""
    lines = [f"### {d['recipe']}: `{path.as_posix()}`", "", "```", d["command"], "```", ""]
    if d.get("combined_from"):
        lines += ["Combined from:", "", "```", *d["combined_from"], "```", ""]
    rows = d["summary"]
    if rows:
        lines += ["| arm | seeds | final valid ppl (mean +- std) | vs exact | VJP sweeps / step "
                  "| vs exact | s / step vs exact | reached exact's final ppl (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ttq = ", ".join("not reached" if t is None else f"{t:.0f}"
                            for t in r["time_to_exact_final"])
            lines.append(
                f"| {r['arm']} | {len(r['seeds'])} | {r['final_ppl_mean']:.1f} +- "
                f"{r['final_ppl_std']:.1f} | {_ratio(r.get('ppl_vs_exact'))} | "
                f"{r['sweeps_per_step']:.2f} | {_ratio(r.get('sweeps_vs_exact'))} | "
                f"{_ratio(r.get('seconds_per_step_vs_exact'))} | {ttq} |")
        lines.append("")
    for seed, by_step in d.get("cosine_curves", {}).items():
        for step, curves in by_step.items():
            ks = sorted({int(k) for c in curves.values() for k in c})
            lines += [f"Cosine to exact of the RNN + embedding gradient, seed {seed}, step "
                      f"{step} (float64, eval mode):", "",
                      "| | " + " | ".join(f"k={k}" for k in ks) + " |",
                      "|---|" + "---|" * len(ks)]
            for label, c in curves.items():
                lines.append(f"| {label} | " + " | ".join(
                    f"{c[str(k)]:.3f}" if str(k) in c else "" for k in ks) + " |")
            lines.append("")
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
