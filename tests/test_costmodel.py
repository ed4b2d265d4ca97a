"""The step-time model (highwaybp.distributed.costmodel) on cases computed by hand."""

from __future__ import annotations

import math
import re

import pytest

from highwaybp.distributed import costmodel as cm
from highwaybp.distributed.baselines import missing_schedule

NO_COMM = cm.Link()


def test_back_of_envelope_p2_m1_k1():
    # The estimate: unit f, v_in, v_par, v_both = 2, no communication, P = 2.
    L = 16
    layers = cm.uniform_layers(L, forward=1.0, vjp_input=1.0, vjp_param=1.0)
    assert cm.exact(layers, 2, 1, NO_COMM, "gpipe").step_time == pytest.approx(3 * L)
    assert cm.highway(layers, 2, 1, NO_COMM, k=1).step_time == pytest.approx(2 * L)
    assert cm.highway(layers, 2, 1, NO_COMM, k=1, recompute=True).step_time == pytest.approx(
        2.5 * L)
    # one more iteration: one more parallel sweep of L/2 input VJPs
    assert cm.highway(layers, 2, 1, NO_COMM, k=2).step_time == pytest.approx(2.5 * L)


# torch's 1F1B needs M >= P, so (2, 1) is GPipe only.
@pytest.mark.parametrize("schedule,P,M", [
    (schedule, P, M) for schedule in ("gpipe", "1f1b")
    for P, M in [(2, 1), (2, 4), (4, 4), (4, 8), (8, 8), (3, 5)]
    if schedule == "gpipe" or M >= P])
def test_gpipe_and_1f1b_bubble(schedule, P, M):
    f, b = 1.0, 3.0  # per stage and micro-batch: one layer per stage
    layers = cm.uniform_layers(P, forward=f, vjp_input=1.0, vjp_param=1.0, vjp_both=b)
    t = cm.exact(layers, P, M, NO_COMM, schedule)
    assert t.step_time == pytest.approx((M + P - 1) * (f + b))
    for busy in t.busy():  # each rank idles for the bubble (P-1)/(M+P-1) of the step
        assert busy["idle"] / t.step_time == pytest.approx((P - 1) / (M + P - 1))


def test_link_time_in_gpipe():
    # P = 2, M = 1: the forward crosses the link once, the backward once.
    layers = cm.uniform_layers(2, forward=1.0, vjp_input=1.0, vjp_param=1.0, state_bytes=1000)
    link = cm.Link(latency=0.5, bandwidth=1000.0)  # 1.5 per message
    assert cm.exact(layers, 2, 1, link).step_time == pytest.approx(2 * 1 + 2 * 2 + 2 * 1.5)


@pytest.mark.parametrize("L", [4, 5, 8, 9, 16])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_eq13_special_case(L, k):
    # Paper's Eq. 13: T = T_fwd + (k/L) T_bwd + O(k log L): one layer per device, no
    # parameter sweep, v_in = v_both = T_bwd / L.
    f, b = 1.0, 2.0
    layers = cm.uniform_layers(L, forward=f, vjp_input=b, vjp_param=0.0, vjp_both=b)
    t_fwd, t_bwd = L * f, L * b
    no_comm = cm.highway(layers, L, 1, NO_COMM, k).step_time
    assert no_comm == pytest.approx(t_fwd + k / L * t_bwd)
    # With a message latency the scans add at most 1 + ceil(log2(L-1)) hops each (k + 1
    # scans), and the forward L - 1 hops.
    lam = 1e-3
    with_lat = cm.highway(layers, L, 1, cm.Link(lam), k).step_time
    overhead = with_lat - (t_fwd + (L - 1) * lam + k / L * t_bwd)
    hops = 1 + math.ceil(math.log2(L - 1))
    assert lam * 0.999 <= overhead <= (k + 1) * hops * lam * 1.001


def test_centralized_scan_two_hops():
    # P = 4, M = 1, one layer per rank, equal layers: each scan after w^0 is latency-bound
    # through rank 0 and back; k = 0: one scan, whose carry to rank 0 takes 1 hop.
    L, lam = 4, 1.0
    layers = cm.uniform_layers(L, forward=0.0, vjp_input=0.0, vjp_param=0.0, vjp_both=0.0)
    t = cm.highway(layers, L, 1, cm.Link(lam), 1, scan="centralized")
    # forward: 3 hops. w^0: ranks 1..3 send to rank 0 (1 hop), rank 0 sends ranks 1, 2
    # their carries (1 hop). Scan 1: ranks 1, 2 send after their fix-up, rank 0 replies:
    # 2 more hops; rank 0 sets the end (its own fix-up needs no reply).
    assert t.step_time == pytest.approx(3 * lam + 2 * lam + 2 * lam)


