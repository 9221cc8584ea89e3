"""The full-scope Fisher trace against brute force: a per-sample autograd.grad loop over every parameter, and the
penalty's gradient against finite differences (float64 throughout)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.fisher import ParameterTrace
from trainer.methods import TrainSplit
from trainer.methods.fim import FIMParams, FisherConstrained
from trainer.methods.fim_relative import FIMRelativeParams, FisherRelative
from trainer.models import build_model

TOL = 1e-9  # relative, float64


def _model(name, channels):
    torch.manual_seed(0)
    m = build_model(name, 2, in_channels=channels).double()
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0), so their gradients are not special
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


CASES = [("cnn_narrow", 2, 7), ("resnet18", 3, 16)]  # plain convolutions; residual in-place adds, downsampling


def _frozen_copy(model, x):
    """An independent reference: a copy whose train-mode BatchNorm layers normalise with the batch statistics of x,
    detached (computed in a first forward, then replayed as constants by a forward hook)."""
    ref = copy.deepcopy(model)
    stats, hooks = {}, []

    def record(m, args):
        t = args[0].detach()
        stats[m] = (t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=False))
    bns = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    hooks = [m.register_forward_pre_hook(record) for m in bns]
    with torch.no_grad():
        ref(x)
    for h in hooks:
        h.remove()

    def replay(m, args, out):
        mean, var = stats[m]
        return F.batch_norm(args[0], mean, var, m.weight, m.bias, False, 0.0, m.eps)
    for m in bns:
        m.eval()  # its own computation is replaced by the replay: it must only not need a batch
        m.register_forward_hook(replay)
    return ref


def _brute_force(ref, x, y, fisher):
    params = [p for p in ref.parameters() if p.requires_grad]
    out = []
    for i in range(len(x)):  # sample i alone sees the batch's (constant) statistics: per-sample forwards are exact
        logp = F.log_softmax(ref(x[i:i + 1]), 1)[0]
        classes = [int(y[i])] if fisher == "empirical" else range(logp.shape[0])
        total = 0.0
        for c in classes:
            grads = torch.autograd.grad(-logp[c], params, retain_graph=True)
            sq = sum(float(g.pow(2).sum()) for g in grads)
            total += sq if fisher == "empirical" else float(logp[c].detach().exp()) * sq
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("fisher", ["empirical", "expected"])
@pytest.mark.parametrize("name, channels, size", CASES)
def test_full_trace_equals_a_per_sample_autograd_loop(name, channels, size, fisher):
    model = _model(name, channels).train()
    x = torch.randn(6, channels, size, size, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    tracer = ParameterTrace(model)
    with tracer.batch_statistics() as stats, torch.no_grad():
        train_logits = model(x)
    assert len(stats) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    ref = _frozen_copy(model, x)
    with torch.no_grad():  # the frozen statistics give the training step's own logits
        torch.testing.assert_close(ref(x), train_logits, rtol=1e-10, atol=1e-10)
    fast = tracer.traces(x, y, stats, fisher)
    slow = _brute_force(ref, x, y, fisher)
    assert slow.min() > 0 and not fast.requires_grad
    torch.testing.assert_close(fast, slow, rtol=TOL, atol=0.0)
    assert model.training and all(m.training for m in model.modules())  # the model is left as it was


@pytest.mark.parametrize("name, channels, size", CASES)
def test_traces_from_the_steps_own_forward_leave_its_gradient_exact(name, channels, size):
    """recording(): the training step's forward gives every trace (the per-sample loop's) and, after that extra
    backward, the step's backward still gives the plain train-mode gradient."""
    model = _model(name, channels).train()
    plain = copy.deepcopy(model)
    x = torch.randn(6, channels, size, size, dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 1, 0, 0])
    ref = _frozen_copy(model, x)
    tracer = ParameterTrace(model)
    with tracer.recording() as (stats, saved):
        logits = model(x)
    fast = tracer.recorded_traces(logits, y, saved, retain_graph=True)
    torch.testing.assert_close(fast, _brute_force(ref, x, y, "empirical"), rtol=TOL, atol=0.0)
    F.cross_entropy(logits, y).backward()
    F.cross_entropy(plain(x), y).backward()
    for (name_, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name_)
    for m, q in zip(model.modules(), plain.modules()):  # the running statistics moved once, as in a plain step
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, q.running_mean, rtol=1e-12, atol=1e-12)
    assert set(stats) == {m for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    torch.testing.assert_close(tracer.traces(x, y, stats), fast, rtol=TOL, atol=0.0)  # the candidates' pass agrees


def test_full_trace_in_eval_mode_uses_running_statistics():
    model = _model("cnn_narrow", 2, ).eval()  # frozen BatchNorm: no batch statistics, the running ones
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(4, 2, 7, 7, dtype=torch.float64), torch.tensor([1, 0, 0, 1])
    fast = ParameterTrace(model).traces(x, y, {})
    torch.testing.assert_close(fast, _brute_force(model, x, y, "empirical"), rtol=TOL, atol=0.0)


def test_full_trace_covers_every_parameter_or_refuses():
    model = _model("cnn_narrow", 2)
    x, y = torch.randn(3, 2, 7, 7, dtype=torch.float64), torch.tensor([0, 1, 0])
    tracer = ParameterTrace(model)
    with tracer.batch_statistics() as stats, torch.no_grad():
        model(x)
    full = tracer.traces(x, y, stats)
    model.head.weight.requires_grad_(False)  # a frozen parameter leaves the trace: it is no longer theta's
    part = ParameterTrace(model).traces(x, y, stats)
    assert torch.all(part < full)
    odd = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match="no per-sample gradient rule for layer '2'"):
        ParameterTrace(odd)


