"""LocalProcesses (the launcher of the layer-parallel runtime and DDG) gets every rank's
report even when one rank can never write again.

A multiprocessing queue's writers share one lock. A rank stopped (SIGSTOP, a debugger) while
its queue feeder thread held that lock blocked the other ranks' reports: their error messages
never arrived and their `join_thread` hung until their watchdog killed them (exit code 3), as
a CI run of test_ddg_dist's stopped-rank test showed. Rank 1 here holds its queue's write
lock for good, as if stopped at that moment; with one queue shared by all ranks (before this
fix) ranks 0 and 2 could not report, and this test fails.
"""

from __future__ import annotations

import os
import time

from highwaybp.distributed.launch import LocalProcesses


def _rank(rank: int, init: str, events, result_dir: str) -> None:
    if rank == 1:
        events._wlock.acquire()  # as if stopped while its feeder thread wrote
        time.sleep(120)
        os._exit(0)
    events.put(("error", rank, f"rank {rank} lost its peer"))
    events.close()
    events.join_thread()  # hangs while another process holds a shared write lock
    os._exit(1)


def test_every_rank_reports_although_one_holds_its_queue_lock():
    procs = LocalProcesses(_rank, 3, timeout=5.0, args_of=lambda r, init, q, d: (r, init, q, d))
    try:
        codes = procs.join(deadline=90.0, grace=5.0)
        assert codes[0] == 1 and codes[2] == 1, codes  # both reported and left
        assert procs.errors() == {0: "rank 0 lost its peer", 2: "rank 2 lost its peer"}
        assert procs.stuck == [1]  # the silent rank is named (and killed by close)
    finally:
        for p in procs.procs:
            if p.is_alive():
                p.kill()
