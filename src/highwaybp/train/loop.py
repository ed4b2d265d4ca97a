"""The harness's one resumable training loop (`TrainLoop`), its progress bar and stop rule.

`highwaybp train`, `demo` and every `experiment` train through `TrainLoop`: each keeps only
its model, data and step (a function of the step number) and its metrics hooks; the loop
owns resuming from a checkpoint (refusing one of another configuration), saving one,
stopping cleanly, the timers and the progress bar.

Stopping: the loop asks `StopGuard` at each step boundary whether to stop (on `--stop-after`
and on SIGINT/SIGTERM); when it says so, the loop saves its checkpoint *at that step* and
returns `StopGuard.exit_code()` after printing `stopped_message(...)`, so a rerun of the same
command continues exactly where this one stopped (nothing since the last evaluation is lost).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from highwaybp.train.io import ConfigMismatchError, config_diff, load_checkpoint, save_checkpoint

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopGuard:
    """Context manager: turns SIGINT/SIGTERM into a stop request checked between steps.

    `stop_at`: stop once this step is reached (`--stop-after N` from the resumed step), or
    None. A second signal while a stop is pending runs the previous handler (Ctrl-C twice
    interrupts at once). The previous handlers are restored on exit. Outside the main thread
    (where Python cannot install handlers) only `stop_at` applies.
    """

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # a second signal: do what would have happened anyway
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.__exit__()
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                raise SystemExit(128 + signum)
            return
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: stopping at the next step boundary "
              "and saving a checkpoint (send it again to stop at once, losing unsaved steps)",
              file=sys.stderr, flush=True)

    def should_stop(self, step: int) -> bool:
        """True when the loop, about to run step `step` (0-based; `step` steps done), must
        checkpoint and return."""
        return self.signal is not None or (self.stop_at is not None and step >= self.stop_at)

    def exit_code(self) -> int:
        """0 after `--stop-after`, 128 + signal number after a signal (shell convention)."""
        return 0 if self.signal is None else 128 + self.signal

    def reason(self) -> str:
        return "--stop-after" if self.signal is None else signal.Signals(self.signal).name


def stopped_message(guard: StopGuard, step: int, total: int, what: str = "") -> str:
    """The one message a stopped loop prints."""
    prefix = f"{what}: " if what else ""
    return (f"{prefix}stopped at step {step}/{total} ({guard.reason()}); checkpoint saved; "
            "rerun the same command to continue")


# ----------------------------------------------------------------------------- progress


class Progress:
    """The one progress bar of the harness (tqdm): steps done, steps/s, loss and k.

    Off when `enabled` is False, when tqdm is not installed, and when stderr is not a
    terminal (tqdm's `disable=None`), so logs and captured test output get no bar lines;
    `mininterval` bounds how often a terminal bar is redrawn.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "",
                 enabled: bool = True, mininterval: float = 1.0) -> None:
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # an optional dependency (the `experiments` extra)
            return
        self._bar = tqdm(total=total, initial=initial, desc=desc or None, unit="step",
                         disable=None, mininterval=mininterval, leave=False, file=sys.stderr,
                         dynamic_ncols=True)

    @property
    def active(self) -> bool:
        return self._bar is not None and not self._bar.disable

    def update(self, loss: float | None = None, k: str | None = None, steps: int = 1) -> None:
        if self._bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if k is not None:
            postfix["k"] = k
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def method_label(method: Any) -> str:
    """What the bar shows as k: "highway:3" for Highway(k=3), "highway:adaptive" for a
    tolerance-driven one, "exact" for backprop."""
    if method is None:
        return ""
    if getattr(method, "exact", False):
        return "exact"
    k = getattr(method, "k", None)
    name = getattr(method, "name", None) or type(method).__name__.lower()
    return f"{name}:{'adaptive' if k is None else k}"


