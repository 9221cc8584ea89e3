"""The method interface's hooks (setup, per-epoch sampling weights, stages, after-fit) through the real loop, and the
invariants of the methods that own their step: SAM, the Fisher penalty, EGR and LfF."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import TrainConfig, fit
from trainer.data import load_splits
from trainer.methods import METHODS, Batch, Card, HeldOut, Method, RunContext, TrainSplit
from trainer.methods.egr import EGR, EGRParams
from trainer.methods.fisher_penalty import FisherPenalty, FisherPenaltyParams, sampled_label_penalty
from trainer.methods.lff import LfF, LfFParams, gce
from trainer.methods.sam import SAM, SAMParams, perturbation

NO_AUTOCAST = contextlib.nullcontext


class TwoLayer(nn.Module):
    """A tiny classifier with the project's forward signature; BatchNorm optional."""

    def __init__(self, bn: bool = True, d: int = 5, hidden: int = 8, classes: int = 3):
        super().__init__()
        self.fc1, self.head = nn.Linear(d, hidden), nn.Linear(hidden, classes)
        self.bn = nn.BatchNorm1d(hidden) if bn else nn.Identity()

    def forward(self, x, return_features=False):
        h = torch.relu(self.bn(self.fc1(x)))
        logits = self.head(h)
        return (logits, h) if return_features else logits


def _data(n=16, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.double),
            torch.randint(0, classes, (n,), generator=g), torch.arange(n))


def _method(cls, params, n=16, classes=3):
    return cls(params, TrainSplit.view(cls, torch.arange(n) % classes, torch.arange(n) % 4, classes, 4))


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------- SAM


def test_sam_perturbation_has_norm_radius_and_asam_weighted_norm_radius():
    torch.manual_seed(0)
    net = TwoLayer().double()
    x, y, _ = _data()
    F.cross_entropy(net(x), y).backward()
    params = list(net.parameters())
    eps = perturbation(params, 0.05, adaptive=False)
    assert float(torch.sqrt(sum(e.pow(2).sum() for e in eps))) == pytest.approx(0.05, rel=1e-9)
    eps = perturbation(params, 0.5, adaptive=True)  # ASAM: ||T_w^-1 eps|| = radius with T_w = |w|
    nonzero = [p != 0 for p in params]  # a weight at 0 (BatchNorm's bias at init) is not perturbed
    assert all(torch.all(e[~nz] == 0) for e, nz in zip(eps, nonzero))
    weighted = sum((e[nz] / p[nz].abs()).pow(2).sum() for e, p, nz in zip(eps, params, nonzero))
    assert float(weighted.sqrt()) == pytest.approx(0.5, rel=1e-9)
    # and the direction is T_w^2 g: parallel to |w|^2 g, componentwise (where that is not 0)
    moved = [(p != 0) & (p.grad != 0) for p in params]
    ratio = torch.cat([(e[m] / (p[m].detach().pow(2) * p.grad[m])) for e, p, m in zip(eps, params, moved)])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


class Recording(torch.optim.SGD):
    """SGD that remembers the weights and gradients it was asked to step from."""

    def step(self, closure=None):
        self.seen = [(p.detach().clone(), p.grad.detach().clone()) for g in self.param_groups for p in g["params"]]
        return super().step(closure)


