"""The step-time model (highwaybp.distributed.costmodel) on cases computed by hand."""

from __future__ import annotations

import math

import pytest

from highwaybp.distributed import costmodel as cm

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
