import dataclasses
import math

import pytest
import torch
from torch import nn

from trainer import NonFiniteLossError, TrainConfig, fit
from trainer.data import TensorGroupDataset, load_splits
from trainer.fisher import last_layer_trace, logit_trace
from trainer.methods import METHODS, Batch, TrainSplit
from trainer.methods.fim import FIMParams, FisherConstrained
from trainer.methods.groupdro import GroupDRO, GroupDROParams
from trainer.metrics import bias_conflicting, by_group, get_selection, group_metrics

SHORT = {"jtt": {"stage1_epochs": 1},  # leave a stage-2 epoch in these short runs
         "latent_aug": {"gen_epochs": 3, "n_pairs": 200}}  # a short generator stage: test_latent_aug.py checks it
CASES = [(name, SHORT.get(name, {})) for name in METHODS] + [("fim", {"scope": "last_layer"}),
                                                          ("fim", {"scope": "full"}),
                                                          ("fim_relative", {"scope": "full"})]


@pytest.fixture(scope="module")
def cmnist():
    return load_splits("cmnist")


def _check_result(r, method, epochs):
    assert r.method == method and 1 <= r.best_epoch <= r.epochs_run <= epochs
    for split in ("val", "test"):
        m = getattr(r, split)
        assert 0 <= m["wga"] <= m["avg_plain"] + 1e-9 <= 1 + 1e-9
        assert m["wga"] == min(g["acc"] for g in m["groups"])
        n = 128 if r.dataset == "synthetic" else 1000
        held_out = split == "val" and METHODS[method].card.val_note  # DFR: the val half its head never saw
        assert sum(g["count"] for g in m["groups"]) == (n // 2 if held_out else n)
    assert r.objective == r.val[get_selection(r.selection).key]  # what a study maximises
    assert len(r.history) == r.epochs_run and all(math.isfinite(h["train_loss"]) for h in r.history)
    assert set(r.hparams["method_params"]) == {f.name for f in METHODS[method].param_fields()}


@pytest.mark.parametrize("method, params", CASES)
def test_every_method_on_synthetic(method, params):
    r = fit(TrainConfig(dataset="synthetic", method=method, epochs=3, method_params=params), log=None)
    _check_result(r, method, 3)
    if method == "fim":
        last = r.history[-1]
        assert last["constrained"] and 0 <= last["violated_frac"] <= 1
        assert abs(sum(last["lambda_share"]) - 1) < 1e-3 or last["lambda_max"] == 0  # shares of no mass: zeros
        assert last["lambda_max"] <= 10


def _scrambled(splits):
    """The same splits with the training split's group labels (its attribute) permuted: val and test untouched."""
    t = splits.train
    perm = torch.randperm(len(t.a), generator=torch.Generator().manual_seed(7))
    assert not torch.equal(t.a[perm], t.a)
    return dataclasses.replace(splits, train=TensorGroupDataset(t.x, t.y, t.a[perm], t.n_classes, t.n_attr))


def _learned(r):
    """Everything a run learned and was selected by: every epoch's training logs and val metrics but the
    train-weighted average (it weights by the training groups by definition), the selected epoch, every per-group
    val and test accuracy."""
    def metrics(m):
        return {k: v for k, v in m.items() if k != "avg_train_weighted"}
    history = [{k: v for k, v in h.items() if k.startswith("train_") or k in (
        "epoch", "own", "val_wga", "val_worst_class", "val_avg_plain", "val_selection")} for h in r.history]
    return {"best_epoch": r.best_epoch, "history": history, "val": metrics(r.val), "test": metrics(r.test)}


@pytest.mark.parametrize("method, params", CASES)
def test_every_method_on_cmnist(method, params, cmnist):
    """Every method trains; one that declares it trains on no training group label learns nothing from them:
    scrambling the training split's groups changes nothing it learns, bit for bit (its own epochs included: JTT's
    second stage, Ours' constrained epoch)."""
    cfg = TrainConfig(dataset="cmnist", method=method, epochs=2, method_params=params, threads=1, device="cpu")
    r = fit(cfg, splits=cmnist, log=None)
    _check_result(r, method, 2)
    if METHODS[method].group_labels != "train" and params == SHORT.get(method, {}):  # each registered method once
        assert _learned(fit(cfg, splits=_scrambled(cmnist), log=None)) == _learned(r)
    elif method == "groupdro":  # the control: the same scramble changes what a method that reads them learns
        assert fit(cfg, splits=_scrambled(cmnist), log=None).history[0]["train_loss"] != r.history[0]["train_loss"]
    assert r.group_labels == METHODS[method].group_labels
    assert r.uses_group_labels == (METHODS[method].group_labels == "train")
    if method == "fim":  # after one warm-up epoch the constraints bind and lambda mass appears
        last = r.history[-1]
        assert last["lambda_mean"] > 0 and abs(sum(last["lambda_share"]) - 1) < 1e-3


def test_same_seed_same_result():
    cfg = TrainConfig(dataset="synthetic", method="fim", epochs=2, seed=3)
    a, b = fit(cfg, log=None), fit(cfg, log=None)
    assert a.test == b.test and a.history[-1]["train_loss"] == b.history[-1]["train_loss"]


def test_callback_sees_every_epoch_and_can_stop():
    seen = []

    class Stop(Exception):
        pass

    def cb(epoch, record):
        seen.append((epoch, record["val_wga"]))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(TrainConfig(dataset="synthetic", epochs=5), callback=cb, log=None)
    assert [e for e, _ in seen] == [1, 2]


def test_non_finite_loss_fails_the_run():
    with pytest.raises(NonFiniteLossError, match="non-finite in epoch 1"):
        fit(TrainConfig(dataset="synthetic", lr=1e12, epochs=2), log=None)


def test_last_layer_trace_matches_autograd():
    torch.manual_seed(0)
    head = nn.Linear(7, 4).double()
    h, y = torch.randn(5, 7, dtype=torch.double) * 3, torch.tensor([0, 3, 1, 1, 2])
    logits = head(h)
    closed = last_layer_trace(logits, h, y).detach()
    for i in range(5):
        loss = nn.functional.cross_entropy(head(h[i:i + 1]), y[i:i + 1])
        gw, gb = torch.autograd.grad(loss, (head.weight, head.bias))
        assert abs(float(gw.pow(2).sum() + gb.pow(2).sum()) - float(closed[i])) < 1e-5
        z = logits[i:i + 1].detach().requires_grad_()
        (gz,) = torch.autograd.grad(nn.functional.cross_entropy(z, y[i:i + 1]), z)
        assert abs(float(gz.pow(2).sum()) - float(logit_trace(logits.detach(), y)[i])) < 1e-5


def test_groupdro_weights_stay_on_simplex_and_move_to_worst_group():
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    m = GroupDRO(GroupDROParams(eta_q=0.5), TrainSplit(groups // 2, 2, 4, groups))
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    logits = torch.zeros(8, 2)
    logits[:, 0] = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, -3.0, -3.0])  # group 2 is wrong, group 3 right
    for _ in range(20):
        m.loss(logits, None, Batch(logits, y, torch.arange(8), groups))
        assert torch.all(m.q >= 0) and abs(float(m.q.sum()) - 1) < 1e-6
    assert int(m.q.argmax()) == 2 and float(m.q[2]) > 0.9
    w = m.sampling_weights()
    assert torch.allclose(w, torch.full((8,), 0.5))


def _fim(**kw):
    n = kw.pop("n", 4)
    return FisherConstrained(FIMParams(**kw), TrainSplit(torch.zeros(n, dtype=torch.long), 2, 4))


def _constrain(m, logits, y, idx):
    """A constrained step's penalty term on the batch (the multipliers move)."""
    return m.penalty(None, logits, None, Batch(logits, y, idx), None)


def _binary_logits(margins):
    """Logits of class 0 (the label) over class 1 with these margins: the trace is 2 (1 - sigmoid(margin))^2."""
    m = torch.tensor(margins, dtype=torch.float64)
    return torch.stack([m, torch.zeros_like(m)], 1), torch.zeros(len(m), dtype=torch.long)


def test_fim_multipliers_move_up_and_down_and_only_active_ones():
    # eps = the median of the active traces: half of the active samples satisfy their constraint, half violate it
    m = _fim(n=8, rho=0.5, eps_quantile=0.5, dual_lr=0.5, warmup_epochs=1)
    logits, y = _binary_logits([8.0, 6.0, 4.0, 2.0, 1.0, 0.0, -1.0, -3.0])
    trace = 2 * (1 - torch.sigmoid(logits[:, 0])) ** 2
    m.start_epoch(1, None, lambda: iter([(logits, None, y, torch.arange(len(y)))]))
    active = trace.topk(4).indices  # samples 4..7
    assert float(m.eps) == pytest.approx(float(trace[active].median() + trace[active].sort().values[2]) / 2)
    m.lam.fill_(1.0)
    _constrain(m, logits, y, torch.arange(8))
    moved = m.lam - 1.0
    assert torch.all(moved[:4] == 0)                              # inactive: untouched
    assert torch.all(moved[[4, 5]] < 0) and torch.all(moved[[6, 7]] > 0)  # feasible down, violated up
    assert float(moved.abs().max()) <= 0.5 + 1e-9                 # one visit moves a multiplier at most dual_lr


def test_fim_saturation_diagnostics_on_a_hand_made_batch():
    # traces 2 (1 - sigmoid(a))^2 for margins 10, 2, 0, -5: about 0, 0.0284, 0.5, 1.973; rho = 1, so eps is the
    # median (0.0284 + 0.5) / 2 = 0.264. Slack (T - eps) / eps, capped at 1: -1, -0.8924, +0.8924, +1.
    m = _fim(rho=1.0, eps_quantile=0.5, dual_lr=1.0, lambda_max=1.0, warmup_epochs=1)
    logits, y = _binary_logits([10.0, 2.0, 0.0, -5.0])
    m.start_epoch(1, None, lambda: iter([(logits, None, y, torch.arange(len(y)))]))
    assert float(m.eps) == pytest.approx(0.2642, abs=1e-3)
    m.lam.copy_(torch.tensor([0.0, 0.95, 0.5, 0.0]))
    _constrain(m, logits, y, torch.arange(4))
    # 0 - 1 -> 0 (at zero); 0.95 - 0.8924 = 0.0576 (free); 0.5 + 0.89 -> 1 (cap); 0 + 1 = 1 (cap)
    assert m.lam.tolist() == pytest.approx([0.0, 0.0576, 1.0, 1.0], abs=1e-4)
    stats = m.epoch_stats()
    assert stats["at_cap_frac"] == 0.5 and stats["at_zero_frac"] == 0.25 and stats["violated_frac"] == 0.5
    # sample 2 is the one bias-conflicting sample (1/4 of the set) and holds 1 / 2.0576 of the mass: the loop's
    # summary by group (the method never sees which sample conflicts)
    summary = by_group(m.per_sample(), torch.arange(4), torch.tensor([False, False, True, False]), 4)
    assert summary["lambda_enrichment"] == pytest.approx((1 / 2.0576) / 0.25, rel=1e-3)
    assert summary["lambda_share"] == pytest.approx([0.0, 0.0576 / 2.0576, 1 / 2.0576, 1 / 2.0576], abs=1e-4)
    m.start_epoch(2, None, None)  # a new epoch: the counters restart, eps stays
    assert m.n_active == 0 and float(m.eps) == pytest.approx(0.2642, abs=1e-3)


def test_fim_fixed_penalty_ablation_puts_lambda_max_on_the_active_set():
    m = _fim(n=8, rho=0.25, fixed_penalty=True, lambda_max=3.0, warmup_epochs=1)
    logits, y = _binary_logits([8.0, 6.0, 4.0, 2.0, 1.0, 0.0, -1.0, -3.0])
    m.start_epoch(1, None, lambda: iter([(logits, None, y, torch.arange(len(y)))]))
    _constrain(m, logits, y, torch.arange(8))
    assert m.lam.tolist() == [0.0] * 6 + [3.0, 3.0] and m.epoch_stats()["at_cap_frac"] == 1.0


def test_fim_refuses_to_calibrate_an_untrained_model():
    with pytest.raises(ValueError, match="warmup_epochs must be an integer >= 1"):
        _fim(warmup_epochs=0)
    with pytest.raises(ValueError, match="warmup_epochs must be an integer >= 1"):
        fit(TrainConfig(dataset="synthetic", method="fim", epochs=2, method_params={"warmup_epochs": 0}), log=None)
    assert FisherConstrained.space_for(20)["warmup_epochs"].low == 1


class _Marked(TensorGroupDataset):
    """Training augmentation the test can see: +100 on every pixel."""

    def batch_transform(self, x, train, generator=None):
        return x + 100.0 if train else x


@pytest.mark.parametrize("augment", [False, True])
def test_fim_calibrates_on_the_view_the_constraint_uses(monkeypatch, augment):
    import trainer.config
    monkeypatch.setattr(trainer.config, "IMAGE_DATASETS", ("synthetic",))  # its "augmentation": _Marked's +100
    s = load_splits("synthetic")
    t = s.train
    splits = dataclasses.replace(s, train=_Marked(t.x, t.y, t.a, t.n_classes, t.n_attr))
    seen, bn_before, bn_after = [], [], []
    original = FisherConstrained.start_epoch

    def start_epoch(self, epoch, model, train_batches):
        calibrating = epoch == self.params.warmup_epochs
        buffers = lambda: [b.clone() for b in model.buffers()]  # noqa: E731
        if calibrating:
            bn_before.extend(buffers())
            hook = model.register_forward_pre_hook(
                lambda mod, args: seen.append((mod.training, float(args[0].mean()) > 50)))
        original(self, epoch, model, train_batches)
        if calibrating:
            hook.remove()
            bn_after.extend(buffers())

    monkeypatch.setattr(FisherConstrained, "start_epoch", start_epoch)
    r = fit(TrainConfig(dataset="synthetic", method="fim", model="cnn", epochs=2, augment=augment,
                        method_params={"warmup_epochs": 1}), splits=splits, log=None)
    assert r.history[-1]["constrained"]
    n_batches = -(-len(t) // r.hparams["batch_size"])
    # every calibration forward ran as a training step does: train-mode BatchNorm on batches of its size, augmented
    # exactly when training is
    assert seen == [(True, augment)] * n_batches
    # ... and looking did not change the model: BatchNorm running statistics are restored
    assert len(bn_before) > 0 and all(torch.equal(a, b) for a, b in zip(bn_before, bn_after))


def test_bias_conflicting_groups():
    y, a = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])
    # P(y=0)=3/8: P(0|a=0)=2/4 above, P(0|a=1)=1/4 below; P(y=1)=5/8: P(1|a=1)=3/4 above, P(1|a=0)=2/4 below
    assert bias_conflicting(y, a).tolist() == [False, False, True, False, False, False, True, True]
    cm = load_splits("cmnist").train
    assert torch.equal(bias_conflicting(cm.y, cm.a), cm.y != cm.a)  # colour disagreeing with the label


def test_fim_rejects_bad_params():
    with pytest.raises(ValueError, match=r"rho must be a finite number in \(0.0, 1.0\], got 1.5"):
        _fim(rho=1.5)
    with pytest.raises(ValueError, match="unknown scope 'hessian'"):
        _fim(scope="hessian")


def test_group_metrics_skip_empty_groups_and_weight_by_train():
    correct = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    g = torch.tensor([0, 0, 0, 1, 3, 3])
    m = group_metrics(correct, g, 4, train_counts=torch.tensor([60, 20, 10, 10]))
    assert [x["group"] for x in m["groups"]] == [0, 1, 3]
    assert m["wga"] == 0.0 and abs(m["avg_plain"] - 0.5) < 1e-9
    assert abs(m["avg_train_weighted"] - (60 * 2 / 3 + 20 * 1 + 10 * 0) / 90) < 1e-6