def _hand_sam_step(net, opt, x, y, radius):
    """The two-pass step written out: grad at w, eps = radius g / ||g||, grad at w + eps with BatchNorm's running
    statistics left as the first pass set them (momentum 0 in the second pass), back to w, base step."""
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    params = list(net.parameters())
    g = torch.cat([p.grad.flatten() for p in params])
    scale = radius / (g.norm() + 1e-12)
    eps = [p.grad * scale for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    opt.zero_grad()
    momentum, net.bn.momentum = net.bn.momentum, 0.0
    F.cross_entropy(net(x), y).backward()
    net.bn.momentum = momentum
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    opt.step()


def test_sam_step_is_the_base_optimiser_at_w_with_the_gradient_at_w_plus_eps():
    torch.manual_seed(0)
    net = TwoLayer().double()
    hand, once = copy.deepcopy(net), copy.deepcopy(net)
    sam = _method(SAM, SAMParams(radius=0.1))
    opt = Recording(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_hand = torch.optim.SGD(hand.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(3):  # several steps: momentum and weight decay act as the base optimiser's
        x, y, idx = _data(seed=step)
        w = [p.detach().clone() for p in net.parameters()]
        before = [b.clone() for b in net.buffers()]
        logs = sam.training_step(net, opt, Batch(x, y, idx), NO_AUTOCAST)
        # the base optimiser stepped from w (the perturbation was undone) ...
        assert all(torch.equal(seen, p) for (seen, _), p in zip(opt.seen, w))
        # ... with the gradient at w + eps: equal to the hand-written two-pass step
        _hand_sam_step(hand, opt_hand, x, y, 0.1)
        assert torch.allclose(_flat(net), _flat(hand), atol=1e-12)
        # BatchNorm's running statistics moved once: as after one train-mode forward at w
        for b, s in zip(once.buffers(), before):
            b.copy_(s)
        once.load_state_dict({**once.state_dict(), **{k: v for k, v in zip(dict(net.named_parameters()), w)}})
        once.train()
        with torch.no_grad():
            once(x)
        assert torch.allclose(net.bn.running_mean, once.bn.running_mean, atol=1e-12)
        assert torch.allclose(net.bn.running_var, once.bn.running_var, atol=1e-12)
        assert int(net.bn.num_batches_tracked) == step + 1
        assert float(logs["loss_perturbed"]) > float(logs["loss"])  # the ascent direction raises the loss


# ---------------------------------------------------------------- Fisher penalty and EGR


def test_fisher_penalty_is_the_squared_norm_of_the_mean_sampled_label_gradient():
    torch.manual_seed(0)
    net = TwoLayer(bn=False).double()
    x, _, _ = _data()
    params = list(net.parameters())
    penalty, yhat = sampled_label_penalty(net(x), params)
    per_sample = [torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), yhat[i:i + 1]), params)
                  for i in range(len(x))]  # a per-sample loop, then the mean gradient
    mean = [torch.stack(gs).mean(0) for gs in zip(*per_sample)]
    assert float(penalty) == pytest.approx(float(sum(m.pow(2).sum() for m in mean)), rel=1e-9)
    assert penalty.requires_grad  # a penalty to train on, not a logged number
    # the labels are drawn from the model: at confident logits they are the argmax
    sharp = torch.zeros(50, 3, dtype=torch.double)
    sharp[:, 1] = 50.0
    assert torch.equal(sampled_label_penalty(sharp.requires_grad_(), [sharp])[1], torch.ones(50, dtype=torch.long))


def test_fisher_penalty_every_k_steps():
    torch.manual_seed(0)
    net = TwoLayer(bn=False).double()
    m = _method(FisherPenalty, FisherPenaltyParams(alpha=1.0, every_k=3))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for step in range(7):
        x, y, idx = _data(seed=step)
        m.training_step(net, opt, Batch(x, y, idx), NO_AUTOCAST)
    assert int(m.penalised) == 3  # steps 0, 3, 6
    with pytest.raises(ValueError, match="every_k"):
        _method(FisherPenalty, FisherPenaltyParams(every_k=0))


def test_egr_step_descends_loss_plus_mu_grad_norm_squared_by_finite_differences():
    torch.manual_seed(0)
    net = TwoLayer(bn=False).double()
    x, y, idx = _data()
    mu = 0.3
    theta = _flat(net).clone()

    def objective(flat):  # L(theta) + mu ||grad L(theta)||^2, evaluated at a flat parameter vector
        probe = copy.deepcopy(net)
        torch.nn.utils.vector_to_parameters(flat, probe.parameters())
        loss = F.cross_entropy(probe(x), y)
        grads = torch.autograd.grad(loss, list(probe.parameters()))
        return float(loss + mu * sum(g.pow(2).sum() for g in grads))

    h = 1e-6
    fd = torch.tensor([(objective(theta + h * e) - objective(theta - h * e)) / (2 * h)
                       for e in torch.eye(len(theta), dtype=torch.double)], dtype=torch.double)
    m = _method(EGR, EGRParams(mu=mu))
    m.training_step(net, torch.optim.SGD(net.parameters(), lr=1.0), Batch(x, y, idx), NO_AUTOCAST)
    step = theta - _flat(net)  # plain SGD with lr 1: the step is the objective's gradient
    assert torch.allclose(step, fd, atol=1e-6, rtol=1e-5)
    probe = copy.deepcopy(net)
    torch.nn.utils.vector_to_parameters(theta, probe.parameters())
    grads = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
    plain = torch.cat([g.flatten() for g in grads])
    assert (step - plain).norm() > 0.01 * plain.norm()  # the penalty's Hessian-vector term is really there