@pytest.mark.parametrize("fisher", ["empirical", "expected"])
def test_penalty_gradient_equals_finite_differences(fisher):
    model = _model("cnn_narrow", 2).train()
    x, y = torch.randn(5, 2, 7, 7, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    lam = torch.tensor([0.3, 0.0, 2.0, 1.0, 0.7], dtype=torch.float64)
    tracer = ParameterTrace(model)
    with tracer.batch_statistics() as stats, torch.no_grad():
        model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    (lam * tracer.traces(x, y, stats, fisher, create_graph=True)).sum().backward()
    exact = torch.cat([p.grad.flatten() for p in params])
    torch.manual_seed(1)
    v = [torch.randn_like(p) for p in params]
    h = 1e-5

    def penalty_at(sign):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(sign * h * d)
        value = float((lam * tracer.traces(x, y, stats, fisher)).sum())
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(sign * h * d)
        return value
    numeric = (penalty_at(1) - penalty_at(-1)) / (2 * h)
    analytic = float(exact @ torch.cat([d.flatten() for d in v]))
    assert abs(analytic) > 1e-3 and analytic == pytest.approx(numeric, rel=1e-6)


def _method(n, **kw):
    return FisherConstrained(FIMParams(warmup_epochs=1, **kw), TrainSplit(torch.arange(n) % 2, 2, 4))


def test_global_active_set_is_the_top_of_the_whole_set_not_of_the_batch():
    m = _method(20, rho=0.2, active_set="global", eps_quantile=0.5)
    m.memory.copy_(torch.arange(20, dtype=torch.float32))  # last-visit traces 0..19: the top 20% are 16..19
    m.eps.fill_(17.5)
    m._eps_value = 17.5
    idx = torch.tensor([0, 5, 10, 15])  # a batch of samples all below the set's top: none is constrained
    top, active = m.select(torch.tensor([0.0, 5.0, 10.0, 15.0]), idx)
    assert not active.any()
    # the same samples, one now with a trace inside the top of the set: only it is constrained
    top, active = m.select(torch.tensor([0.0, 5.0, 18.5, 15.0]), idx)
    assert idx[top[active]].tolist() == [10] and float(m.memory[10]) == 18.5
    # per batch, the batch's own top-ceil(rho B) is constrained whatever the set holds
    b = _method(20, rho=0.2, active_set="batch")
    top, active = b.select(torch.tensor([0.0, 5.0, 10.0, 15.0]), idx)
    assert idx[top[active]].tolist() == [15]


def test_dual_step_sign_and_projection():
    m = _method(6, rho=1.0, dual_lr=0.5, lambda_max=2.0)
    m.eps.fill_(1.0)
    m.lam.copy_(torch.tensor([0.1, 1.0, 1.9, 1.0, 1.0, 1.0]))
    t = torch.tensor([0.5, 0.5, 3.0, 1.5, 1.0, 9.0])  # slack -0.5, -0.5, +1 (capped), +0.5, 0, +1 (capped)
    active = torch.tensor([True, True, True, True, True, False])
    lam = m.dual_step(t, torch.arange(6), active)
    # feasible: down, projected at 0; violated: up, projected at lambda_max; on the boundary: unchanged; inactive:
    # its multiplier is kept and it carries no weight in the penalty
    assert m.lam.tolist() == pytest.approx([0.0, 0.75, 2.0, 1.25, 1.0, 1.0])
    assert lam.tolist() == pytest.approx([0.0, 0.75, 2.0, 1.25, 1.0, 0.0])
    assert int(m.n_active) == 5 and int(m.n_violated) == 2 and int(m.n_at_cap) == 1 and int(m.n_at_zero) == 1


def test_bias_relative_active_set_ranks_by_the_biased_models_share_of_the_trace():
    """fim_relative: of two samples with the same trace, the one the bias-amplified model finds harder is chosen;
    a large trace that the biased model shares (an ambiguous sample) is not."""
    m = FisherRelative(FIMRelativeParams(warmup_epochs=1, rho=0.25), TrainSplit(torch.arange(8) % 2, 2, 4))
    m.eps.fill_(1.0)
    m._eps_value = 1.0
    idx = torch.tensor([0, 1, 2, 3])
    m.biased_memory[idx] = torch.tensor([0.1, 4.0, 9.0, 0.2])
    trace = torch.tensor([1.0, 1.0, 9.0, 0.1])  # r = 0.09, 0.8, 0.5, 0.67
    top, active = m.select(trace, idx)
    assert top.tolist() == [1] and active.all()
    torch.testing.assert_close(m.memory[idx], torch.tensor([0.1 / 1.1, 0.8, 0.5, 0.2 / 0.3]))
    with pytest.raises(ValueError, match=r"unknown scope 'last_layer' \(choose from logits, full\)"):
        FisherRelative(FIMRelativeParams(scope="last_layer"), TrainSplit(torch.arange(8) % 2, 2, 4))


def test_a_vanishing_multiplier_cap_reduces_ours_to_erm_bit_for_bit(scope="full"):
    """With lambda_max 1e-30 every multiplier is capped at a value whose penalty gradient is lost in rounding: the
    constrained method must then be ERM, epoch for epoch (its calibration passes draw from streams of their own)."""
    from trainer import TrainConfig, fit
    common = dict(dataset="cmnist", epochs=3, patience=0, threads=1)
    erm = fit(TrainConfig(method="erm", **common), log=None)
    ours = fit(TrainConfig(method="fim", method_params={"scope": scope, "lambda_max": 1e-30, "warmup_epochs": 1},
                           **common), log=None)
    keys = ("train_nll", "val_wga", "val_avg_plain", "val_worst_class")
    assert [[r[k] for k in keys] for r in ours.history] == [[r[k] for k in keys] for r in erm.history]
    assert ours.test == erm.test
    last = ours.history[-1]  # the constraint was on: active samples, multipliers at their (vanishing) cap
    assert last["constrained"] and last["active_per_step"] > 0 and 0 < last["lambda_max"] < 1.01e-30
    assert 0 < last["active_accuracy"] <= 1  # ERM fits some of its largest-trace samples


def test_the_constrained_samples_accuracy_counts_active_samples_only():
    """The constrained samples' train accuracy per epoch: of the batch's candidates, only the active ones count."""
    m = FisherConstrained(FIMParams(), TrainSplit(torch.arange(8) % 2, 2, 4))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1, 1])  # right, wrong, wrong, right
    m.count_correct(logits, y, torch.tensor([0, 1, 3]), torch.tensor([True, True, False]))
    m.n_active += 2
    m.eps.fill_(1.0)
    m._eps_value = 1.0
    assert int(m.n_active_correct) == 1 and m.epoch_stats()["active_accuracy"] == 0.5
