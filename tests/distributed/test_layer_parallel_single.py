"""HighwayPipeline in one process (P = 1, no process group): what a hostile user tries.

Dropout, parameter hooks, tied weights, module hooks, refused configurations. The
multi-process runs are in test_layer_parallel.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import highwaybp as hbp
from highwaybp.distributed import HighwayPipeline, balanced_boundaries


def mse(h, t):
    return ((h - t) ** 2).sum()


def chain_of(blocks, residual=None, method=None):
    return hbp.ResidualChain([hbp.ResidualLayer(b, residual) for b in blocks],
                             method=method).double()


def mlp(width=5, dropout=0.0):
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(width, width))


def xy(seed=0, batch=6, width=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, width, generator=g, dtype=torch.float64),
            torch.randn(batch, width, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("recompute", [False, True])
def test_dropout_masks_equal_the_single_process_chain(recompute):
    x, y = xy()
    torch.manual_seed(0)
    chain = chain_of([mlp(dropout=0.3) for _ in range(4)])
    ref = chain_of([mlp(dropout=0.3) for _ in range(4)], method=hbp.Highway(k=1))
    ref.load_state_dict(chain.state_dict())
    pipe = HighwayPipeline(chain, 1, 0, hbp.Highway(k=1), mse, recompute=recompute)
    torch.manual_seed(5)
    pipe.step(x, target=y)
    torch.manual_seed(5)
    mse(ref(x), y).backward()
    for p, q in zip(chain.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


def test_parameter_hooks_run_once_per_step_on_the_total_gradient():
    x, y = xy()
    torch.manual_seed(0)
    chain = chain_of([mlp() for _ in range(3)])
    ref = chain_of([mlp() for _ in range(3)], method=hbp.Highway(k=2))
    ref.load_state_dict(chain.state_dict())
    seen, seen_post = [], []
    weight = chain.layers[1].block[0].weight
    weight.register_hook(lambda g: seen.append(g.clone()))
    weight.register_post_accumulate_grad_hook(lambda p: seen_post.append(p.grad.clone()))
    pipe = HighwayPipeline(chain, 1, 0, hbp.Highway(k=2), mse, num_microbatches=3,
                           scale_grads=False)
    pipe.step(x, target=y)
    for xm, ym in zip(x.chunk(3), y.chunk(3)):
        mse(ref(xm), ym).backward()
    assert len(seen) == 1 and len(seen_post) == 1
    torch.testing.assert_close(seen[0], ref.layers[1].block[0].weight.grad, rtol=0,
                               atol=1e-12)


def test_weights_tied_inside_a_stage_get_the_summed_gradient():
    x, y = xy()
    torch.manual_seed(0)
    shared = mlp()
    chain = chain_of([shared, mlp(), shared])
    ref = chain_of([shared, mlp(), shared], method=hbp.Exact())
    ref.load_state_dict(chain.state_dict())
    HighwayPipeline(chain, 1, 0, hbp.Highway(k=3), mse).step(x, target=y)
    grads = [p.grad.clone() for p in chain.parameters()]
    for p in ref.parameters():
        p.grad = None
    mse(ref(x), y).backward()  # k = L = 3: exact
    for g, p in zip(grads, ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-12)


def test_weights_tied_across_stages_are_refused_naming_the_stages():
    shared = mlp()
    chain = chain_of([shared, mlp(), shared, mlp()])
    with pytest.raises(ValueError, match="shared by layers of stages 0 and 1"):
        HighwayPipeline(chain, 2, 0, hbp.Highway(k=1), mse)
    # In one stage they are fine: the arguments pass, the missing process group is next.
    with pytest.raises(RuntimeError, match=r"torch\.distributed initialized"):
        HighwayPipeline(chain, 2, 0, hbp.Highway(k=1), mse, boundaries=[0, 3, 4])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # x needs no grad here
def test_module_backward_hooks_are_refused_under_highway_but_run_under_exact():
    x, y = xy()
    chain = chain_of([mlp() for _ in range(2)])
    calls = []
    chain.layers[0].block[0].register_full_backward_hook(lambda *a: calls.append(1))
    with pytest.raises(RuntimeError, match="module backward hook"):
        HighwayPipeline(chain, 1, 0, hbp.Highway(k=1), mse).step(x, target=y)
    HighwayPipeline(chain, 1, 0, hbp.Exact(), mse).step(x, target=y)
    assert calls == [1]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"method": hbp.Exact(), "recompute": True}, NotImplementedError, "recompute=False"),
    ({"boundaries": [0, 2]}, ValueError, "boundaries must be 2 strictly increasing"),
    ({"loss_fn": None}, ValueError, "needs loss_fn"),
    ({"state_losses": {0: mse}}, ValueError, "state indices 1..3"),
    ({"scan": "tree"}, ValueError, "scan must be one of"),
    ({"num_microbatches": 0}, ValueError, "num_microbatches"),
])
def test_bad_arguments_are_refused_with_what_to_do(kwargs, error, match):
    chain = chain_of([mlp() for _ in range(3)])
    args = {"method": hbp.Highway(k=1), "loss_fn": mse, **kwargs}
    method, loss_fn = args.pop("method"), args.pop("loss_fn")
    with pytest.raises(error, match=match):
        HighwayPipeline(chain, 1, 0, method, loss_fn, **args)


def test_a_general_linear_k_needs_the_sequential_scan():
    layer = hbp.ResidualLayer(mlp(), hbp.LinearShortcut(lambda v: 2 * v, lambda v: 2 * v))
    chain = hbp.ResidualChain([layer, hbp.ResidualLayer(mlp())]).double()
    with pytest.raises(ValueError, match="scan='sequential'"):
        HighwayPipeline(chain, 1, 0, hbp.Highway(k=1), mse, scan="distributed")
    assert HighwayPipeline(chain, 1, 0, hbp.Highway(k=1), mse).scan == "sequential"


def test_a_batch_that_does_not_split_into_micro_batches_is_refused():
    chain = chain_of([mlp() for _ in range(2)])
    pipe = HighwayPipeline(chain, 1, 0, hbp.Highway(k=1), mse, num_microbatches=4)
    x, y = xy()
    with pytest.raises(ValueError, match="num_microbatches=4 equal micro-batches"):
        pipe.step(x, target=y)


def test_balanced_boundaries():
    assert balanced_boundaries(10, 3) == [0, 4, 7, 10]
    assert balanced_boundaries(4, 4) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"num_stages must be in 1\.\.3"):
        balanced_boundaries(3, 4)
    # By cost: the split minimizing the largest stage (checked against all splits).
    costs = [5.0, 1.0, 1.0, 1.0, 4.0, 2.0, 2.0]
    assert balanced_boundaries(7, 3, costs) == [0, 2, 5, 7]  # stages cost 6, 6, 4
    assert balanced_boundaries(7, 1, costs) == [0, 7]
    assert balanced_boundaries(7, 7, costs) == list(range(8))
    import itertools
    for stages in (2, 3, 4):
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, 7)))
                   for cuts in itertools.combinations(range(1, 7), stages - 1))
        got = balanced_boundaries(7, stages, costs)
        assert max(sum(costs[a:b]) for a, b in zip(got, got[1:])) == best
    with pytest.raises(ValueError, match="costs must be 7 finite"):
        balanced_boundaries(7, 2, [1.0] * 6)


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_exact_equals_autograd_with_or_without_an_input_gradient(x_requires_grad):
    x, y = xy()
    x.requires_grad_(x_requires_grad)
    torch.manual_seed(0)
    chain = chain_of([mlp() for _ in range(3)])
    ref = chain_of([mlp() for _ in range(3)], method=hbp.Exact())
    ref.load_state_dict(chain.state_dict())
    HighwayPipeline(chain, 1, 0, hbp.Exact(), mse, num_microbatches=2,
                    scale_grads=False).step(x, target=y)
    x_grad = None if x.grad is None else x.grad.clone()
    x.grad = None
    mse(ref(x), y).backward()
    for p, q in zip(chain.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    if x_requires_grad:
        torch.testing.assert_close(x_grad, x.grad, rtol=0, atol=1e-12)
    else:
        assert x_grad is None


def _event(step, phase, start, end, peer=None, kind=None, cpu=0.0, nbytes=0):
    return {"step": step, "phase": phase, "iteration": None, "start": start, "end": end,
            "cpu": cpu, "bytes": nbytes, "peer": peer, "kind": kind}


def test_critical_path_follows_late_messages_across_ranks(tmp_path):
    from highwaybp.distributed import critical_path, merge_traces, phase_breakdown

    rank0 = {"rank": 0, "world": 2, "events": [
        _event(0, "step", 0.0, 4.0),
        _event(0, "forward", 0.0, 1.0, cpu=0.9),
        _event(0, "comm", 1.0, 1.01, peer=1, kind="send", nbytes=64),
        _event(0, "comm", 1.01, 3.0, peer=1, kind="recv"),   # waits for rank 1
        _event(0, "param", 3.0, 4.0),
    ]}
    rank1 = {"rank": 1, "world": 2, "events": [
        _event(0, "step", 0.0, 2.5),
        _event(0, "comm", 0.0, 1.05, peer=0, kind="recv"),   # waits for rank 0
        _event(0, "forward", 1.05, 2.0),
        _event(0, "comm", 2.0, 2.01, peer=0, kind="send", nbytes=32),
        _event(0, "param", 2.01, 2.5),
    ]}
    path = tmp_path / "rank1.json"
    path.write_text(__import__("json").dumps(rank1))
    merged = merge_traces([rank0, path])
    result = critical_path(merged, 0)
    assert result["total"] == pytest.approx(4.0)
    assert result["phases"] == pytest.approx({"forward": 1.95, "comm": 1.05, "param": 1.0})
    assert [(r, phase) for r, phase, *_ in result["path"]] == [
        (0, "forward"), (1, "comm"), (1, "forward"), (0, "comm"), (0, "param")]
    breakdown = phase_breakdown(merged, 0)
    assert breakdown[0]["comm"]["bytes"] == 64 and breakdown[1]["comm"]["bytes"] == 32
    assert breakdown[0]["forward"]["cpu"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="step 1 is not in the trace"):
        critical_path(merged, 1)


def test_a_recv_whose_message_had_arrived_keeps_the_path_on_its_rank():
    from highwaybp.distributed import critical_path

    trace = {"world": 2, "ranks": [
        {"rank": 0, "world": 2, "events": [
            _event(0, "step", 0.0, 3.0),
            _event(0, "sweep", 0.0, 2.0),
            _event(0, "comm", 2.0, 2.1, peer=1, kind="recv"),  # sent at 1.0: no wait
            _event(0, "param", 2.1, 3.0)]},
        {"rank": 1, "world": 2, "events": [
            _event(0, "step", 0.0, 1.5),
            _event(0, "sweep", 0.0, 1.0),
            _event(0, "comm", 1.0, 1.01, peer=0, kind="send")]},
    ]}
    result = critical_path(trace, 0)
    assert {r for r, *_ in result["path"]} == {0}
    assert result["phases"] == pytest.approx({"sweep": 2.0, "comm": 0.1, "param": 0.9})


@pytest.mark.parametrize("method", [hbp.Highway(k=1), hbp.Exact()])
def test_a_parameter_frozen_after_construction_gets_no_gradient(method):
    x, y = xy()
    torch.manual_seed(0)
    chain = chain_of([mlp() for _ in range(2)])
    ref = chain_of([mlp() for _ in range(2)], method=method)
    ref.load_state_dict(chain.state_dict())
    pipe = HighwayPipeline(chain, 1, 0, method, mse)
    for c in (chain, ref):
        c.layers[0].block[0].weight.requires_grad_(False)
    pipe.step(x, target=y)
    mse(ref(x), y).backward()
    assert chain.layers[0].block[0].weight.grad is None
    assert len(pipe.parameters()) == len(list(chain.parameters())) - 1
    for p, q in zip(chain.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


def test_an_integer_input_is_refused():
    pipe = HighwayPipeline(chain_of([mlp()]), 1, 0, hbp.Highway(k=1), mse)
    with pytest.raises(TypeError, match="floating point"):
        pipe.step(torch.ones(6, 5, dtype=torch.long), target=torch.zeros(6, 5))


@pytest.mark.parametrize("method", [hbp.Highway(k=2), hbp.Exact()])
def test_micro_batch_gradients_are_the_full_batch_mean_by_default(method):
    """scale_grads=True (the default, as torch.distributed.pipelining): with M micro-batches
    and a mean-reduced loss, the gradients and the returned loss are the full batch's."""
    x, y = xy()
    torch.manual_seed(0)
    chain = chain_of([mlp() for _ in range(3)])
    ref = chain_of([mlp() for _ in range(3)], method=method)
    ref.load_state_dict(chain.state_dict())
    def mean_mse(h, t):
        return ((h - t) ** 2).mean()

    loss = HighwayPipeline(chain, 1, 0, method, mean_mse, num_microbatches=3).step(x, target=y)
    ref_loss = mean_mse(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=1e-12)
    for p, q in zip(chain.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", [hbp.Exact(), hbp.Highway(k=2)])
def test_a_tensor_the_stage_does_not_own_is_refused_under_every_method(method):
    """A module captured in a LinearShortcut's closure: the stage cannot update it. Under
    Exact() the pipeline left its .grad empty without a word (6b9be67 + lpruntime); now
    both methods refuse it with what to do."""
    torch.manual_seed(0)
    outside = nn.Linear(5, 5, bias=False).double()
    shortcut = hbp.LinearShortcut(lambda u: outside(u), lambda v: v @ outside.weight)
    chain = chain_of([mlp() for _ in range(2)], residual=shortcut)
    x, y = xy()
    with pytest.raises(RuntimeError, match="not a parameter of the chain's layers"):
        HighwayPipeline(chain, 1, 0, method, mse).step(x, target=y)
    assert outside.weight.grad is None


def test_tensors_inside_a_structured_target_are_split_into_micro_batches():
    """target=(y, {"w": weights}) with M = 2: each micro-batch's loss gets its own rows
    (6b9be67 + lpruntime passed the whole tuple to every micro-batch)."""
    x, y = xy()
    weights = torch.rand(6, dtype=torch.float64)
    torch.manual_seed(0)
    chain = chain_of([mlp() for _ in range(2)])
    ref = chain_of([mlp() for _ in range(2)], method=hbp.Highway(k=1))
    ref.load_state_dict(chain.state_dict())

    def weighted(h, target):
        rows, extra = target
        return (extra["w"][:, None] * (h - rows) ** 2).sum()

    HighwayPipeline(chain, 1, 0, hbp.Highway(k=1), weighted, num_microbatches=2,
                    scale_grads=False).step(x, target=(y, {"w": weights}))
    weighted(ref(x), (y, {"w": weights})).backward()
    for p, q in zip(chain.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
