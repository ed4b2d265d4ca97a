"""`highwaybp experiment charlm`: a char-level GRU/LSTM language model trained with Exact,
Highway(k) and FixedPoint(k) backprop through time (the paper's char-level setting, CPU-sized).

Every method starts from the same initialisation and sees the same batches (batches are a
pure function of the step). The methods are trained together, one step each in turn, so
that load changes on a shared machine affect all of their wall-clock times alike.
The model is Embedding -> highwaybp.GRU/LSTM -> Linear with a
per-step cross-entropy loss (per-step losses are per-layer losses of the iteration).
Validation loss is measured every `--eval-every` steps on fixed validation batches; its
time is excluded from the training wall-clock.

Writes to `--out` (atomically, after every evaluation):
- `charlm.csv`: method, step, train_loss, valid_loss, train_seconds;
- `charlm.json`: the configuration and the same history per method, plus a summary;
- `charlm.png`: validation loss against steps and against training wall-clock.
Runs resume from `<out>/checkpoints/<method>.pt` (finished runs are skipped); a rerun
with another setting (other than --methods, --threads and a larger --steps) is refused.
SIGINT/SIGTERM save every method's checkpoint at the current step before exiting.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from highwaybp.control import KController
from highwaybp.core.methods import Exact, Method, method_from_string
from highwaybp.models.rnn import GRU, LSTM
from highwaybp.train.cli_types import (
    method_list,
    nonneg_float,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
    schedule_spec,
)
from highwaybp.train.data import CharCorpus, char_corpus
from highwaybp.train.io import (
    atomic_write_json,
    atomic_write_text,
    check_resume_config,
    save_figure,
)
from highwaybp.train.loop import (
    Progress,
    StopGuard,
    TrainLoop,
    echo,
    method_label,
    stopped_message,
)
from highwaybp.train.threads import use_threads

DEFAULT_METHODS = (
    "exact,highway:k=0,highway:k=1,highway:k=3,fixedpoint:k=0,fixedpoint:k=1,fixedpoint:k=3"
)


class CharRNN(nn.Module):
    """Embedding [V, E] -> highwaybp GRU/LSTM (hidden H) -> Linear [H, V]; x [B, T] ids."""

    def __init__(
        self, vocab: int, embed: int, hidden: int, layers: int, cell: str, method: Method
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        cls = GRU if cell == "gru" else LSTM
        self.rnn = cls(
            embed, hidden, num_layers=layers, batch_first=True, method=method, residual=layers > 1
        )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, T, V]."""
        return self.head(self.rnn(self.embed(x))[0])