def test_fixedpoint_one_message_per_iteration():
    L, lam = 4, 0.25
    layers = cm.uniform_layers(L, forward=1.0, vjp_input=1.0, vjp_param=1.0)
    t = cm.highway(layers, 2, 1, cm.Link(lam), 3, fixed_point=True)
    # Rank 1 finishes its forward last (4 + one message) and never waits afterwards: its
    # 3 sweeps (2 layers each) feed rank 0 one message later, so rank 0 ends one message
    # after rank 1's: rank 0's last sweep and param sweep end at
    # 4 + lam + 3 * 2 + lam + 2 (each of its sweeps waits for rank 1's previous one).
    assert t.step_time == pytest.approx(4 + lam + 3 * 2 + lam + 2)
    # without the messages the two ranks' sweeps overlap completely
    t0 = cm.highway(layers, 2, 1, NO_COMM, 3, fixed_point=True)
    assert t0.step_time == pytest.approx(4 + 3 * 2 + 2)


def test_critical_path_covers_step():
    layers = cm.uniform_layers(12, forward=1.0, vjp_input=0.7, vjp_param=1.3,
                               scan=0.01, state_bytes=4096)
    link = cm.Link(0.05, 1e6)
    runs = [cm.highway(layers, 3, 2, link, 2), cm.exact(layers, 3, 3, link, "1f1b")]
    if cm.unmodelled("interleaved-zb") is None:  # else an older torch in the range
        runs.append(cm.exact(layers, 3, 6, link, "interleaved-zb"))
    for t in runs:
        path = t.critical_path()
        assert sum(b - a for _, _, a, b in path) == pytest.approx(t.step_time)
        for (_, _, _, b0), (_, _, a1, _) in zip(path, path[1:]):
            assert a1 == pytest.approx(b0)  # contiguous segments


@pytest.mark.parametrize("schedule,P,M", [("interleaved-zb", 2, 2), ("interleaved-zb", 4, 8),
                                          ("interleaved-zb-2", 2, 4), ("interleaved-zb-2", 3, 2),
                                          ("zbv", 2, 4), ("zbv", 4, 8), ("dualpipev", 2, 4),
                                          ("dualpipev", 3, 6)])
def test_zero_bubble_orders_complete(schedule, P, M):
    reason = cm.unmodelled(schedule)
    if reason is not None:  # an older torch in the declared range
        pytest.skip(reason)
    orders, owners = cm._torch_orders(schedule, P, M)
    S = len(owners)
    seen = sorted(a for order in orders for a in order)
    kinds = {"I", "W"}
    expect = sorted([("F", s, m) for s in range(S) for m in range(M)]
                    + [(k, s, m) for s in range(S) for m in range(M) for k in kinds])
    if any(a[0] == "B" for a in seen):  # DualPipeV runs some full backwards
        done = {(s, m) for kind, s, m in seen if kind == "B"}
        expect = sorted([a for a in expect if not (a[0] in kinds and (a[1], a[2]) in done)]
                        + [("B", s, m) for s, m in done])
    assert seen == expect


def test_zero_bubble_beats_1f1b_when_backward_splits():
    # v_in + v_par = v_both: splitting costs nothing, so filling the bubble with W must win.
    layers = cm.uniform_layers(16, forward=1.0, vjp_input=1.0, vjp_param=1.0)
    t_1f1b = cm.exact(layers, 4, 8, NO_COMM, "1f1b").step_time
    for schedule in ("interleaved-zb", "interleaved-zb-2", "zbv"):
        if cm.unmodelled(schedule) is not None:  # an older torch in the declared range
            continue
        assert cm.exact(layers, 4, 8, NO_COMM, schedule).step_time < t_1f1b


def test_highway_has_no_backward_bubble_at_p8_m8():
    # The estimate: P = 8, M = 8, unit costs, k = 1, graphs kept: GPipe
    # (M+P-1)(f+b) vs Highway (M+P-1) f + M (k v_in + v_par) per stage.
    P = M = 8
    layers = cm.uniform_layers(P, forward=1.0, vjp_input=1.0, vjp_param=1.0)
    gpipe = cm.exact(layers, P, M, NO_COMM, "gpipe").step_time
    hbp = cm.highway(layers, P, M, NO_COMM, 1).step_time
    assert gpipe == pytest.approx(15 * 3)
    assert hbp == pytest.approx(15 + 8 * 2)
    assert gpipe / hbp == pytest.approx(45 / 31)


