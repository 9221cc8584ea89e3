import math

import pytest
import torch
from torch import nn

from trainer import NonFiniteLossError, TrainConfig, fit
from trainer.data import load_splits
from trainer.fisher import last_layer_trace, logit_trace
from trainer.methods import METHODS
from trainer.methods.fim import FIMParams, FisherConstrained
from trainer.methods.groupdro import GroupDRO, GroupDROParams
from trainer.metrics import group_metrics

CASES = [("erm", {}), ("groupdro", {}), ("fim", {"scope": "logits"}), ("fim", {"scope": "last_layer"})]


@pytest.fixture(scope="module")
def cmnist():
    return load_splits("cmnist")


def _check_result(r, method, epochs):
    assert r["method"] == method and 1 <= r["best_epoch"] <= r["epochs_run"] <= epochs
    for split in ("val", "test"):
        m = r[split]
        assert 0 <= m["wga"] <= m["avg_plain"] + 1e-9 <= 1 + 1e-9
        assert m["wga"] == min(g["acc"] for g in m["groups"])
        assert sum(g["count"] for g in m["groups"]) == (128 if r["dataset"] == "synthetic" else 1000)
    assert len(r["history"]) == r["epochs_run"] and all(math.isfinite(h["train_loss"]) for h in r["history"])
    assert set(r["hparams"]["method_params"]) == {f.name for f in METHODS[method].param_fields()}


@pytest.mark.parametrize("method, params", CASES)
def test_every_method_on_synthetic(method, params):
    r = fit(TrainConfig(dataset="synthetic", method=method, epochs=3, method_params=params), log=None)
    _check_result(r, method, 3)
    if method == "fim":
        last = r["history"][-1]
        assert last["constrained"] and 0 <= last["violated_frac"] <= 1
        assert abs(sum(last["lambda_share"]) - 1) < 1e-3 or last["lambda_max"] == 0  # shares of no mass: zeros
        assert last["lambda_max"] <= 10


@pytest.mark.parametrize("method, params", CASES)
def test_every_method_on_cmnist(method, params, cmnist):
    r = fit(TrainConfig(dataset="cmnist", method=method, epochs=2, method_params=params), splits=cmnist, log=None)
    _check_result(r, method, 2)
    assert r["uses_group_labels"] == (method == "groupdro")
    if method == "fim":  # after one warm-up epoch the constraints bind and lambda mass appears
        last = r["history"][-1]
        assert last["lambda_mean"] > 0 and abs(sum(last["lambda_share"]) - 1) < 1e-3


def test_same_seed_same_result():
    cfg = TrainConfig(dataset="synthetic", method="fim", epochs=2, seed=3)
    a, b = fit(cfg, log=None), fit(cfg, log=None)
    assert a["test"] == b["test"] and a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


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
    m = GroupDRO(GroupDROParams(eta_q=0.5), n_train=8, n_groups=4, train_groups=groups)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    logits = torch.zeros(8, 2)
    logits[:, 0] = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, -3.0, -3.0])  # group 2 is wrong, group 3 right
    for _ in range(20):
        m.loss(logits, None, y, groups, torch.arange(8))
        assert torch.all(m.q >= 0) and abs(float(m.q.sum()) - 1) < 1e-6
    assert int(m.q.argmax()) == 2 and float(m.q[2]) > 0.9
    w = m.sampling_weights()
    assert torch.allclose(w, torch.full((8,), 0.5))


def test_fim_multipliers_nonnegative_and_only_active_move():
    torch.manual_seed(0)
    n = 16
    m = FisherConstrained(FIMParams(rho=0.25, dual_lr=5.0, warmup_epochs=0), n_train=n, n_groups=4,
                          train_groups=torch.arange(n) % 4)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    wrapped = lambda: iter([(model(x), x, y)])  # noqa: E731
    m.start_epoch(0, model, wrapped)
    assert m.constrained and float(m.eps) > 0
    idx = torch.arange(100, 100 + 8) % n
    for step in range(5):
        logits = model(x[idx])
        before = m.lam.clone()
        trace = logit_trace(logits, y[idx])
        _, logs = m.loss(logits, x[idx], y[idx], None, idx)
        changed = (m.lam != before).nonzero().flatten()
        active = set(idx[trace.topk(2).indices].tolist())
        assert set(changed.tolist()) <= active
        assert torch.all(m.lam >= 0) and torch.all(m.lam <= m.params.lambda_max)
        assert "penalty" in logs
    assert float(m.lam.sum()) > 0


def test_fim_rejects_bad_params():
    with pytest.raises(ValueError, match="rho must be in"):
        FisherConstrained(FIMParams(rho=1.5), n_train=4, n_groups=4, train_groups=torch.arange(4))
    with pytest.raises(ValueError, match="scope must be one of"):
        FisherConstrained(FIMParams(scope="full"), n_train=4, n_groups=4, train_groups=torch.arange(4))


def test_group_metrics_skip_empty_groups_and_weight_by_train():
    correct = torch.tensor([1, 1, 0, 1, 0, 0], dtype=torch.bool)
    g = torch.tensor([0, 0, 0, 1, 3, 3])
    m = group_metrics(correct, g, 4, train_counts=torch.tensor([60, 20, 10, 10]))
    assert [x["group"] for x in m["groups"]] == [0, 1, 3]
    assert m["wga"] == 0.0 and abs(m["avg_plain"] - 0.5) < 1e-9
    assert abs(m["avg_train_weighted"] - (60 * 2 / 3 + 20 * 1 + 10 * 0) / 90) < 1e-6