# ---------------------------------------------------------------- LfF


def _lff(q=0.7, n=16):
    torch.manual_seed(0)
    m = _method(LfF, LfFParams(q=q), n=n)
    m.setup(RunContext(lambda: TwoLayer().double(), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                       torch.device("cpu"), NO_AUTOCAST))
    return m


def test_lff_weights_lie_in_zero_one_and_follow_relative_difficulty():
    m, net = _lff(), TwoLayer().double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y, idx = _data()
    y = m.train_labels.clone()
    for epoch in range(3):  # three epochs of two batches of 8
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(epoch))
        for batch in (perm[:8], perm[8:]):
            m.training_step(net, opt, Batch(x[batch], y[batch], batch), NO_AUTOCAST)
    w = m.relative_difficulty(idx)
    seen = m.seen > 0
    assert seen.all() and torch.all((w >= 0) & (w <= 1))
    # by hand for sample 0: EMAs normalised by their class's maximum
    c = y == y[0]
    b, d = m.ema_b[0] / m.ema_b[c].max(), m.ema_d[0] / m.ema_d[c].max()
    assert float(w[0]) == pytest.approx(float(b / (b + d + 1e-8)), rel=1e-9)
    # the EMA: first visit sets it, later visits blend with alpha
    fresh = _lff()
    ce = torch.tensor([2.0, 4.0], dtype=torch.double)
    for value in ce:
        fresh.ema_b[[0]] = 0.7 * fresh.ema_b[[0]] + (1 - 0.7 * fresh.seen[[0]]) * value.float()
        fresh.seen[0] = 1
    assert float(fresh.ema_b[0]) == pytest.approx(0.7 * 2.0 + 0.3 * 4.0)


def test_lff_biased_model_learns_only_through_gce():
    m, net = _lff(q=0.5), TwoLayer().double()
    biased0 = copy.deepcopy(m.biased)
    x, _, idx = _data()
    y = m.train_labels.clone()
    m.training_step(net, torch.optim.SGD(net.parameters(), lr=0.1), Batch(x, y, idx), NO_AUTOCAST)
    # the same step by hand: GCE alone on a copy of the biased model, the same optimiser settings
    opt = torch.optim.SGD(biased0.parameters(), lr=0.1, momentum=0.9)
    gce(biased0(x), y, 0.5).mean().backward()
    opt.step()
    assert torch.allclose(_flat(m.biased), _flat(biased0), atol=1e-12)


def test_gce_gradient_is_q_times_the_papers():
    logits = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    y, q = torch.tensor([0, 1, 2, 0, 1, 2]), 0.7
    (official,) = torch.autograd.grad(gce(logits, y, q).sum(), logits)
    p_y = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    (paper,) = torch.autograd.grad(((1 - p_y ** q) / q).sum(), logits)
    assert torch.allclose(official, q * paper)


def test_lff_biased_model_learns_the_shortcut_on_cmnist():
    splits = load_splits("cmnist")
    r = fit(TrainConfig(dataset="cmnist", method="lff", epochs=3), splits=splits, log=None)
    last = r.history[-1]
    assert last["biased_acc_aligned"] > 0.9 > 0.5 > last["biased_acc_conflicting"], last
    assert last["weight_enrichment"] > 1  # the debiased model's weight goes to the bias-conflicting samples
    assert r.group_labels == "none"