def test_ddg_steady_state():
    layers = cm.uniform_layers(8, forward=1.0, vjp_input=1.0, vjp_param=1.0)
    assert cm.ddg(layers, 1, NO_COMM) == pytest.approx(8 * 3)  # backprop
    assert cm.ddg(layers, 2, NO_COMM) == pytest.approx(4 * 3)  # max over modules of F + B
    assert cm.ddg(layers, 4, NO_COMM, recompute=True) == pytest.approx(2 * 4)


def test_uneven_boundaries():
    layers = cm.uniform_layers(6, forward=1.0, vjp_input=1.0, vjp_param=1.0)
    t = cm.highway(layers, 2, 1, NO_COMM, 1, boundaries=[0, 4, 6])
    # forward 6; rank 0 owns 4 layers: its sweep (4) and param sweep (4) set the end
    assert t.step_time == pytest.approx(6 + 4 + 4)
    with pytest.raises(ValueError, match="boundaries"):
        cm.highway(layers, 2, 1, NO_COMM, 1, boundaries=[0, 6, 6])


def test_deadlock_is_reported():
    a = cm.Task("a", 0, "forward", 1.0, [("b", None)])
    b = cm.Task("b", 1, "forward", 1.0, [("a", None)])
    with pytest.raises(RuntimeError, match="deadlock"):
        cm.simulate([[a], [b]], NO_COMM)


# --------------------------------------------------------------------------- torch's orders
# The modelled per-rank action order of every exact schedule, pinned against the actions
# torch's own schedule objects run for the same P and M (no processes are started).


class _RecordingStage:
    """Just enough of a torch PipelineStage for a single-stage schedule's runtime loop
    (`_step_microbatches`) to run without a process group: no P2P ops, and every
    forward/backward call is recorded as (kind, stage, micro-batch)."""

    def __init__(self, stage_index: int, num_stages: int) -> None:
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_last = stage_index == num_stages - 1
        self.log: list[tuple[str, int, int]] = []

    def __getattr__(self, name: str):
        if name.startswith("get_") and name.endswith("_ops"):  # get_fwd_recv_ops, ...
            return lambda *args, **kwargs: []
        if name.startswith(("release_", "clear_")):  # buffer housekeeping (torch 2.15:
            return lambda *args, **kwargs: None       # release_fwd_send_outputs)
        raise AttributeError(name)

    def forward_one_chunk(self, mb: int, *args, **kwargs) -> None:
        self.log.append(("F", self.stage_index, mb))

    def backward_one_chunk(self, mb: int, **kwargs) -> None:
        self.log.append(("B", self.stage_index, mb))

    def perform_reduce_grad(self, *args) -> None:
        pass


def _torch_single_stage_order(cls_name: str, P: int, M: int) -> list[list[tuple[str, int, int]]]:
    """What torch's ScheduleGPipe / Schedule1F1B runtime loop runs on each rank. Read from
    the loop itself, not from `pipeline_order`: torch 2.13's Schedule1F1B.pipeline_order
    numbers the last rank's forwards 1..M instead of 0..M-1, while its loop runs 0..M-1."""
    from torch.distributed import pipelining

    orders = []
    for r in range(P):
        stage = _RecordingStage(r, P)
        schedule = getattr(pipelining, cls_name)(stage, M)
        schedule._initialize_stage = lambda *args, **kwargs: None  # shape inference: no peers
        schedule._step_microbatches()
        orders.append(stage.log)
    return orders


def _torch_multi_stage_order(cls_name: str, per_rank: int, P: int, M: int
                             ) -> list[list[tuple[str, int, int]]]:
    """The compute actions, in order, of each rank's `pipeline_order_with_comms`: the list
    torch's _PipelineScheduleRuntime walks (overlapped F/B pairs in their sub-action order,
    as it runs them)."""
    from unittest import mock

    from torch.distributed import pipelining
    from torch.distributed.pipelining.stage import PipelineStage

    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod = 0, P, None
    stage.num_stages = P * per_rank
    schedule = getattr(pipelining, cls_name)([stage] * per_rank, M)
    orders = []
    for r in range(P):
        order = []
        for action in schedule.pipeline_order_with_comms[r]:
            for a in action.sub_actions or (action,):
                if a.computation_type.value in ("F", "B", "I", "W"):
                    order.append((a.computation_type.value, a.stage_index, a.microbatch_index))
        orders.append(order)
    return orders


