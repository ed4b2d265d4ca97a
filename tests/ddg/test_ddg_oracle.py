"""DDG single-process oracle: K = 1 is backprop, the stash update rule, recompute."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from highwaybp.ddg import DDGTrainer, balanced_boundaries, split_model


def make_net(dtype=torch.float64, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [
        nn.Conv1d(1, 4, 3, padding=1),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 12, 16),
        nn.Dropout(dropout),
        nn.Tanh(),
        nn.Linear(16, 5),
    ]
    return nn.Sequential(*layers).to(dtype)


def batches(n: int, dtype=torch.float64, batch: int = 6):
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(batch, 1, 12, generator=gen, dtype=dtype),
            torch.randint(0, 5, (batch,), generator=gen),
        )
        for _ in range(n)
    ]


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that also records the gradient it applies at each call."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.applied: list[list[torch.Tensor | None]] = []

    def step(self, closure=None):
        self.applied.append(
            [
                None if p.grad is None else p.grad.detach().clone()
                for g in self.param_groups
                for p in g["params"]
            ]
        )
        return super().step(closure)


def test_split_model_shares_parameters_and_validates():
    net = make_net()
    parts = split_model(net, 3)
    assert len(parts) == 3
    ids = [id(p) for part in parts for p in part.parameters()]
    assert ids == [id(p) for p in net.parameters()]
    assert sum(len(p) for p in parts) == len(net)
    assert balanced_boundaries([1, 1, 1, 1], 2) == [0, 2, 4]
    assert balanced_boundaries([10, 1, 1, 1], 2) == [0, 1, 4]
    with pytest.raises(ValueError, match="cannot split"):
        split_model(net, len(net) + 1)
    with pytest.raises(ValueError, match="boundaries"):
        split_model(net, 2, boundaries=[0, 5, 4])
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        split_model(nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="semantics"):
        DDGTrainer(net, 2, lambda p: torch.optim.SGD(p, lr=0.1), semantics="nope")


@pytest.mark.parametrize("semantics", ["stash", "recompute"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_k1_is_backprop_bit_for_bit(semantics, opt):
    data = batches(6, dtype=torch.float32)
    make_opt = (
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        if opt == "sgd"
        else (lambda p: torch.optim.Adam(p, lr=1e-2))
    )
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
    ref = make_net(torch.float32, dropout=0.2)
    ddg_net = copy.deepcopy(ref)

    torch.manual_seed(5)
    ref_opt = make_opt(ref.parameters())
    ref_sched = sched(ref_opt)
    ref_losses = []
    for x, y in data:
        ref_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        ref_opt.step()
        ref_sched.step()
        ref_losses.append(loss.item())

    torch.manual_seed(5)
    trainer = DDGTrainer(ddg_net, 1, make_opt, semantics=semantics, scheduler_factory=sched)
    losses = trainer.train(data)
    assert losses == ref_losses
    for a, b in zip(ref.state_dict().values(), ddg_net.state_dict().values()):
        assert torch.equal(a, b)


def _full_grads(net: nn.Sequential, params_at: dict, x, y) -> dict[str, torch.Tensor]:
    """Plain-autograd gradient of the batch loss at the given full parameter vector."""
    model = copy.deepcopy(net)
    model.load_state_dict(params_at)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("splits", [2, 3, 4])
def test_stash_applies_the_paper_update_rule(splits):
    """Gradient applied to module k at step t == grad of batch t-K+k at the weights w^{t-K+k}."""
    net = make_net()
    data = batches(7)
    trainer = DDGTrainer(net, splits, lambda p: RecordingSGD(p, lr=0.2), semantics="stash")
    names = [[f"{id(p)}" for p in m.parameters()] for m in trainer.modules]
    index_of = {id(p): n for n, p in net.named_parameters()}
    snapshots = []  # w^t (whole model, incl. BN buffers) before step t
    for x, y in data:
        snapshots.append(copy.deepcopy(net.state_dict()))
        trainer.step(x, y)
    checked = 0
    for s, stage in enumerate(trainer.stages):
        d = splits - 1 - s
        assert len(stage.optimizer.applied) == len(data) - d
        param_names = [index_of[int(i)] for i in names[s]]
        for u, applied in enumerate(stage.optimizer.applied):
            t = u + d  # the u-th update of module s happens at step t
            tau = t - d
            expected = _full_grads(net, snapshots[tau], *data[tau])
            for n, g in zip(param_names, applied):
                torch.testing.assert_close(g, expected[n], rtol=1e-10, atol=1e-12)
                checked += 1
    assert checked > 0


def test_recompute_uses_current_weights_with_stale_error():
    """K = 2, module 1: grad = J_{w1}(x_tau; w1^t)^T e_tau, e_tau computed at w^tau."""
    net = make_net()
    data = batches(5)
    trainer = DDGTrainer(net, 2, lambda p: RecordingSGD(p, lr=0.3), semantics="recompute")
    first, second = trainer.modules
    snaps = []
    for x, y in data:
        snaps.append((copy.deepcopy(first.state_dict()), copy.deepcopy(second.state_dict())))
        trainer.step(x, y)
    for u, applied in enumerate(trainer.stages[0].optimizer.applied):
        t, tau = u + 1, u
        m1, m2 = copy.deepcopy(first), copy.deepcopy(second)
        # error at the input of module 2 for batch tau, at the weights of step tau
        m1.load_state_dict(snaps[tau][0])
        m2.load_state_dict(snaps[tau][1])
        h = m1(data[tau][0]).detach().requires_grad_(True)
        F.cross_entropy(m2(h), data[tau][1]).backward()
        err = h.grad
        # recompute at the *current* weights of module 1 (step t)
        m1.load_state_dict(snaps[t][0])
        m1.zero_grad(set_to_none=True)
        m1(data[tau][0]).backward(err)
        for p, g in zip(m1.parameters(), applied):
            torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
    # and it is not the stash rule once module 1 has moved
    stash_net = make_net()
    stash = DDGTrainer(stash_net, 2, lambda p: RecordingSGD(p, lr=0.3), semantics="stash")
    stash.train(data)
    a = torch.cat([g.flatten() for g in trainer.stages[0].optimizer.applied[-1]])
    b = torch.cat([g.flatten() for g in stash.stages[0].optimizer.applied[-1]])
    assert not torch.allclose(a, b)


def test_semantics_agree_while_weights_do_not_move():
    """With lr = 0 stash and recompute apply the same (delayed) gradients, incl. dropout."""
    data = batches(4)
    applied = {}
    for sem in ["stash", "recompute"]:
        net = make_net(dropout=0.3)
        tr = DDGTrainer(net, 3, lambda p: RecordingSGD(p, lr=0.0), semantics=sem, rng_seed=3)
        tr.train(data)
        applied[sem] = [st.optimizer.applied for st in tr.stages]
    for a, b in zip(applied["stash"], applied["recompute"]):
        for ga, gb in zip(a, b):
            for x, y in zip(ga, gb):
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("semantics", ["stash", "recompute"])
def test_resume_mid_run_matches_uninterrupted(semantics):
    data = batches(8, dtype=torch.float32)
    make_opt = lambda p: torch.optim.Adam(p, lr=1e-2)
    sched = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8)

    ref_net = make_net(torch.float32, dropout=0.2)
    ref = DDGTrainer(ref_net, 3, make_opt, semantics=semantics, scheduler_factory=sched, rng_seed=0)
    ref.train(data)

    net = make_net(torch.float32, dropout=0.2)
    tr = DDGTrainer(net, 3, make_opt, semantics=semantics, scheduler_factory=sched, rng_seed=0)
    tr.train(data[:5])
    state = copy.deepcopy(tr.state_dict())
    net2 = make_net(torch.float32, dropout=0.2)
    tr2 = DDGTrainer(net2, 3, make_opt, semantics=semantics, scheduler_factory=sched, rng_seed=0)
    tr2.load_state_dict(state)
    tr2.train(data[5:])
    for a, b in zip(ref_net.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bn_running_stats_count_each_batch_once():
    data = batches(5)
    nets = {}
    for sem in ["stash", "recompute"]:
        net = make_net()
        DDGTrainer(net, 3, lambda p: torch.optim.SGD(p, lr=0.0), semantics=sem).train(data)
        nets[sem] = net
    plain = make_net()
    for x, _ in data:
        plain(x)
    for sem, net in nets.items():
        assert int(net[1].num_batches_tracked) == len(data), sem
        torch.testing.assert_close(net[1].running_mean, plain[1].running_mean)
        torch.testing.assert_close(net[1].running_var, plain[1].running_var)