def _batch(corpus: CharCorpus, split: str, args: Any, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return corpus.batch(split, args.batch, args.seq_len, gen)


def _loss(model: CharRNN, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: CharRNN, batches: list[tuple[Tensor, Tensor]]) -> float:
    model.eval()
    total = sum(float(_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return total


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


class MethodRun:
    """One method's model, optimizer and history, trained through a `TrainLoop` (which
    resumes it from its checkpoint); `run` drives the methods' loops round-robin."""

    def __init__(self, args: Any, name: str, corpus: CharCorpus, valid: list) -> None:
        self.args, self.name, self.valid, self.corpus = args, name, valid, corpus
        # An arm "schedule:<spec>" (from --k-schedule) lets a KController set the method of
        # every step; any other arm is one method.
        schedule = name.removeprefix(SCHEDULE_ARM) if name.startswith(SCHEDULE_ARM) else None
        method = Exact() if schedule is not None else method_from_string(name)
        torch.manual_seed(args.seed)  # same init for every method
        self.model = CharRNN(
            corpus.vocab_size, args.embed, args.hidden, args.layers, args.cell, method
        )
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        # Only a "finish" schedule depends on the run's length; the others may continue
        # into a larger --steps, as the method arms do.
        total = args.steps if schedule is not None and schedule.startswith("finish:") else None
        self.ctl = (None if schedule is None
                    else KController(self.model, schedule, total_steps=total))
        self.history: list[dict] = []
        self.failed = False
        self.running, self.count = 0.0, 0
        self.last_loss: float | None = None
        # No config in the checkpoint: a larger --steps continues a run (see _NOT_CONFIG);
        # the folder's config.json guards the rest.
        self.loop = TrainLoop(
            self._train_step, args.steps, state=self._state, load_state=self._load_state,
            checkpoint_path=Path(args.out) / "checkpoints" / f"{_safe(name)}.pt",
            after_step=self._after_step, name=name, progress=False,
            k_label=lambda: method_label(method if self.ctl is None else self.ctl.method),
            log=lambda msg: echo(f"  {msg}"),
        )  # fmt: skip
        self.loop.resume()
        if self.step == 0 and not self.history:
            self.history.append(
                {
                    "method": name,
                    "step": 0,
                    "train_loss": None,
                    "valid_loss": evaluate(self.model, valid),
                    "train_seconds": 0.0,
                }
            )

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def seconds(self) -> float:
        return self.loop.train_seconds

    @property
    def done(self) -> bool:
        return self.failed or self.step >= self.args.steps

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "history": self.history,
            "seconds": self.seconds,
            "failed": self.failed,
            "running": self.running,  # the train-loss sum since the last evaluation
            "count": self.count,
            "k_controller": None if self.ctl is None else self.ctl.state_dict(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.history, self.failed = state["history"], state.get("failed", False)
        self.loop.train_seconds = state["seconds"]
        self.running, self.count = state.get("running", 0.0), state.get("count", 0)
        if self.ctl is not None:
            self.ctl.load_state_dict(state["k_controller"])

    def _train_step(self, step: int) -> float:
        args = self.args
        batch = _batch(self.corpus, "train", args, seed=args.seed * 1_000_003 + step)
        if self.ctl is not None:  # this step's method (a probe calls the loss itself)
            self.ctl.step(step, loss_fn=lambda: _loss(self.model, batch))
        self.opt.zero_grad(set_to_none=True)
        loss = _loss(self.model, batch)
        loss.backward()
        if args.clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), args.clip)
        self.opt.step()
        return float(loss.detach())

    def _after_step(self, step: int, value: float) -> bool:
        """Metrics after step `step`; True (checkpoint) at an evaluation or a failure."""
        args, done = self.args, step + 1
        if not math.isfinite(value):
            echo(f"  {self.name}: loss is {value} at step {done}; stopping this run")
            self.failed = True
            self.loop.save(done)
            self.loop.end_early()
            return False
        self.running, self.count = self.running + value, self.count + 1
        self.last_loss = value
        if done % args.eval_every != 0 and done != args.steps:
            return False
        self.history.append(
            {
                "method": self.name,
                "step": done,
                "train_loss": self.running / self.count,
                "valid_loss": evaluate(self.model, self.valid),
                "train_seconds": self.seconds,
                **self._k_fields(),
            }
        )
        self.running, self.count = 0.0, 0
        last = self.history[-1]
        k_note = (f", {last['k_method']}, {last['vjp_sweeps']:.0f} VJP sweeps"
                  if self.ctl is not None else "")
        echo(f"  {self.name:16s} step {done:5d} train {last['train_loss']:.4f} valid "
             f"{last['valid_loss']:.4f} ({self.seconds:.1f} s{k_note})")
        return True

    def train_step(self) -> None:
        self.loop.advance()

    def _k_fields(self) -> dict:
        """The schedule's current method and the VJP sweeps spent so far (schedule arms)."""
        if self.ctl is None:
            return {}
        return {"k_method": repr(self.ctl.method), "vjp_sweeps": self.ctl.total_sweeps()}

    def checkpoint(self) -> None:
        self.loop.save(self.step)

    def result(self) -> dict:
        return {
            "method": self.name,
            "history": self.history,
            "steps_done": self.step,
            "train_seconds": self.seconds,
            "final_valid_loss": self.history[-1]["valid_loss"],
        }


def _per_step_ratio(run: dict, exact: dict | None) -> float | None:
    """Training seconds per step of `run` over exact's (None without an exact run)."""
    if not exact or not run["steps_done"] or not exact["steps_done"] or not exact["train_seconds"]:
        return None
    return (run["train_seconds"] / run["steps_done"]) / (
        exact["train_seconds"] / exact["steps_done"]
    )


def write_results(args: Any, runs: list[dict], corpus: CharCorpus) -> None:
    out = Path(args.out)
    rows = ["method,step,train_loss,valid_loss,train_seconds"]
    for run in runs:
        for h in run["history"]:
            tl = "" if h["train_loss"] is None else f"{h['train_loss']:.6f}"
            rows.append(
                f"{run['method']},{h['step']},{tl},{h['valid_loss']:.6f},{h['train_seconds']:.3f}"
            )
    atomic_write_text(out / "charlm.csv", "\n".join(rows) + "\n")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    exact = next((r for r in runs if r["method"] == "exact"), None)
    summary = []
    for r in runs:
        entry = {
            "method": r["method"],
            "final_valid_loss": r["final_valid_loss"],
            "train_seconds": r["train_seconds"],
            "steps": r["steps_done"],
        }
        if exact and r["steps_done"] and exact["steps_done"]:
            entry["seconds_per_step_vs_exact"] = (r["train_seconds"] / r["steps_done"]) / (
                exact["train_seconds"] / exact["steps_done"]
            )
        summary.append(entry)
    atomic_write_json(
        out / "charlm.json",
        {
            "config": config,
            "vocab_size": corpus.vocab_size,
            "train_chars": len(corpus.train),
            "valid_chars": len(corpus.valid),
            "command": "highwaybp " + " ".join(sys.argv[1:]),
            "summary": summary,
            "runs": runs,
        },
    )


def plot(args: Any, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        steps = [h["step"] for h in r["history"]]
        secs = [h["train_seconds"] for h in r["history"]]
        vals = [h["valid_loss"] for h in r["history"]]
        style = "-" if r["method"].startswith(("exact", "highway")) else "--"
        ax1.plot(steps, vals, style, label=r["method"])
        ax2.plot(secs, vals, style, label=r["method"])
    ax1.set_xlabel("training step")
    ax2.set_xlabel("training wall-clock (s, excl. evaluation)")
    for ax in (ax1, ax2):
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(
        f"char-level {args.cell.upper()} LM: hidden {args.hidden}, T={args.seq_len}, "
        f"batch {args.batch}"
    )
    fig.tight_layout()
    save_figure(fig, Path(args.out) / "charlm.png")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "charlm",
        help="char-level GRU/LSTM LM: Exact vs Highway(k) vs FixedPoint(k)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--text", default=None, help="a text file (default: the Python standard library's sources)"
    )
    p.add_argument("--max-chars", type=positive_int, default=2_000_000)
    p.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--embed", type=positive_int, default=64)
    p.add_argument("--layers", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--eval-every", type=positive_int, default=25)
    p.add_argument("--eval-batches", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--clip", type=nonneg_float, default=1.0, help="grad-norm clip (0: off)")
    p.add_argument(
        "--methods",
        type=method_list,
        default=DEFAULT_METHODS,
        help="comma-separated: exact, highway:k=K, fixedpoint:k=K",
    )
    p.add_argument(
        "--k-schedule",
        type=schedule_spec,
        action="append",
        default=[],
        metavar="SPEC",
        help="also train an arm whose method follows this k schedule (repeatable), e.g. "
        "'linear:0,4,300' or 'adaptive:target=0.99,every=50' (see highwaybp.schedules); its "
        "method and VJP sweeps go into the history",
    )
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", type=out_dir, default="results/charlm")
    p.set_defaults(func=run)


# Options that do not change a method's result: the rest must match to resume into --out.
# Each method has its own checkpoint, so a rerun may add or drop methods; and a larger
# --steps continues the runs (the learning rate is constant, so the first steps are the
# same whatever --steps is).
_NOT_CONFIG = ("func", "threads", "methods", "k_schedule", "out", "steps")
SCHEDULE_ARM = "schedule:"


def run(args: argparse.Namespace) -> int:
    names = [*args.methods, *(SCHEDULE_ARM + spec for spec in args.k_schedule)]
    check_resume_config(args.out, {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG})
    use_threads(args.threads, "highwaybp experiment charlm")
    corpus = char_corpus(args.text, args.max_chars)
    valid = [_batch(corpus, "valid", args, seed=10_000 + i) for i in range(args.eval_batches)]
    print(
        f"charlm: {len(corpus.train)} train chars, vocab {corpus.vocab_size}; methods {names}",
        flush=True,
    )
    # Methods take one step each in turn (round-robin): a load change on a shared machine
    # then slows every method alike, so the wall-clock curves stay comparable.
    runs = [MethodRun(args, name, corpus, valid) for name in names]
    # One bar for the round-robin: steps of every method; loss and k of the first method.
    bar = Progress(args.steps * len(runs), sum(min(r.step, args.steps) for r in runs),
                   f"charlm {len(runs)} methods")
    with StopGuard() as guard:
        while not all(r.done for r in runs):
            if guard.should_stop(0):  # between two round-robin rounds
                bar.close()
                for r in runs:
                    r.checkpoint()
                write_results(args, [r.result() for r in runs], corpus)
                step = min(r.step for r in runs if not r.done)
                print(stopped_message(guard, step, args.steps), file=sys.stderr, flush=True)
                return guard.exit_code()
            advanced = 0
            for r in runs:
                if not r.done:
                    r.train_step()
                    advanced += 1
            first = runs[0]
            bar.update(first.last_loss, first.loop.k_label(), steps=advanced)
            if all(r.done or r.step % args.eval_every == 0 for r in runs):
                results = [r.result() for r in runs]
                write_results(args, results, corpus)
    bar.close()
    runs = [r.result() for r in runs]
    write_results(args, runs, corpus)
    plot(args, runs)
    print()
    print(f"{'method':16s} {'final valid':>11} {'train s':>9} {'s/step vs exact':>16}")
    for r in runs:
        rel = "-"
        ratio = _per_step_ratio(r, next((x for x in runs if x["method"] == "exact"), None))
        if ratio is not None:
            rel = f"{ratio:.2f}"
        print(
            f"{r['method']:16s} {r['final_valid_loss']:11.4f} {r['train_seconds']:9.1f} {rel:>16}"
        )
    print(f"\nwrote {Path(args.out) / 'charlm.csv'}, charlm.json, charlm.png")
    return 0