def _modelled_order(t: cm.Timeline) -> list[list[tuple[str, int, int]]]:
    """(kind, stage, micro-batch) of each rank's simulated tasks, in the order it runs them:
    F{s}.{m}, W{s}.{m}; G{s}.{m} is a full backward B or an input backward I (its phase)."""
    out = []
    for tasks in t.ranks:
        order = []
        for task in tasks:
            stage, mb = task.id[1:].split(".")
            kind = task.id[0] if task.id[0] != "G" else ("B" if task.phase == "backward" else "I")
            order.append((kind, int(stage), int(mb)))
        out.append(order)
    return out


_TORCH_SCHEDULES = {"gpipe": ("ScheduleGPipe", 1), "1f1b": ("Schedule1F1B", 1),
                    "interleaved-zb": ("ScheduleInterleavedZeroBubble", 1),
                    "interleaved-zb-2": ("ScheduleInterleavedZeroBubble", 2),
                    "zbv": ("ScheduleZBVZeroBubble", 2), "dualpipev": ("ScheduleDualPipeV", 2)}


def _order_cases():
    for schedule in _TORCH_SCHEDULES:
        for P in (2, 3, 4):
            for M in (1, 2, P, P + 1, 2 * P, 2 * P + 3):
                if schedule == "1f1b" and M < P:  # torch: 1F1B needs M >= P
                    continue
                if schedule == "dualpipev" and M < 2 * P:  # DualPipeV needs M >= 2P
                    continue
                yield schedule, P, M


def _skip_unmodelled(schedule: str) -> None:
    """Skip, with the reason, a schedule this torch lacks or builds otherwise (torch 2.5:
    no ZBV / DualPipeV; its InterleavedZeroBubble needs two stages per rank)."""
    why = cm.unmodelled(schedule)
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("schedule,P,M", sorted(set(_order_cases())))
def test_modelled_order_is_the_order_torch_runs(schedule, P, M):
    _skip_unmodelled(schedule)
    why = missing_schedule(schedule)  # torch's own runtime loop is what we compare with
    if why is not None:
        pytest.skip(why)
    cls_name, per_rank = _TORCH_SCHEDULES[schedule]
    layers = cm.uniform_layers(P * per_rank, forward=1.0, vjp_input=1.0, vjp_param=1.0)
    if schedule in ("gpipe", "1f1b"):
        expected = _torch_single_stage_order(cls_name, P, M)
    else:
        try:
            expected = _torch_multi_stage_order(cls_name, per_rank, P, M)
        except ValueError as err:  # e.g. looped zero bubble: M a multiple of its rounds
            with pytest.raises(ValueError, match=re.escape(str(err)[:40])):
                cm.exact(layers, P, M, NO_COMM, schedule)  # the model refuses it too
            return
    modelled = _modelled_order(cm.exact(layers, P, M, NO_COMM, schedule))
    for r in range(P):
        assert modelled[r] == expected[r], f"rank {r}"


# One layer per stage, f = 1, I = v_in = 1, v_both = B = 3 (so a zero-bubble W costs
# B - I = 2; v_par = 0.5 is what Highway's parameter sweep would cost, not W), and a link of
# 0.5 + 1000 B / 1000 B/s = 1.5 per message (m).
HAND_LINK = cm.Link(latency=0.5, bandwidth=1000.0)


def _hand_layers(num_stages: int) -> list[cm.LayerCost]:
    return cm.uniform_layers(num_stages, forward=1.0, vjp_input=1.0, vjp_param=0.5,
                             vjp_both=3.0, state_bytes=1000)