# ---------------------------------------------------------------- the interface through the real loop


class Probe(Method):
    """A plain-CE method that exercises every hook and records what the loop did."""
    card = Card("probe", "test", "none")
    group_labels = "val"  # after_fit reads the val split's groups

    def __init__(self, params, train, **kw):
        super().__init__(params, train, **kw)
        self.seen_idx, self.opt_ids, self.stage_start, self.epoch = {}, {}, None, 0

    def setup(self, ctx):
        self.ctx_model, self.ctx_opt = ctx.new_model(), ctx.new_optimizer(ctx.new_model().parameters())

    def sampling_weights(self):  # epoch 2 (0-based 1) on: only the first 10 samples
        w = torch.ones(self.n_train)
        if self.epoch >= 1:
            w[10:] = 0
        return w

    def start_epoch(self, epoch, model, train_batches):
        self.epoch = epoch
        self.end_of_stage_1 = _flat(model).clone() if epoch == 2 else getattr(self, "end_of_stage_1", None)

    def new_stage(self, epoch):
        return epoch == 2

    def training_step(self, model, optimizer, batch, autocast):
        if self.epoch == 2 and self.stage_start is None:
            self.stage_start = (_flat(model).clone(), len(optimizer.state))
        self.seen_idx.setdefault(self.epoch, set()).update(batch.idx.tolist())
        self.opt_ids.setdefault(self.epoch, id(optimizer))
        assert batch.g is None  # group_labels "val": no training group ids
        return super().training_step(model, optimizer, batch, autocast)

    def loss(self, logits, h, batch):
        nll = F.cross_entropy(logits, batch.y)
        return nll, {"nll": nll}

    def after_fit(self, model, val_batches):
        with torch.no_grad():  # predict class 0 everywhere: a visible change to the model
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor([1.0, 0.0]))
        correct, groups, labels = [], [], []
        for logits, _, y, g in val_batches():
            correct.append(logits.argmax(1) == y)
            groups.append(g)
            labels.append(y)
        return HeldOut(torch.cat(correct), torch.cat(groups), torch.cat(labels))


def test_hooks_setup_weights_stages_and_after_fit_through_the_loop(monkeypatch):
    seen = {}

    class Kept(Probe):
        def __init__(self, params, train, **kw):
            super().__init__(params, train, **kw)
            seen["probe"] = self

    monkeypatch.setitem(METHODS, "probe", Kept)
    r = fit(TrainConfig(dataset="synthetic", method="probe", epochs=4, patience=0, lr=0.05), log=None)
    p = seen["probe"]
    # setup: the run's architecture and optimiser settings
    assert type(p.ctx_model).__name__ == "Classifier" and p.ctx_opt.param_groups[0]["lr"] == 0.05
    # sampling weights are re-read every epoch: from the second epoch on only the weighted samples are drawn
    assert len(p.seen_idx[0]) > 10 and set().union(*(p.seen_idx[e] for e in (1, 2, 3))) <= set(range(10))
    # a new stage: a fresh model (not where stage 1 ended) and a fresh optimiser (no momentum state)
    start, n_state = p.stage_start
    assert not torch.allclose(start, p.end_of_stage_1) and n_state == 0
    assert p.opt_ids[2] != p.opt_ids[1] and p.opt_ids[1] == p.opt_ids[0]
    # after_fit changed the model before the test pass, and its val metrics replace the selected epoch's
    n_class0 = sum(g["count"] for g in r.test["groups"][:2])
    assert r.test["avg_plain"] == pytest.approx(n_class0 / sum(g["count"] for g in r.test["groups"]))
    assert r.val["groups"][2]["acc"] == 0.0 and r.val["groups"][0]["acc"] == 1.0


def test_every_registered_method_says_which_group_labels_it_trains_on():
    for name, cls in METHODS.items():
        assert cls.group_labels in ("none", "val", "train"), name
    assert {n for n, c in METHODS.items() if c.group_labels == "train"} == {"groupdro", "resample", "reweight",
                                                                           "subsample", "latent_aug"}
    assert {n for n, c in METHODS.items() if c.group_labels == "val"} == {"dfr"}
