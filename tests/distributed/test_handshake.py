"""Ranks that disagree refuse (issue 18, items 1, 2 and 5): the configuration handshake of
`HighwayPipeline`, `ExactPipeline` and the DDG runtime, and the transport's tag header.

In-process: every handshake field's comparison (`config_differences` on the configurations
real pipelines produce), the pipeline's settings fixed after the handshake, and integer
boundaries. Multi-process (gloo): the issue's two reproductions (2 ranks), one 3-rank job
that builds a mismatched runtime per field (each raises on every rank at construction, so
the job goes on with the next), and a message stream that drifts (step, iteration, kind).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.core.methods import Method
from highwaybp.distributed import HighwayPipeline, TransportError, spawn
from highwaybp.distributed.handshake import ConfigMismatchError, config_differences

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

WIDTH, BATCH = 4, 4
TIMEOUT = 60.0  # generous: the mismatches must fail at once, a hang would fail by time


def build_chain(layers: int = 6, width: int = WIDTH, dtype=torch.float64,
                residual=hbp.Identity) -> hbp.ResidualChain:
    torch.manual_seed(0)
    return hbp.ResidualChain([
        hbp.ResidualLayer(nn.Sequential(nn.Linear(width, width), nn.Tanh()), residual())
        for _ in range(layers)]).to(dtype)


def loss_fn(h, target):
    return ((h - target) ** 2).sum()


def run_steps(pipe: HighwayPipeline, steps: int = 2, dtype=torch.float64) -> dict:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTH, generator=gen, dtype=dtype)
    y = torch.randn(BATCH, WIDTH, generator=gen, dtype=dtype)
    losses = []
    for _ in range(steps):
        if pipe.is_first:
            loss = pipe.step(x)
        elif pipe.is_last:
            loss = pipe.step(target=y)
        else:
            loss = pipe.step()
        losses.append(None if loss is None else float(loss))
    return {"losses": losses, "grads": [p.grad.clone() for p in pipe.parameters()]}


# ----------------------------------------------------------------------------- in process


def _single(**kw) -> dict:
    """The configuration a one-rank pipeline built with `kw` sends in the handshake."""
    chain = kw.pop("chain", None) or build_chain()
    return HighwayPipeline(chain, 1, 0, kw.pop("method", hbp.Highway(k=1)), loss_fn,
                           **kw)._config()


@dataclasses.dataclass(frozen=True)
class _WithNewOption(Method):
    """A method with an option no engine knows yet (as an `anderson=` would be)."""

    k: int = 1
    depth: int = 0
    option_types: ClassVar[dict[str, type]] = {"k": int, "depth": int}

    @property
    def iteration_bound(self) -> int:
        return self.k


# field -> (rank 0's configuration, rank 1's, text that names each value)
def _field_cases():
    return {
        "method": (_single(method=hbp.Highway(k=1)), _single(method=hbp.Highway(k=2)),
                   ('"highway:k=1"', '"highway:k=2"')),
        "method (tol)": (_single(method=hbp.Highway(tol=0.1, max_k=4)),
                         _single(method=hbp.Highway(tol=0.2, max_k=4)),
                         ("tol=0.1,", "tol=0.2,")),
        "method (fallback)": (
            _single(method=hbp.Highway(tol=0.1, max_k=4, fallback="best")),
            _single(method=hbp.Highway(tol=0.1, max_k=4, fallback="last")),
            ("fallback=best", "fallback=last")),
        "method (kind)": (_single(method=hbp.FixedPoint(k=1)), _single(),
                          ('"fixedpoint:k=1"', '"highway:k=1"')),
        "method (a later option)": (_single(method=_WithNewOption(depth=0)),
                                    _single(method=_WithNewOption(depth=3)),
                                    ("depth=0", "depth=3")),
        "scan": (_single(scan="distributed"), _single(scan="centralized"),
                 ('"distributed"', '"centralized"')),
        "num_microbatches": (_single(num_microbatches=1), _single(num_microbatches=2),
                             ("1", "2")),
        "scale_grads": (_single(scale_grads=True), _single(scale_grads=False),
                        ("true", "false")),
        "recompute": (_single(recompute=False), _single(recompute=True),
                      ("false", "true")),
        "state_losses": (_single(state_losses={2: loss_fn}), _single(),
                         ("[2]", "[]")),
        "dtype": (_single(), _single(chain=build_chain(dtype=torch.float32)),
                  ('"float64"', '"float32"')),
        "num_layers": (_single(), _single(chain=build_chain(layers=7)), ("6", "7")),
        "layers": (_single(), _single(chain=build_chain(width=WIDTH + 1)),
                   ("0.weight:4x4:float64", "0.weight:5x5:float64")),
        "layers (residual)": (_single(), _single(chain=build_chain(residual=hbp.ReLUResidual)),
                              ("Identity()", "ReLUResidual()")),
        "boundaries": (dict(_single(), boundaries=[0, 3, 6]),
                       dict(_single(), boundaries=[0, 2, 6]), ("[0, 3, 6]", "[0, 2, 6]")),
        "num_stages": (dict(_single(), num_stages=2), dict(_single(), num_stages=3),
                       ("2", "3")),
    }


FIELD_CASES = _field_cases()


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_each_field_of_the_handshake_is_compared_and_named(case):
    a, b, (text_a, text_b) = FIELD_CASES[case]
    field = case.split(" (")[0]
    assert config_differences([a, dict(a)]) == []  # equal configurations pass
    lines = config_differences([a, a, b])
    # Only the field that was changed (and what it implies: a longer chain has more layers).
    named = [line.split(":")[0] for line in lines]
    assert field in named, lines
    line = lines[named.index(field)]
    first, odd = line.split(", rank 2 has ")
    head = f"{field}: layer 1 differs: " if field == "layers" else f"{field}: "
    assert first.startswith(f"{head}ranks 0, 1 have ") and text_a in first, line
    assert text_b in odd and text_a not in odd, line
    extra = set(named) - {field, "layers"}
    assert not extra or (field, extra) == ("num_layers", {"boundaries"}), lines


def test_a_longer_chain_names_the_first_differing_layer():
    a, b = _single(), _single(chain=build_chain(layers=7))
    lines = config_differences([a, b])
    assert "layers: layer 7 differs: rank 0 has \"(no such layer)\", rank 1 has" in "\n".join(
        lines), lines


def test_ranks_building_different_runtimes_are_told_only_that():
    a = _single()
    b = {"runtime": "ExactPipeline", "num_ranks": 2, "num_layers": 6}
    assert config_differences([a, b, a]) == [
        'runtime: ranks 0, 2 have "HighwayPipeline", rank 1 has "ExactPipeline"']


def test_matching_pipelines_agree_whatever_way_the_boundaries_are_given():
    a = _single()
    assert config_differences([a, _single(boundaries=[0, 6])]) == []
    assert config_differences([a, _single(boundaries=np.array([0, 6]))]) == []


@pytest.mark.parametrize("field, value", [
    ("method", hbp.Highway(k=2)), ("scan", "centralized"), ("num_microbatches", 2),
    ("scale_grads", False), ("recompute", True), ("boundaries", (0, 6)), ("num_stages", 2)])
def test_the_settings_the_ranks_compared_are_fixed_afterwards(field, value):
    pipe = HighwayPipeline(build_chain(), 1, 0, hbp.Highway(k=1), loss_fn)
    before = getattr(pipe, field)
    with pytest.raises(AttributeError, match=rf"HighwayPipeline\.{field} is fixed when"):
        setattr(pipe, field, value)
    assert getattr(pipe, field) == before


@pytest.mark.parametrize("boundaries", [[0, 6.9], [0.0, 6], [False, 6], [0, np.float64(6)]])
def test_boundaries_must_be_ints(boundaries):
    with pytest.raises(TypeError, match="boundaries must be ints"):
        HighwayPipeline(build_chain(), 1, 0, hbp.Highway(k=1), loss_fn, boundaries=boundaries)


def test_integer_boundaries_of_any_integer_type_are_taken():
    pipe = HighwayPipeline(build_chain(), 1, 0, hbp.Highway(k=1), loss_fn,
                           boundaries=[np.int64(0), 6])
    assert pipe.boundaries == (0, 6) and all(type(b) is int for b in pipe.boundaries)


# ----------------------------------------------------------------------------- the issue's runs


def _per_rank_pipeline(ctx, per_rank: list[dict]):
    kw = dict(per_rank[ctx.rank])
    chain = build_chain(kw.pop("layers", 6))
    pipe = HighwayPipeline(chain, ctx.world, ctx.rank, kw.pop("method"), loss_fn,
                           timeout=ctx.timeout, **kw)
    return run_steps(pipe)


def _expect_mismatch_on_every_rank(per_rank: list[dict], *expected: str) -> None:
    with pytest.raises(TransportError) as info:
        spawn(_per_rank_pipeline, len(per_rank), (per_rank,), timeout=TIMEOUT)
    message = str(info.value)
    for r in range(len(per_rank)):
        m = re.search(rf"rank {r}: ConfigMismatchError: HighwayPipeline rank {r}/"
                      rf"{len(per_rank)}: (.*?)(; rank \d+: |$)", message, re.S)
        assert m is not None, message
        for text in expected:
            assert text in m.group(1), (r, text, message)


def test_issue_18_different_boundaries_per_rank_raise_on_every_rank():
    """Issue 18, item 1: rank 0 [0, 3, 6], rank 1 [0, 2, 6] at Highway(k=6) used to run,
    layer 2 trained by both ranks, the loss 5.79 instead of 4.77."""
    _expect_mismatch_on_every_rank(
        [{"method": hbp.Highway(k=6), "boundaries": [0, 3, 6]},
         {"method": hbp.Highway(k=6), "boundaries": [0, 2, 6]}],
        "boundaries: rank 0 has [0, 3, 6], rank 1 has [0, 2, 6]")


def test_issue_18_different_k_per_rank_raises_on_every_rank():
    """Issue 18, item 2: Highway(k=1) on rank 0, k=2 on rank 1 used to shift the message
    stream (two steps with wrong gradients on rank 0, then a timeout blaming a peer)."""
    _expect_mismatch_on_every_rank(
        [{"method": hbp.Highway(k=1)}, {"method": hbp.Highway(k=2)}],
        'method: rank 0 has "highway:k=1", rank 1 has "highway:k=2"')


# ----------------------------------------------------------------------------- every field, 3 ranks


def _ddg_config(**kw):
    from highwaybp.ddg import DDGRunConfig, EpochBatches
    from highwaybp.models.resnet1d import build_resnet1d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=gen)
    base = dict(build_model=functools.partial(build_resnet1d, seed=3, channels=4, blocks=3,
                                              dtype=torch.float64),
                batches=EpochBatches(x, y, batch_size=8, seed=1), steps=3,
                optimizer_factory=functools.partial(torch.optim.SGD, lr=0.05),
                semantics="stash", rng_seed=0, timeout=TIMEOUT, threads=1)
    base.update(kw)
    return DDGRunConfig(**base)


def _case(name: str, rank: int, world: int):
    """Build (and step) case `name` as rank `rank`; the last rank is the odd one out."""
    odd = rank == world - 1
    if name == "ddg semantics":
        from highwaybp.ddg.runtime import run_rank

        return run_rank(rank, world, _ddg_config(semantics="recompute" if odd else "stash"))
    if name == "ddg boundaries":
        from highwaybp.ddg.runtime import run_rank

        cuts = [0, 1, 2, 5] if world == 3 else [0, *range(1, world), 5]
        if odd:
            cuts = [0, *range(2, world + 1), 5]
        return run_rank(rank, world, _ddg_config(boundaries=cuts))
    if name.startswith("exact "):
        from highwaybp.distributed.baselines import ExactPipeline

        layers = list(build_chain(6 if not (odd and name == "exact num_layers") else 7).layers)
        m = 2 * world if (odd and name == "exact num_microbatches") else world
        cuts = None
        if name == "exact boundaries":
            cuts = list(range(1, world)) if odd else list(range(2, world + 1))
        pipe = ExactPipeline(layers, world, rank, "gpipe", m, loss_fn, boundaries=cuts,
                             timeout=TIMEOUT)
        x = torch.randn(2 * world * BATCH, WIDTH, dtype=torch.float64)
        return pipe.step(x if rank == 0 else None, x if rank == world - 1 else None)
    kw: dict = {"method": hbp.Highway(k=2)}
    layers, dtype = 6, torch.float64
    if odd:
        if name == "num_layers":
            layers = 7
        elif name == "boundaries":
            kw["boundaries"] = [0, *range(1, world), 6]
        elif name == "method":
            kw["method"] = hbp.Highway(k=3)
        elif name == "scan":
            kw["scan"] = "centralized"
        elif name == "num_microbatches":
            kw["num_microbatches"] = 2
        elif name == "scale_grads":
            kw["scale_grads"] = False
        elif name == "recompute":
            kw["recompute"] = True
        elif name == "dtype":
            dtype = torch.float32
        elif name == "layers":
            pass  # built below with another width
    chain = build_chain(layers, width=WIDTH + 2 if (odd and name == "layers") else WIDTH,
                        dtype=dtype)
    pipe = HighwayPipeline(chain, world, rank, kw.pop("method"), loss_fn, timeout=TIMEOUT, **kw)
    return run_steps(pipe)


# case -> the field named, with the values of the first ranks and of the last one (3 ranks)
REAL_CASES = {
    "num_layers": ("num_layers", "6", "7"),
    "boundaries": ("boundaries", "[0, 2, 4, 6]", "[0, 1, 2, 6]"),
    "method": ("method", '"highway:k=2"', '"highway:k=3"'),
    "scan": ("scan", '"distributed"', '"centralized"'),
    "num_microbatches": ("num_microbatches", "1", "2"),
    "scale_grads": ("scale_grads", "true", "false"),
    "recompute": ("recompute", "false", "true"),
    "dtype": ("dtype", '"float64"', '"float32"'),
    "layers": ("layers", "0.weight:4x4:float64", "0.weight:6x6:float64"),
    "exact num_layers": ("num_layers", "6", "7"),
    "exact num_microbatches": ("num_microbatches", "3", "6"),
    "exact boundaries": ("boundaries", "[0, 2, 3, 6]", "[0, 1, 2, 6]"),
    "ddg semantics": ("semantics", '"stash"', '"recompute"'),
    "ddg boundaries": ("boundaries", "[0, 1, 2, 5]", "[0, 2, 3, 5]"),
}


def _mismatch_job(ctx, names: list[str]) -> dict[str, str]:
    """Every case in turn on this rank: the error it raised (each raises at construction on
    every rank, so the process group stays in step for the next one)."""
    out = {}
    for name in names:
        try:
            _case(name, ctx.rank, ctx.world)
            out[name] = "no error"
        except ConfigMismatchError as err:
            out[name] = f"ConfigMismatchError: {err}"
    return out


def _runnable_cases() -> list[str]:
    """The cases this torch can build: ExactPipeline needs torch's pipelining runtime as
    it uses it (torch 2.5's PipelineStage needs example inputs: `missing_schedule`)."""
    from highwaybp.distributed.baselines import missing_schedule

    exact_missing = missing_schedule("gpipe") is not None
    return [c for c in sorted(REAL_CASES) if not (exact_missing and c.startswith("exact "))]


@pytest.fixture(scope="module")
def three_rank_mismatches():
    return spawn(_mismatch_job, 3, (_runnable_cases(),), timeout=TIMEOUT)


@pytest.mark.parametrize("case", sorted(REAL_CASES))
def test_a_mismatched_field_raises_on_every_one_of_3_ranks(three_rank_mismatches, case):
    if case not in _runnable_cases():
        from highwaybp.distributed.baselines import missing_schedule

        pytest.skip(missing_schedule("gpipe"))
    field, first, odd = REAL_CASES[case]
    runtime = "DDG" if case.startswith("ddg") else (
        "ExactPipeline" if case.startswith("exact") else "HighwayPipeline")
    for rank, result in enumerate(three_rank_mismatches):
        message = result[case]
        assert message.startswith(f"ConfigMismatchError: {runtime} rank {rank}/3:"), message
        line = next((x for x in message.splitlines() if x.strip().startswith(f"{field}:")),
                    None)
        assert line is not None, message
        assert f"ranks 0, 1 have {first}" in line or (
            field == "layers" and first in line), message
        assert f"rank 2 has {odd}" in line or (field == "layers" and odd in line), message


# ----------------------------------------------------------------------------- a drifting stream


def _drift_job(ctx):
    """Rank 1 sends messages whose tag header is off in one field each (on its own tag);
    rank 0 expects step 4, iteration 2, a scan carry. Returns rank 0's errors per case."""
    from highwaybp.distributed.transport import Link, MessageMismatchError

    link = Link(ctx.rank, ctx.world, ctx.timeout, torch.device("cpu"), label="test")
    cases = {"step": dict(step=3), "iteration": dict(iteration=1),
             "kind": dict(what="a VJP"), "none": {}}
    out = {}
    for tag, (name, change) in enumerate(cases.items(), start=20):
        payload = torch.full((3,), float(tag), dtype=torch.float64)
        sent = dict(step=4, iteration=2, what="a scan carry") | change
        if ctx.rank == 1:
            link.send_to(payload, 0, tag, sent["what"], sent["step"], sent["iteration"])
            link.flush(0)
            continue
        buf = torch.zeros(3, dtype=torch.float64)
        try:
            got = link.recv_from(buf, 1, tag, "a scan carry", 4, 2)
            out[name] = f"received {got.tolist()}"
        except MessageMismatchError as err:
            out[name] = str(err)
            link._post_recv(buf, 1, tag, "the payload", 4)  # drain it, the test goes on
    torch.distributed.barrier()
    return out


@pytest.fixture(scope="module")
def drift_errors():
    return spawn(_drift_job, 2, timeout=TIMEOUT)[0]


@pytest.mark.parametrize("field, got", [
    ("step", "a scan carry of step 3, iteration 2"),
    ("iteration", "a scan carry of step 4, iteration 1"),
    ("kind", "a VJP of step 4, iteration 2")])
def test_a_drifted_message_is_refused_naming_step_iteration_and_kind(drift_errors, field, got):
    message = drift_errors[field]
    assert message.startswith("test rank 0/2: expected a scan carry of step 4, iteration 2 "
                              "(runtime 0, message 0 on this link and tag, 3 float64 "
                              "elements) from rank 1, but rank 1 sent " + got), message
    assert "drifted apart" in message
    assert drift_errors["none"] == "received [23.0, 23.0, 23.0]"


def _skipped_step_job(ctx):
    """A matching pipeline whose rank 1 skips a step (its step counter jumps)."""
    pipe = HighwayPipeline(build_chain(), ctx.world, ctx.rank, hbp.Highway(k=2), loss_fn,
                           timeout=ctx.timeout)
    run_steps(pipe, steps=1)
    if ctx.rank == 1:
        pipe.step_index += 1
    return run_steps(pipe, steps=1)


def test_a_rank_a_step_ahead_fails_at_its_first_message_naming_both_steps():
    with pytest.raises(TransportError) as info:
        spawn(_skipped_step_job, 2, timeout=TIMEOUT)
    message = str(info.value)
    assert ("rank 1: MessageMismatchError: HighwayPipeline rank 1/2: expected an activation "
            "of step 2 (runtime 0, message 1 on this link and tag, 16 float64 elements) from "
            "rank 0, but rank 0 sent an activation of step 1 (runtime 0, message 1") in message, \
        message


def _two_pipelines_job(ctx):
    """Two matching pipelines on one process group (say, training and evaluation), stepped
    in a different order on rank 1: same step, kind and shapes, other runtime."""
    pipes = [HighwayPipeline(build_chain(), ctx.world, ctx.rank, hbp.Highway(k=1), loss_fn,
                             timeout=ctx.timeout) for _ in range(2)]
    return [run_steps(p, steps=1) for p in (pipes if ctx.rank == 0 else pipes[::-1])]


def test_two_pipelines_stepped_in_another_order_do_not_take_each_others_messages():
    with pytest.raises(TransportError) as info:
        spawn(_two_pipelines_job, 2, timeout=TIMEOUT)
    message = str(info.value)
    assert ("rank 1: MessageMismatchError: HighwayPipeline rank 1/2: expected an activation "
            "of step 0 (runtime 1, message 0 on this link and tag, 16 float64 elements) from "
            "rank 0, but rank 0 sent an activation of step 0 (runtime 0, message 0") in message, \
        message