@pytest.mark.parametrize("schedule,P,M,stages,rank_ends", [
    ("gpipe", 2, 2, 2, [15.0, 10.5]),
    ("1f1b", 4, 4, 4, [43.0, 38.5, 34.0, 29.5]),
    ("interleaved-zb", 2, 2, 2, [12.0, 10.5]),
    ("interleaved-zb-2", 2, 2, 4, [23.0, 21.5]),
    ("zbv", 2, 2, 4, [24.0, 21.5]),
    ("dualpipev", 2, 4, 4, [40.0, 39.5]),
])
def test_step_time_with_a_link_computed_by_hand(schedule, P, M, stages, rank_ends):
    """Each schedule once, by hand: f = 1, I = 1, W = B - I = 2, B = 3, m = 1.5 per message.
    A task starts when its rank is free and its input has arrived: F(s, m) after F(s-1, m),
    B/I(s, m) after B/I(s+1, m) (the last stage: after its own F(s, m)), W after its I; a
    dependency on another rank adds m. Tasks as [start, end], per rank in torch's order
    (rN: rank N; Fs.m, Bs.m, Is.m, Ws.m):

    gpipe P=2 M=2: r0 F0.0[0,1] F0.1[1,2]; r1 F1.0[2.5,3.5] F1.1[3.5,4.5] B1.0[4.5,7.5]
      B1.1[7.5,10.5]; r0 B0.0[7.5+m=9,12] B0.1[10.5+m=12,15]. Step 15.

    1f1b P=4 M=4 (warm-up min(M, P-r) = 4, 3, 2, 1 forwards; the issue's example; a warm-up
    of P-r+1 gives 40):
      r0 F0.0[0,1] F0.1[1,2] F0.2[2,3] F0.3[3,4]
      r1 F1.0[2.5,3.5] F1.1[3.5,4.5] F1.2[4.5,5.5]
      r2 F2.0[5,6] F2.1[6,7]
      r3 F3.0[7.5,8.5] B3.0[8.5,11.5] F3.1[11.5,12.5] B3.1[12.5,15.5]
      r2 B2.0[13,16] F2.2[16,17] B2.1[17,20]
      r1 B1.0[17.5,20.5] F1.3[20.5,21.5] B1.1[21.5,24.5]
      r3 F3.2[18.5,19.5] B3.2[19.5,22.5]
      r2 F2.3[21.5+m=23,24] B2.2[24,27]
      r3 F3.3[25.5,26.5] B3.3[26.5,29.5]
      r2 B2.3[31,34]; r1 B1.2[28.5,31.5] B1.3[35.5,38.5]
      r0 B0.0[22,25] B0.1[26,29] B0.2[33,36] B0.3[40,43]. Step 43.

    interleaved-zb P=2 M=2 (r0: F F I W I W; r1: F I F I W W):
      r0 F0.0[0,1] F0.1[1,2]; r1 F1.0[2.5,3.5] I1.0[3.5,4.5] F1.1[4.5,5.5] I1.1[5.5,6.5]
      W1.0[6.5,8.5] W1.1[8.5,10.5]; r0 I0.0[4.5+m=6,7] W0.0[7,9] I0.1[9,10] W0.1[10,12].
      Step 12 (with W = v_par = 0.5 it would be 9.5).

    interleaved-zb-2 P=2 M=2 (stages 0, 2 on r0; 1, 3 on r1):
      r0 F0.0[0,1] F0.1[1,2]; r1 F1.0[2.5,3.5] F1.1[3.5,4.5]
      r0 F2.0[5,6] F2.1[6,7]; r1 F3.0[7.5,8.5] I3.0[8.5,9.5] F3.1[9.5,10.5] I3.1[10.5,11.5]
      W3.0[11.5,13.5]
      r0 I2.0[11,12] W2.0[12,14] I2.1[13+wait=14,15] W2.1[15,17]
      r1 I1.0[13.5,14.5] W3.1[14.5,16.5] I1.1[16.5,17.5] W1.0[17.5,19.5] W1.1[19.5,21.5]
      r0 I0.0[16+wait=17,18] W0.0[18,20] I0.1[20,21] W0.1[21,23]. Step 23.

    zbv P=2 M=2 (V: stages 0, 3 on r0; 1, 2 on r1; 1 -> 2 and 2 -> 1 stay on r1):
      r0 F0.0[0,1] F0.1[1,2]; r1 F1.0[2.5,3.5] F2.0[3.5,4.5] F1.1[4.5,5.5] F2.1[5.5,6.5]
      r0 F3.0[6,7] I3.0[7,8] W3.0[8,10] F3.1[10,11] I3.1[11,12] W3.1[12,14]
      r1 I2.0[9.5,10.5] W2.0[10.5,12.5] I1.0[12.5,13.5] W1.0[13.5,15.5] I2.1[15.5,16.5]
      W2.1[16.5,18.5] I1.1[18.5,19.5] W1.1[19.5,21.5]
      r0 I0.0[15,16] W0.0[16,18] I0.1[21,22] W0.1[22,24]. Step 24.

    dualpipev P=2 M=4 (V as zbv; torch's overlapped (F;B) pairs run one after the other):
      r0 F0.0[0,1] F0.1[1,2] F0.2[2,3]
      r1 F1.0[2.5,3.5] F2.0[3.5,4.5] F1.1[4.5,5.5] F2.1[5.5,6.5] F1.2[6.5,7.5]
      r0 F3.0[6,7] I3.0[7,8] W3.0[8,10] F3.1[10,11] F0.3[11,12] B3.1[12,15]
      r1 B2.0[9.5,12.5] F2.2[12.5,13.5] B1.0[13.5,16.5] F1.3[16.5,17.5] B2.1[17.5,20.5]
      F2.3[20.5,21.5] B1.1[21.5,24.5]
      r0 F3.2[15,16] B0.0[18,21] B3.2[21,24] F3.3[24,25] B0.1[26,29] B3.3[29,32]
      r1 B2.2[25.5,28.5] B1.2[28.5,31.5] I2.3[33.5,34.5] I1.3[34.5,35.5] W2.3[35.5,37.5]
      W1.3[37.5,39.5]
      r0 I0.2[33,34] W0.2[34,36] I0.3[37,38] W0.3[38,40]. Step 40.
    """
    _skip_unmodelled(schedule)
    t = cm.exact(_hand_layers(stages), P, M, HAND_LINK, schedule)
    assert t.step_time == pytest.approx(max(rank_ends))
    assert [max(task.end for task in tasks) for tasks in t.ranks] == pytest.approx(rank_ends)