def warmup_cosine_lr(base: float, step: int, steps: int) -> float:
    """Learning rate of step `step` of `steps`: linear warm-up over the first 5% of the
    steps, then cosine decay to 0 (experiment deep, vision and kschedule)."""
    warm = max(1, steps // 20)
    if step < warm:
        return base * (step + 1) / warm
    return 0.5 * base * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


# ----------------------------------------------------------------------------- the loop


class TrainLoop:
    """The harness's one resumable training loop.

    Runs `step_fn(t)` for t = start .. total_steps - 1 (it trains step t and returns its
    training loss). Around it:

    - resume: `resume()` reads `checkpoint_path` (if it exists), refuses a checkpoint of
      another `config` (the checkpoint stores it), hands the saved state to `load_state`
      and returns the step to start from;
    - `at_boundary(t)`, for t = start .. total_steps (the last one after the last step):
      what happens before step t (evaluations at chosen steps);
    - `after_step(t, loss)`: metrics; returning True asks for a checkpoint now (after step
      t, so at step t + 1); `checkpoint_every` asks for one every N steps as well;
    - `guard` (a `StopGuard`): checked before each step; on a stop the loop saves a
      checkpoint at that step, prints `stopped_message` and `run()` returns the guard's
      exit code (0 after --stop-after, 128 + signal after SIGINT/SIGTERM);
    - `end_early()` (from a hook): the run ends after the current step (a diverged loss);
    - a `Progress` bar (loss, `k_label()`, steps/s), off unless stderr is a terminal;
    - `train_seconds` (time inside `step_fn`) and `wall_seconds` (everything, evaluations
      included), both carried across resumes in the checkpoint.

    A checkpoint is `state()` plus the keys "step", "config" and "loop" (the timers);
    `save(step)` writes it atomically. A loop without `checkpoint_path` saves nothing.
    Round-robin drivers (several loops trained one step each in turn) call `advance()` and
    check their own guard between rounds.
    """

    def __init__(
        self,
        step_fn: Callable[[int], float],
        total_steps: int,
        *,
        state: Callable[[], dict[str, Any]] | None = None,
        load_state: Callable[[dict[str, Any]], None] | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        config: dict[str, Any] | None = None,
        at_boundary: Callable[[int], None] | None = None,
        after_step: Callable[[int, float], bool | None] | None = None,
        guard: StopGuard | None = None,
        name: str = "",
        k_label: Callable[[], str] | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.step_fn = step_fn
        self.total_steps = total_steps
        self.state = state or dict
        self.load_state = load_state
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.checkpoint_every = checkpoint_every
        self.config = None if config is None else json.loads(json.dumps(config))
        self.at_boundary = at_boundary
        self.after_step = after_step
        self.guard = guard
        self.name = name
        self.k_label = k_label
        self.progress = progress
        self.log = log if log is not None else _print_stderr
        self.step = 0
        self.train_seconds = 0.0
        self._wall_before = 0.0  # wall seconds of earlier invocations
        self._tic = time.perf_counter()
        self._ended = False
        self._bar: Progress | None = None

    # -- state
    @property
    def wall_seconds(self) -> float:
        return self._wall_before + time.perf_counter() - self._tic

    @property
    def done(self) -> bool:
        return self._ended or self.step > self.total_steps

    def resume(self) -> int:
        """Load the checkpoint if there is one; the step to start from (0 without one)."""
        self._tic = time.perf_counter()
        saved = None if self.checkpoint_path is None else load_checkpoint(self.checkpoint_path)
        if saved is None:
            return self.step
        if self.config is not None and saved.get("config") is not None:
            diff = config_diff(saved["config"], self.config)
            if diff:
                raise ConfigMismatchError(
                    f"{self.checkpoint_path} was saved by a run with another configuration "
                    f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                    "rerun with the same options or delete the checkpoint to start afresh")
        if self.load_state is not None:
            self.load_state(saved)
        timers = saved.get("loop") or {}  # (load_state may have set them from older keys)
        self.train_seconds = timers.get("train_seconds", self.train_seconds)
        self._wall_before = timers.get("wall_seconds", self._wall_before)
        self.step = saved["step"]
        prefix = f"{self.name}: " if self.name else ""
        self.log(f"{prefix}resumed from {self.checkpoint_path} at step "
                 f"{self.step}/{self.total_steps}")
        return self.step

    def save(self, step: int) -> None:
        """Checkpoint the run as it is after `step` steps (nothing without a path)."""
        if self.checkpoint_path is None:
            return
        saved = dict(self.state())
        saved.update(step=step, config=self.config,
                     loop={"train_seconds": self.train_seconds,
                           "wall_seconds": self.wall_seconds})
        save_checkpoint(self.checkpoint_path, saved)

    def end_early(self) -> None:
        """End the run after the current step (called from a hook: a diverged loss)."""
        self._ended = True

    # -- running
    def advance(self) -> bool:
        """The boundary hook before step `self.step`, then that step and its metrics.

        False (and nothing done) once the run is over."""
        if self.done:
            return False
        t = self.step
        if self.at_boundary is not None:
            self.at_boundary(t)
        if t == self.total_steps:
            self.step = t + 1  # past the end: the final boundary has run
            self._close_bar()
            return False
        if self._bar is None:
            self._bar = Progress(self.total_steps, t, self.name, enabled=self.progress)
        tic = time.perf_counter()
        loss = self.step_fn(t)
        self.train_seconds += time.perf_counter() - tic
        self.step = t + 1
        wants_checkpoint = self.after_step(t, loss) if self.after_step is not None else False
        self._bar.update(loss, None if self.k_label is None else self.k_label())
        every = self.checkpoint_every
        if not self._ended and (wants_checkpoint or (every and self.step % every == 0)):
            self.save(self.step)
        if self._ended:
            self._close_bar()
        return not self._ended

    def run(self) -> int | None:
        """Train to the end: None when done, the guard's exit code when stopped (after
        saving a checkpoint at the current step)."""
        try:
            while not self.done:
                t = self.step
                if self.guard is not None and t < self.total_steps and self.guard.should_stop(t):
                    self.save(t)
                    self._close_bar()
                    self.log(self.stopped_message(t))
                    return self.guard.exit_code()
                self.advance()
        finally:
            self._close_bar()
        return None

    def stopped_message(self, step: int) -> str:
        assert self.guard is not None
        if self.checkpoint_path is not None:
            return stopped_message(self.guard, step, self.total_steps, self.name)
        prefix = f"{self.name}: " if self.name else ""
        return (f"{prefix}stopped at step {step}/{self.total_steps} ({self.guard.reason()}); "
                "nothing was saved (no checkpoint for this run)")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _print_stderr(message: str) -> None:
    echo(message, sys.stderr)


def echo(message: str, file: TextIO | None = None) -> None:
    """Print a log line (to stdout by default) without breaking a progress bar drawn on the
    terminal: through `tqdm.write`, which clears the bar, prints and redraws it."""
    file = sys.stdout if file is None else file
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=file, flush=True)
        return
    tqdm.write(message, file=file)
    file.flush()
