"""HighwayPipeline on 2, 3 and 4 gloo processes equals the single-process chain.

Each spawned job runs many configurations in one process group (a spawn costs seconds on a
loaded machine): K identity / scaled / diagonal (ReLU, gated) / a shape-changing
LinearShortcut and a ModuleShortcut (projection + ReLU), every scan strategy, per-layer
losses, 1 and 3 micro-batches, Highway(k), Highway(L) (= autograd), adaptive Highway with
each fallback, FixedPoint(k), Anderson-mixed Highway and FixedPoint (fixed and adaptive: the
inner products all-reduced) and Exact(), recompute False and True; the test process
computes the single-process references (float64, 1e-10).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.distributed import (
    HighwayPipeline,
    Tracer,
    TransportError,
    critical_path,
    merge_traces,
    phase_breakdown,
    spawn,
)

WIDTH, BATCH, LAYERS = 6, 6, 6


class Gate(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        return torch.sigmoid(self.a(x)), torch.tanh(self.b(x))


def _pad(x):  # P: width -> width + 2 (zero padding), adjoint: the slice
    return torch.nn.functional.pad(x, (0, 2))


def _unpad(v):
    return v[..., :-2]


def build_chain(kind: str, seed: int = 0) -> hbp.ResidualChain:
    torch.manual_seed(seed)
    layers = []
    width = WIDTH
    for i in range(LAYERS):
        if kind in ("linear", "module") and i == 2:  # one shape-changing layer
            block = nn.Sequential(nn.Linear(width, width + 2), nn.Tanh())
            shortcut = (hbp.LinearShortcut(_pad, _unpad) if kind == "linear" else
                        hbp.ModuleShortcut(nn.Linear(width, width + 2), relu=True))
            layers.append(hbp.ResidualLayer(block, shortcut))
            width += 2
            continue
        if kind == "gated":
            layers.append(hbp.ResidualLayer(Gate(width), hbp.Gated()))
            continue
        block = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        residual = {"identity": hbp.Identity(), "scaled": hbp.Scaled(0.7),
                    "relu": hbp.ReLUResidual(), "linear": hbp.Identity(),
                    "module": hbp.Scaled(0.9)}[kind]
        layers.append(hbp.ResidualLayer(block, residual))
    return hbp.ResidualChain(layers).double()


def final_loss(h, target):
    return ((h - target) ** 2).sum()


def state_loss(h, target):  # a per-layer loss that ignores the target
    return 0.3 * torch.sin(h).sum()


STATE_LOSS_AT = (2, 3, 5)  # h_2, h_3, h_5: owned by different ranks for P = 2, 3, 4


def data(kind: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out_width = WIDTH + (2 if kind in ("linear", "module") else 0)
    x = torch.randn(BATCH, WIDTH, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, out_width, generator=g, dtype=torch.float64)
    return x, y


TRACED = ("relu", "centralized", 3)  # with highway:k=1: the traced configuration


def configs():
    out = []
    for kind in ("identity", "scaled", "relu", "gated", "linear", "module"):
        scans = (("sequential",) if kind in ("linear", "module")
                 else ("distributed", "centralized"))
        for scan in scans:
            for m in (1, 3):
                out.append((kind, scan, m, "highway:k=2"))
    out += [("identity", "distributed", 1, f"highway:k={LAYERS}"),
            ("relu", "centralized", 3, "highway:k=1"),
            ("gated", "distributed", 1, f"highway:k={LAYERS}"),
            ("relu", "distributed", 3, "fixedpoint:k=2"),
            ("linear", "sequential", 1, "fixedpoint:k=3"),
            ("relu", "distributed", 3, "highway:k=2+recompute"),
            ("linear", "sequential", 1, "fixedpoint:k=2+recompute"),
            ("gated", "distributed", 1, "highway:tol=0.1,max_k=6"),
            ("relu", "centralized", 1, "highway:tol=1e-30,max_k=2,fallback=exact"),
            ("scaled", "distributed", 1, "highway:tol=1e-30,max_k=3,fallback=best"),
            ("linear", "sequential", 1, "highway:tol=1e-30,max_k=2,fallback=last"),
            ("relu", "distributed", 3, "highway:k=3,anderson=3"),
            ("gated", "centralized", 1, "highway:k=4,anderson=2"),
            ("linear", "sequential", 1, "highway:k=3,anderson=3"),
            ("relu", "distributed", 1, "fixedpoint:k=3,anderson=3"),
            ("scaled", "distributed", 1, "highway:tol=1e-30,max_k=4,anderson=3,fallback=last"),
            ("relu", "centralized", 1, "highway:tol=1e-30,max_k=6,anderson=3"),
            ("gated", "distributed", 3, "exact"),
            ("linear", "sequential", 1, "exact")]
    return out


def run_configs(ctx):
    """Spawned job: every configuration, two steps each (the second checks that gradients
    accumulate and that nothing stale is reused); returns {config: (grads, x.grad, losses)}."""
    results = {}
    for kind, scan, m, method_text in configs():
        chain = build_chain(kind)
        method = hbp.method_from_string(method_text.split("+")[0])
        tracer = Tracer(ctx.rank, ctx.world) if (kind, scan, m) == TRACED else None
        pipe = HighwayPipeline(
            chain, ctx.world, ctx.rank, method, final_loss,
            state_losses={i: state_loss for i in STATE_LOSS_AT},
            scan=scan, num_microbatches=m, scale_grads=False, timeout=ctx.timeout,
            trace=tracer,
            recompute=method_text.endswith("+recompute"),
        )
        x, y = data(kind)
        x = x.requires_grad_(True)
        losses = []
        for _ in range(2):
            if pipe.is_first:
                loss = pipe.step(x)
            elif pipe.is_last:
                loss = pipe.step(target=y)
            else:
                loss = pipe.step()
            losses.append(None if loss is None else float(loss))
        names = {id(p): n for n, p in chain.named_parameters()}
        grads = {names[id(p)]: p.grad.clone() for p in pipe.parameters() if p.grad is not None}
        results[(kind, scan, m, method_text)] = (
            grads, x.grad.clone() if pipe.is_first else None, losses,
            pipe.last_diagnostics)
        if tracer is not None:
            results["trace"] = tracer.to_dict()
    return results


def reference(kind: str, method_text: str, m: int):
    """Single-process chain, per micro-batch losses summed (layers are per-sample, so this
    equals the full batch with sum losses), two backward calls (accumulation). An
    Anderson-mixed method mixes the whole step's states at once (its weights depend on all
    of them, as the pipeline's all-reduced inner products do): its reference is the full
    batch in one call."""
    chain = build_chain(kind)
    chain.method = hbp.method_from_string(method_text.split("+")[0])
    x, y = data(kind)
    x = x.requires_grad_(True)
    states = (*STATE_LOSS_AT, LAYERS)
    total = 0.0
    chunks = 1 if chain.method.anderson else m
    for _ in range(2):
        for xm, ym in zip(x.chunk(chunks), y.chunk(chunks)):
            hs = chain(xm, return_states=states)
            loss = final_loss(hs[-1], ym) + sum(state_loss(h, None) for h in hs[:-1])
            loss.backward()
            total = float(loss.detach())
    grads = dict((n, p.grad) for n, p in chain.named_parameters())
    return grads, x.grad, total, chain.last_diagnostics


def autograd_reference(kind: str):
    chain = build_chain(kind)
    chain.method = hbp.Exact()
    x, y = data(kind)
    x = x.requires_grad_(True)
    for _ in range(2):
        hs = chain(x, return_states=(*STATE_LOSS_AT, LAYERS))
        (final_loss(hs[-1], y) + sum(state_loss(h, None) for h in hs[:-1])).backward()
    return dict((n, p.grad) for n, p in chain.named_parameters()), x.grad


def _close(actual, expected, what: str) -> None:
    try:
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def check(world: int, results: list[dict]) -> None:
    for cfg in configs():
        kind, _, m, method_text = cfg
        grads = {}
        for r in results:
            grads.update(r[cfg][0])
        ref_grads, ref_x, ref_loss, ref_diag = reference(kind, method_text, m)
        if "tol=" in method_text:  # the same stopping decisions as the single process
            for r in results:
                diag = r[cfg][3]
                assert (diag.iterations, diag.stop_reason, diag.fallback) == (
                    ref_diag.iterations, ref_diag.stop_reason, ref_diag.fallback), cfg
                assert diag.step_norms == pytest.approx(ref_diag.step_norms, rel=1e-9)
        assert set(grads) == {n for n, g in ref_grads.items() if g is not None}, cfg
        for name, g in grads.items():
            _close(g, ref_grads[name], f"{cfg} P={world} {name}")
        _close(results[0][cfg][1], ref_x, f"{cfg} P={world} x.grad")
        # Each rank returns the losses it evaluated; their sum is the chain's loss.
        total = sum(r[cfg][2][-1] for r in results if r[cfg][2][-1] is not None)
        assert abs(total - ref_loss) < 1e-9 * max(1.0, abs(ref_loss)) or m > 1, cfg
        if method_text == f"highway:k={LAYERS}":  # k = L is exact backprop
            exact_grads, exact_x = autograd_reference(kind)
            for name, g in grads.items():
                _close(g, exact_grads[name], f"{cfg} P={world} {name} vs autograd")
            _close(results[0][cfg][1], exact_x, f"{cfg} P={world} x.grad vs autograd")


def check_trace(world: int, results: list[dict]) -> None:
    """The traced run (Highway(k=1), M = 3, two steps): every phase where it belongs."""
    merged = merge_traces([r["trace"] for r in results])
    assert [r["rank"] for r in merged["ranks"]] == list(range(world))
    for step in (0, 1):
        per_rank = phase_breakdown(merged, step)
        for r in range(world):
            phases = per_rank[r]
            assert phases["forward"]["count"] == 3          # one per micro-batch
            assert phases["sweep"]["count"] == 1            # k = 1
            # The parameter sweep; rank 0 also pushes dLoss/dx into x.
            assert phases["param"]["count"] == (2 if r == 0 else 1)
            assert phases["step"]["count"] == 1
            sent = sum(e["bytes"] for e in merged["ranks"][r]["events"]
                       if e["step"] == step and e["kind"] == "send")
            # Activations forward (3 micro-batches of [2, 6] float64) unless last;
            # w^0 and iteration 1 carries down (S, and Pi below the top) unless first.
            act = 0 if r == world - 1 else 3 * 2 * WIDTH * 8
            assert sent >= act + (0 if r == 0 else 2 * BATCH * WIDTH * 8), (r, sent)
        path = critical_path(merged, step)
        ends = [e["end"] for rk in merged["ranks"] for e in rk["events"]
                if e["step"] == step and e["phase"] == "step"]
        starts = [e["start"] for rk in merged["ranks"] for e in rk["events"]
                  if e["step"] == step and e["phase"] == "step"]
        assert path["total"] == pytest.approx(max(ends) - min(starts))
        assert sum(path["phases"].values()) == pytest.approx(path["total"], rel=1e-6)
        # The path tiles the step from its first start to its last end, in time order.
        segments = path["path"]
        assert segments[0][3] == pytest.approx(min(starts))
        assert segments[-1][4] == pytest.approx(max(ends))
        assert all(a[4] == pytest.approx(b[3]) for a, b in zip(segments, segments[1:]))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_pipeline_equals_single_process_chain(world):
    results = spawn(run_configs, world, timeout=60.0)
    check(world, results)
    check_trace(world, results)


def test_single_stage_runs_without_a_process_group():
    chain = build_chain("relu")
    pipe = HighwayPipeline(chain, 1, 0, hbp.Highway(k=2), final_loss,
                           state_losses={i: state_loss for i in STATE_LOSS_AT})
    x, y = data("relu")
    x.requires_grad_(True)
    pipe.step(x, target=y)
    pipe.step(x, target=y)
    ref_grads, ref_x, _, _ = reference("relu", "highway:k=2", 1)
    for name, p in chain.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, ref_x, rtol=0, atol=1e-10)


def fail_at_step(ctx, victim: int, how: str):
    """Spawned job: rank `victim` is killed (SIGKILL) or stopped (SIGSTOP) at step 2."""
    chain = build_chain("identity")
    pipe = HighwayPipeline(chain, ctx.world, ctx.rank, hbp.Highway(k=1), final_loss,
                           timeout=ctx.timeout)
    x, y = data("identity")
    for step in range(4):
        if step == 2 and ctx.rank == victim:
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        if pipe.is_first:
            pipe.step(x)
        elif pipe.is_last:
            pipe.step(target=y)
        else:
            pipe.step()
    return "finished"


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_killed_or_stopped_rank_stops_every_rank_with_a_clear_error(how):
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        spawn(fail_at_step, 3, (1, how), timeout=5.0, deadline=120.0)
    msg = str(info.value)
    # Both survivors report, naming themselves, the lost peer and the step (or, when gloo
    # leaves one blocked, its watchdog ends it with a message of its own).
    for r in (0, 2):
        named = f"rank {r}: TransportError: HighwayPipeline rank {r}/3:" in msg and (
            "rank 1 failed at step 2" in msg)
        watchdog = f"rank {r}: HighwayPipeline rank {r}: watchdog" in msg
        assert named or watchdog, msg
    if how == "stop":  # the stopped rank cannot report: the launcher names and kills it
        assert "rank 1: stopped or hung" in msg, msg
    assert time.monotonic() - start < 120.0


def busy_single_rank(ctx, seconds: float):
    """Spawned job: one rank (no receives at all) whose steps outlast the watchdog limit."""
    chain = build_chain("identity")
    pipe = HighwayPipeline(chain, 1, 0, hbp.Highway(k=1), final_loss, timeout=ctx.timeout)
    x, y = data("identity")
    end = time.monotonic() + seconds
    steps = 0
    while time.monotonic() < end:
        pipe.step(x, target=y)
        steps += 1
    return steps


def test_steps_keep_the_watchdog_quiet_on_a_rank_that_receives_nothing():
    # The watchdog limit is 2 * 0.5 + 10 = 11 s; 13 s of steps must not trip it.
    (steps,) = spawn(busy_single_rank, 1, (13.0,), timeout=0.5, deadline=120.0)
    assert steps > 1


def test_a_method_set_on_the_chain_after_construction_is_refused_not_ignored():
    """KController / use_method / an assignment set `chain.method`; a pipeline runs the
    method its ranks agreed on at construction, so it refuses the step instead of silently
    training with the old method."""
    chain = build_chain("relu")
    pipe = HighwayPipeline(chain, 1, 0, None, final_loss)  # takes chain.method (Exact())
    x, y = data("relu")
    pipe.step(x, target=y)
    with hbp.use_method(chain, hbp.Highway(k=1)), pytest.raises(ValueError, match="build a new"):
        pipe.step(x, target=y)
    pipe.step(x, target=y)  # restored: runs again
    # a pipeline given its own method may differ from the chain's from the start
    HighwayPipeline(chain, 1, 0, hbp.Highway(k=2), final_loss).step(x, target=y)