def test_anderson_mixing_is_priced_per_iteration():
    """Highway(k=3, anderson=2) on L = 4 uniform layers (scan 0.25 per state), link latency
    0.5. Windows after iterations 1, 2, 3: w = 1, 2, 2. Per iteration a rank pays w + 2
    state passes of inner products and w of combination, and with P ranks the all-reduce
    of w + 2 numbers: 2 ceil(log2 P) latencies.
    - P = 1: scan cost c = 4 x 0.25 = 1 per pass, no messages: (4 + 6 + 6) c = 16 more.
    - P = 2, FixedPoint (no scan messages to overlap with): c = 2 x 0.25 = 0.5 per rank,
      16 c = 8 of passes and 3 iterations x 2 latencies = 3: 11 more.
    - k >= L runs plain steps: no extra cost."""
    layers = cm.uniform_layers(4, forward=1, vjp_input=1, vjp_param=1, scan=0.25)
    link = cm.Link(latency=0.5)

    def extra(P, **kw):
        plain = cm.highway(layers, P, 1, link, **kw).step_time
        return cm.highway(layers, P, 1, link, anderson=2, **kw).step_time - plain

    assert extra(1, k=3) == pytest.approx(16.0)
    assert extra(2, k=3, fixed_point=True) == pytest.approx(11.0)
    assert extra(2, k=4) == 0.0
    config = cm.Config("highway", ranks=2, k=3, anderson=2)
    assert "anderson=2" in config.label
    assert cm.predict(config, layers, link).step_time == pytest.approx(
        cm.highway(layers, 2, 1, link, k=3, anderson=2).step_time)


@pytest.mark.parametrize("P", [1, 2, 4, 8])
@pytest.mark.parametrize("anderson", [0, 5])
def test_break_even_k_is_the_last_k_no_slower_than_the_best_exact_schedule(P, anderson):
    layers = cm.uniform_layers(16, forward=1, vjp_input=1, vjp_param=1, scan=0.02)
    link = cm.Link(latency=0.05)
    k = cm.break_even_k(layers, P, 4, link, anderson=anderson)
    best = min(cm.exact(layers, P, 4, link, s).step_time for s in cm.EXACT_SCHEDULES
               if _accepts(s, P, 4))

    def t(kk):
        return cm.highway(layers, P, 4, link, kk, anderson=anderson).step_time

    if k >= 0:
        assert t(k) <= best
    assert t(k + 1) > best


def _accepts(schedule, P, M):
    if cm.unmodelled(schedule) is not None:
        return False
    try:
        cm.exact(cm.uniform_layers(16), P, M, cm.Link(), schedule)
    except ValueError:
        return False
    return True


def test_break_even_k_grows_when_the_sweeps_run_in_parallel():
    """A cheap forward and expensive input VJPs: on one rank only k = 0 (no input sweep at
    all) beats exact backprop; over 8 ranks the sweeps run in parallel and several k pay."""
    layers = cm.uniform_layers(16, forward=0.1, vjp_input=1, vjp_param=0.1, scan=0.01)
    link = cm.Link(latency=0.01)
    assert cm.break_even_k(layers, 1, 1, link) == 0
    assert cm.break_even_k(layers, 8, 1, link) >= 4
