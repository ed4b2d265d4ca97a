"""Reading the resident set (Linux /proc), for the benches' memory probes.

Each probe runs in a fresh process: `step_peak_growth_bytes` resets the kernel's
high-water mark (VmHWM) and reads it after the step; `sampled_peak_growth_bytes` samples the
resident set from a thread during the step (for runs whose allocator must also be told to
return freed memory: start the process with MALLOC_MMAP_THRESHOLD_=65536). Both report the
peak minus the resident size just before the step.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable


def rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_peak_growth_bytes(step: Callable[[], object]) -> int:
    """Peak resident set during `step()` above the one before it, from the kernel's
    high-water mark (reset to the current RSS first)."""
    before = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # resets VmHWM to the current RSS
        handle.write("5")
    step()
    return (status_kb("VmHWM") - before) * 1024


def sampled_peak_growth_bytes(step: Callable[[], object], every_s: float = 0.0002) -> int:
    """Peak resident set during `step()` above the one before it, sampled every `every_s`."""
    before = rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
        peak[0] = max(peak[0], rss_bytes())
    finally:
        done.set()
        sampler.join()
    return peak[0] - before
