"""Stopping a resumable training loop cleanly: on `--stop-after` and on SIGINT/SIGTERM.

Every resumable loop (train, experiment charlm, experiment deep) asks `StopGuard` at each
step boundary whether to stop; when it says so, the loop saves its checkpoint *at that
step* and returns `StopGuard.exit_code()` after printing `stopped_message(...)`, so a rerun
of the same command continues exactly where this one stopped (nothing since the last
evaluation is lost).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

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
