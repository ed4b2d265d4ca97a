"""`highwaybp experiment recipes`: standard training recipes, as users run them, with exact
backprop, plain Highway(k), Anderson-mixed Highway(k, anderson=m) and the `auto` controller.

The recipes (`highwaybp.train.recipe_tasks`): pytorch/examples' word-level language model
(`wordlm-gru`, `wordlm-lstm`: embedding 200, a 2-layer GRU/LSTM of 200, dropout 0.2, the
hidden state carried across batches, plain SGD at lr 20, gradient-norm clipping 0.25, bptt
35, batch 20; on the shipped text prepared as Wikitext-2 is, or `--text FILE`), a char LM
with Adam (`charlm-gru`), the pixel GRU classifier (`pixel-gru`, digits one pixel per step),
ResNet20 (`resnet20`, digits 16x16) and a char GPT (`chargpt`). Every metric is lower-is-
better (perplexity, loss, error %).

Every arm of a seed starts from the same initialisation and sees the same batches and dropout
masks (the RNG is seeded from (seed, step) before each step); the arms train round-robin,
one step each in turn, so a load change on a shared machine slows them alike. Per arm: the
metric over training, VJP sweeps (training backward + probes, the `KController` unit),
training seconds per step, and time-to-quality (training seconds to reach exact's final
metric of the same seed, or None). Per seed, on the exact arm's model every `--probe-every`
steps: the cosine to exact of plain and mixed Highway(k) gradients for k in `--probe-k`, over
the parameters whose gradient the method changes (read from the autograd graph: the
recurrent / chain parameters and those upstream; a decoder's gradient is exact under every
method), in float64 (Fig. 6 of the paper, plain beside accelerated).

Writes `<out>/<recipe>/recipes.json` (config, command, per seed and arm the history and the
summary, the cosine curves) and `recipes.png` after every evaluation round; resumes from
`<out>/<recipe>/checkpoints/`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from highwaybp.control import KController
from highwaybp.core.fidelity import changed_parameters, compare_gradients, use_method
from highwaybp.core.methods import Exact, Highway, method_from_string
from highwaybp.core.replay import buffers_restored
from highwaybp.models.rnn.engine import SPLITS
from highwaybp.schedules import schedule_from_string
from highwaybp.train.cli_types import (
    nonneg_float,
    nonneg_int,
    nonneg_int_list,
    out_dir,
    positive_float,
    positive_int,
)
from highwaybp.train.io import atomic_write_json, check_resume_config, save_figure
from highwaybp.train.loop import StopGuard, TrainLoop, echo, stopped_message
from highwaybp.train.recipe_tasks import (
    GRU_RECIPES,
    RECIPES,
    TOKENIZERS,
    WORD_RECIPES,
    Recipe,
    detach,
    make_recipe,
)
from highwaybp.train.threads import use_threads

DEFAULT_ARMS = ("exact;highway:k=1;highway:k=2;highway:k=3;highway:k=5;"
                "highway:k=2,anderson=5;highway:k=3,anderson=5;highway:k=5,anderson=5;auto")
AUTO = "auto"
# pytorch/examples' word_language_model defaults (the other recipes have their own)
WORD_DEFAULTS = {"lr": 20.0, "clip": 0.25, "batch": 20}


# ---------------------------------------------------------------------------- one arm
def _is_auto(arm: str) -> bool:
    return arm == AUTO or arm.startswith(AUTO + ":")


def arm_controller(model: nn.Module, arm: str) -> KController:
    """Every arm runs under a KController (the one owner of the sweep count): `auto` is
    the recommended controller (`auto:<options>` with options, e.g. `auto:break_even=5`, the
    break-even k a GPU user passes), any other arm a constant method."""
    if _is_auto(arm):
        return KController(model, arm)
    return KController(model, "constant:" + method_from_string(arm).to_string())


class Arm:
    """One arm (a method, or `auto`) of one seed: model, optimizer, carried state, history;
    trained through a `TrainLoop` that checkpoints and resumes it."""

    def __init__(self, args: Any, seed: int, name: str, recipe: Recipe, root: Path) -> None:
        self.args, self.seed, self.name, self.recipe = args, seed, name, recipe
        torch.manual_seed(seed)  # the same initialisation for every arm of a seed
        self.model = recipe.make_model()
        self.opt = recipe.make_optimizer(self.model)
        self.ctl = arm_controller(self.model, name)
        self.carry = recipe.init_carry()
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

    def _train_step(self, step: int) -> float:
        batch = self.recipe.batch(step)
        if self.recipe.new_epoch(step):
            self.carry = self.recipe.init_carry()
        carry = detach(self.carry)
        self.ctl.step(step, loss_fn=lambda: self.recipe.loss(self.model, batch, carry)[0])
        # Dropout masks are a function of (seed, step): every arm of a seed draws the same
        # ones, whatever the other arms (round-robin) or the probes drew before.
        torch.manual_seed(self.seed * 1_000_003 + step)
        self.opt.zero_grad(set_to_none=True)
        loss, self.carry = self.recipe.loss(self.model, batch, carry)
        loss.backward()
        if self.recipe.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip)
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
        echo(f"  seed {self.seed} {self.name:24s} step {done:5d} {self.recipe.metric} "
             f"{last['metric']:9.3f}  sweeps {last['vjp_sweeps']:7.0f}  "
             f"({last['train_seconds']:.0f} s) {last['method']}")
        return True

    def _evaluate(self, step: int) -> None:
        self.history.append({
            "step": step,
            "metric": self.recipe.evaluate(self.model),
            "train_seconds": self.loop.train_seconds,
            "vjp_sweeps": self.ctl.total_sweeps(),
            "method": "" if self.ctl.method is None else repr(self.ctl.method),
        })

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "carry": self.carry, "history": self.history, "failed": self.failed,
                "ctl": self.ctl.state_dict(), "seconds": self.loop.train_seconds}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.carry, self.history = state["carry"], state["history"]
        self.failed = state["failed"]
        self.ctl.load_state_dict(state["ctl"])
        self.loop.train_seconds = state["seconds"]

    def result(self) -> dict[str, Any]:
        return {"arm": self.name, "seed": self.seed, "steps_done": self.step,
                "failed": self.failed, "train_seconds": self.loop.train_seconds,
                "history": self.history, "controller": self.ctl.summary()}


# ---------------------------------------------------------------------------- fidelity
def _double(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_double(v) for v in value)
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.double()
    return value


def cosine_curve(recipe: Recipe, model: nn.Module, batch: tuple[Tensor, Tensor], carry: Any,
                 ks: list[int], windows: list[int]) -> dict[str, dict[int, float]]:
    """{"plain" / "anderson=m": {k: cosine to exact}} of the gradient of the parameters the
    methods change (read from the autograd graph of a Highway(k=1) backward), on a float64
    copy of `model` in eval mode (no dropout; batch norm's running statistics), for `batch`
    and the carried state `carry`."""
    probe = copy.deepcopy(model).double().eval()
    batch, carry = _double(batch), _double(carry)

    def loss_of(method: Any) -> Tensor:
        with use_method(probe, method):
            return recipe.loss(probe, batch, carry)[0]

    every = [p for p in probe.parameters() if p.requires_grad]
    flags = changed_parameters(loss_of(Highway(k=1)), every)
    params = [p for p, changed in zip(every, flags) if changed]

    def grad(method: Any) -> list[Tensor]:
        with buffers_restored(probe):
            return list(torch.autograd.grad(loss_of(method), params))

    exact = grad(Exact())
    curves: dict[str, dict[int, float]] = {}
    for m in [0, *windows]:
        label = "plain" if m == 0 else f"anderson={m}"
        curves[label] = {k: compare_gradients(grad(Highway(k=k, anderson=m)), exact)["cosine"]
                         for k in ks}
    return curves


# ---------------------------------------------------------------------------- summary
def _metric(entry: dict[str, Any]) -> float:
    # (runs written before the recipes were generalised named the metric "valid_ppl")
    return entry["metric"] if "metric" in entry else entry["valid_ppl"]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm over seeds: the final metric (mean, std, ratio to exact's mean, and whether
    it is within seed noise of exact's), VJP sweeps per step (training + probes), the
    probes' share of the training sweeps, the median seconds per step and its ratio to
    exact's, and time-to-quality per seed.

    Within seed noise: |mean - exact's mean| <= 2 s_exact sqrt(1/n + 1/n_exact), s_exact
    the std of exact's final metric over its seeds: two standard errors of the difference
    of two means of runs that vary as exact's do. The arm's own spread is left out on
    purpose: an arm that diverges on some seeds must not pass by its own variance."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    exact_by_seed = {r["seed"]: r for r in runs if r["arm"] == "exact"}
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm and r["steps_done"]]
        if not mine:
            continue
        finals = [_metric(r["history"][-1]) for r in mine]
        per_step = [r["train_seconds"] / r["steps_done"] for r in mine]
        sweeps = [(r["controller"]["train_sweeps"] + r["controller"]["probe_sweeps"])
                  / r["steps_done"] for r in mine]
        ttq = []
        for r in mine:
            ex = exact_by_seed.get(r["seed"])
            goal = _metric(ex["history"][-1]) if ex else None
            hit = None if goal is None else next(
                (h["train_seconds"] for h in r["history"] if _metric(h) <= goal), None)
            ttq.append(hit)
        row = {"arm": arm, "seeds": [r["seed"] for r in mine], "final": finals,
               "final_mean": statistics.fmean(finals),
               "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
               "sweeps_per_step": statistics.fmean(sweeps),
               "probe_share": statistics.fmean(
                   r["controller"]["probe_sweeps"] / max(r["controller"]["train_sweeps"], 1)
                   for r in mine),
               "seconds_per_step": statistics.median(per_step),
               "time_to_exact_final": ttq,
               "controller": [r["controller"] for r in mine]}
        rows.append(row)
    exact = next((r for r in rows if r["arm"] == "exact"), None)
    for row in rows:
        if exact:
            # (an exact arm at 0, e.g. no test error: the ratio is undefined)
            row["vs_exact"] = (row["final_mean"] / exact["final_mean"]
                               if exact["final_mean"] else None)
            noise = 2.0 * exact["final_std"] * math.sqrt(1 / len(row["final"])
                                                         + 1 / len(exact["final"]))
            row["within_noise"] = (len(row["final"]) > 1 and len(exact["final"]) > 1
                                   and abs(row["final_mean"] - exact["final_mean"]) <= noise)
            row["seconds_per_step_vs_exact"] = row["seconds_per_step"] / exact["seconds_per_step"]
            row["sweeps_vs_exact"] = (row["sweeps_per_step"] / exact["sweeps_per_step"]
                                      if exact["sweeps_per_step"] else None)
    return rows


def write(root: Path, args: Any, arms: list[Arm], curves: dict) -> dict[str, Any]:
    runs = [a.result() for a in arms]
    doc = {"recipe": args.recipe, "command": "highwaybp " + " ".join(sys.argv[1:]),
           "metric": arms[0].recipe.metric if arms else "",
           "recipe_config": arms[0].recipe.config if arms else {},
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
        ax1.plot([h["step"] for h in hist], [_metric(h) for h in hist],
                 "-" if "anderson" in r["arm"] or r["arm"] == "exact" or _is_auto(r["arm"])
                 else "--",
                 label=f"{r['arm']} (seed {r['seed']})")
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel(doc.get("metric", "validation perplexity"))
    ax1.legend(fontsize=6)
    seed0 = next(iter(doc["cosine_curves"].values()), {})
    for step, curves in seed0.items():
        for label, curve in curves.items():
            ax2.plot([int(k) for k in curve], list(curve.values()),
                     "-o" if label != "plain" else "--x", label=f"step {step} {label}",
                     markersize=3)
    ax2.set_xlabel("k")
    ax2.set_ylabel("cosine to exact (the parameters the method changes)")
    if seed0:  # (no curves: --probe-every 0)
        ax2.legend(fontsize=6)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{doc['recipe']}")
    fig.tight_layout()
    save_figure(fig, root / "recipes.png")


def arm_list(text: str) -> list[str]:
    """'exact;highway:k=3,anderson=5;auto' -> arm names (';' separates: methods hold ',')."""
    names = [t.strip() for t in text.split(";") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one arm")
    for n in names:
        try:
            schedule_from_string(n) if _is_auto(n) else method_from_string(n)
        except (ValueError, TypeError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an arm is listed twice in {text!r}")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "recipes", help="standard recipes: exact vs plain vs Anderson-mixed Highway vs auto",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=RECIPES, default="wordlm-gru")
    p.add_argument("--text", default=None, help="a text file (default: the shipped corpus)")
    p.add_argument("--tokenize", choices=TOKENIZERS, default="wikitext",
                   help="raw: pytorch/examples' whitespace words; wikitext: punctuation "
                        "split off and words seen < 3 times -> <unk>, as Wikitext-2 is "
                        "prepared (default wikitext)")
    p.add_argument("--arms", type=arm_list, default=arm_list(DEFAULT_ARMS),
                   help="';'-separated methods and/or 'auto' ('auto:<options>', e.g. "
                        f"'auto:break_even=5') (default {DEFAULT_ARMS!r})")
    p.add_argument("--seeds", type=nonneg_int_list, default=[0, 1, 2])
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--eval-every", type=positive_int, default=100)
    p.add_argument("--probe-every", type=nonneg_int, default=100,
                   help="cosine curves on the exact arm every N steps (0: off)")
    p.add_argument("--probe-k", type=nonneg_int_list, default=[1, 2, 3, 5, 8])
    p.add_argument("--probe-anderson", type=nonneg_int_list, default=[5])
    p.add_argument("--split", choices=tuple(SPLITS), default="gate",
                   help="the GRU recipes' highwaybp.GRU(split=...): gate (K_t = diag(z_t), "
                        "the paper's) or diagonal (K_t = diag(J_t)); default gate")
    g = p.add_argument_group("word LMs (the other recipes: see highwaybp.train.recipe_tasks)")
    g.add_argument("--layers", type=positive_int, default=2)
    g.add_argument("--embed", type=positive_int, default=200)
    g.add_argument("--hidden", type=positive_int, default=200)
    g.add_argument("--bptt", type=positive_int, default=35)
    g.add_argument("--eval-batch", type=positive_int, default=10)
    g.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size (default: the recipe's; word LMs 20)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: the recipe's; word LMs 20)")
    p.add_argument("--clip", type=nonneg_float, default=None,
                   help="gradient-norm clip, 0 off (default: the recipe's; word LMs 0.25)")
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
    first = run_config(docs[0]["config"])
    for path, d in zip(paths[1:], docs[1:]):
        other = run_config(d["config"])
        diff = {k: (first.get(k), other.get(k)) for k in {*first, *other}
                if first.get(k) != other.get(k)}
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
           "combined_from": [d["command"] for d in docs],
           "metric": docs[0].get("metric", "valid perplexity"),
           "recipe_config": docs[0].get("recipe_config", {}), "config": docs[0]["config"],
           "torch_threads": docs[0]["torch_threads"], "summary": summarize(runs),
           "cosine_curves": curves, "runs": runs}
    atomic_write_json(root / "recipes.json", doc)
    plot(root, doc)
    return doc


def _probe(args: Any, exact: Arm | None, seed_curves: dict) -> None:
    """Cosine curves on the exact arm's model at its current step, every --probe-every
    steps (on the batch of that step, with the state it carries)."""
    if exact is None or not args.probe_every or exact.failed:
        return
    step = exact.step
    if step % args.probe_every or str(step) in seed_curves:
        return
    carry = exact.recipe.init_carry() if exact.recipe.new_epoch(step) else exact.carry
    seed_curves[str(step)] = cosine_curve(exact.recipe, exact.model, exact.recipe.batch(step),
                                          detach(carry), args.probe_k, args.probe_anderson)


_NOT_CONFIG = ("func", "threads", "arms", "seeds", "out", "probe_every", "probe_k",
               "probe_anderson", "eval_every", "combine")
# Options added after runs were written, with the value every earlier run had: a file or
# folder without the key ran with it (so old runs resume and combine with new ones at that
# value, and never with another).
ADDED_OPTIONS = {"split": "gate", "tokenize": "raw"}


def run_config(config: dict[str, Any]) -> dict[str, Any]:
    """The options that make two runs comparable (what resume and --combine compare), an
    added option at its earlier value left out as the runs before it had it."""
    return {k: v for k, v in config.items() if k not in _NOT_CONFIG
            and not (k in ADDED_OPTIONS and v == ADDED_OPTIONS[k])}


def run(args: argparse.Namespace) -> int:
    if args.combine:
        doc = combine(args.combine, args.out)
        print(f"combined {len(args.combine)} files: {len(doc['runs'])} runs into "
              f"{Path(args.out) / doc['recipe'] / 'recipes.json'}")
        return 0
    if args.recipe in WORD_RECIPES:
        for key, value in WORD_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    elif args.text is not None:
        raise SystemExit(f"recipes: --text is for the word LMs, not {args.recipe}")
    if args.split != "gate" and args.recipe not in GRU_RECIPES:
        raise SystemExit(f"recipes: --split {args.split} is for the GRU recipes "
                         f"({', '.join(GRU_RECIPES)}), not {args.recipe}")
    root = Path(args.out) / args.recipe
    check_resume_config(root, run_config(vars(args)))
    use_threads(args.threads, "highwaybp experiment recipes")
    arms: list[Arm] = []
    curves: dict[str, dict[int, Any]] = {}
    with StopGuard() as guard:
        for seed in args.seeds:
            recipe = make_recipe(args, seed)
            print(f"  {recipe.name} seed {seed}: {recipe.config}; arms {args.arms}",
                  flush=True)
            group = [Arm(args, seed, name, recipe, root) for name in args.arms]
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
    print(f"\n{'arm':26s} {'final':>10} {'vs exact':>9} {'sweeps/step':>12} "
          f"{'s/step vs exact':>16}   ({doc['metric']})")
    for row in doc["summary"]:
        ratio = row.get("vs_exact")
        print(f"{row['arm']:26s} {row['final_mean']:10.3f} "
              f"{float('nan') if ratio is None else ratio:9.3f} {row['sweeps_per_step']:12.2f} "
              f"{row.get('seconds_per_step_vs_exact', float('nan')):16.2f}")
    print(f"\nwrote {root / 'recipes.json'}, recipes.png")
    return 0


def render(path: Path, d: dict[str, Any]) -> list[str]:
    """docs/benchmarks.md's section of a recipes.json (`highwaybp report`)."""
    metric = d.get("metric", "valid perplexity")
    lines = [f"### {d['recipe']}: `{path.as_posix()}`", "", "```", d["command"], "```", ""]
    if d.get("combined_from"):
        lines += ["Combined from:", "", "```", *d["combined_from"], "```", ""]
    if d.get("recipe_config"):
        lines += ["; ".join(f"{k}: {v}" for k, v in d["recipe_config"].items()), ""]
    # summarised from the runs, so files written before the summary's keys were renamed
    # render alike
    rows = summarize(d["runs"])
    if rows:
        lines += [f"| arm | seeds | final {metric} (mean +- std) | vs exact | within seed "
                  "noise | VJP sweeps / step | vs exact | probes / training sweeps | s / step "
                  "vs exact | reached exact's final (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ttq = ", ".join("not reached" if t is None else f"{t:.0f}"
                            for t in r["time_to_exact_final"])
            noise = {True: "yes", False: "no", None: "-"}[r.get("within_noise")]
            lines.append(
                f"| {r['arm']} | {len(r['seeds'])} | {r['final_mean']:.4g} +- "
                f"{r['final_std']:.2g} | {_ratio(r.get('vs_exact'))} | {noise} | "
                f"{r['sweeps_per_step']:.2f} | {_ratio(r.get('sweeps_vs_exact'))} | "
                f"{100 * r.get('probe_share', 0.0):.1f}% | "
                f"{_ratio(r.get('seconds_per_step_vs_exact'))} | {ttq} |")
        lines.append("")
    lines += _render_curves(d.get("cosine_curves", {}))
    return lines


def _render_curves(by_seed: dict[str, dict[str, Any]]) -> list[str]:
    """The cosine curves, per probed step the mean over the seeds that probed it."""
    steps = sorted({int(s) for curves in by_seed.values() for s in curves})
    lines = []
    for step in steps:
        probes = [c[str(step)] for c in by_seed.values() if str(step) in c]
        labels = list(dict.fromkeys(lab for p in probes for lab in p))
        ks = sorted({int(k) for p in probes for c in p.values() for k in c})
        lines += [f"Cosine to exact of the gradient of the parameters the method changes, "
                  f"step {step}, mean over {len(probes)} seed(s) (float64, eval mode):", "",
                  "| | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for label in labels:
            cells = []
            for k in ks:
                vals = [p[label][str(k)] for p in probes if str(k) in p.get(label, {})]
                cells.append(f"{statistics.fmean(vals):.3f}" if vals else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
