"""JTT, DFR and the rebalancing baselines: their invariants, through the real loop where it matters."""
import numpy as np
import pytest
import torch
from scipy import stats

from trainer import TrainConfig, fit
from trainer.data import TensorGroupDataset, load_splits, make_loader
from trainer.methods import METHODS, Batch, TrainSplit
from trainer.methods import dfr as dfr_module
from trainer.methods.jtt import JTT, JTTParams
from trainer.methods.resample import Resample, ResampleClass
from trainer.methods.reweight import Reweight, ReweightClass
from trainer.methods.subsample import Subsample, SubsampleClass

# an imbalanced training set: groups of 40, 10, 5 and 25 samples, classes y = g // 2
COUNTS = (40, 10, 5, 25)
GROUPS = torch.cat([torch.full((n,), g) for g, n in enumerate(COUNTS)])
LABELS = GROUPS // 2


def _method(cls, params=None, n=len(GROUPS)):
    params = params if params is not None else cls.Params()
    return cls(params, TrainSplit.view(cls, LABELS[:n], GROUPS[:n], 2, 4))


def _dataset(n=len(GROUPS)):
    return TensorGroupDataset(torch.zeros(n, 1, 2, 2), LABELS[:n], GROUPS[:n] % 2, n_classes=2, n_attr=2)


def _draws(weights, replacement=True, epochs=200, seed=0):
    """Sample indices of `epochs` epochs of the project's loader with these weights."""
    loader = make_loader(_dataset(), 16, shuffle=True, weights=weights, replacement=replacement,
                         generator=torch.Generator().manual_seed(seed))
    return [torch.cat([idx for *_, idx in loader]) for _ in range(epochs)]


# ---------------------------------------------------------------- rebalancing


def test_resample_draws_groups_uniformly_and_the_class_variant_classes():
    for cls, keys, k in ((Resample, GROUPS, 4), (ResampleClass, LABELS, 2)):
        idx = torch.cat(_draws(_method(cls).sampling_weights()))
        observed = torch.bincount(keys[idx], minlength=k).numpy()
        assert len(idx) == 200 * len(GROUPS)  # N draws per epoch, with replacement
        assert stats.chisquare(observed).pvalue > 1e-3, observed  # uniform within sampling error
        # and far from the training proportions, which a plain shuffle would give
        assert stats.chisquare(observed, torch.bincount(keys).numpy() * len(idx) / len(keys)).pvalue < 1e-6


def test_reweight_gives_every_group_equal_weight_with_mean_one():
    for cls, keys in ((Reweight, GROUPS), (ReweightClass, LABELS)):
        w = _method(cls).weight
        totals = torch.zeros(int(keys.max()) + 1).scatter_add(0, keys, w)
        assert torch.allclose(totals, totals[0].expand_as(totals)) and float(w.mean()) == pytest.approx(1.0)
        # the loss: mean of w_i * CE_i over the batch
        m, logits, idx = _method(cls), torch.randn(6, 2), torch.tensor([0, 45, 52, 60, 3, 79])
        y = LABELS[idx]
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        assert float(m.loss(logits, None, Batch(logits, y, idx))[0]) == pytest.approx(float((w[idx] * ce).mean()))
    assert _method(Reweight).weight[50] / _method(Reweight).weight[0] == pytest.approx(40 / 5)


def test_subsample_keeps_the_smallest_group_size_and_draws_each_kept_sample_once_per_epoch():
    for cls, keys, smallest in ((Subsample, GROUPS, 5), (SubsampleClass, LABELS, 30)):
        m = _method(cls)
        torch.manual_seed(0)
        m.setup(None)
        mask = m.sampling_weights()
        kept = torch.nonzero(mask).flatten()
        assert torch.equal(torch.bincount(keys[kept]), torch.full((int(keys.max()) + 1,), smallest))
        epochs = _draws(mask, replacement=m.replacement, epochs=3)
        assert all(torch.equal(e.sort().values, kept) for e in epochs)  # every kept sample exactly once
        assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch; the subset itself is fixed


def test_class_variants_read_no_group_label():
    assert {n for n, c in METHODS.items() if c.group_labels == "none"} >= {
        "erm", "fim", "resample_class", "reweight_class", "subsample_class", "jtt", "lff", "sam"}
    scrambled = torch.randperm(len(GROUPS), generator=torch.Generator().manual_seed(1))
    for cls in (ResampleClass, ReweightClass):
        a = _method(cls)
        b = cls(cls.Params(), TrainSplit.view(cls, LABELS, GROUPS[scrambled], 2, 4))
        wa, wb = (a.sampling_weights(), b.sampling_weights()) if cls is ResampleClass else (a.weight, b.weight)
        assert torch.equal(wa, wb)


# ---------------------------------------------------------------- JTT


def test_jtt_error_set_is_what_stage_one_got_wrong():
    m = _method(JTT, JTTParams(stage1_epochs=2, up=10.0))
    logits = torch.randn(len(GROUPS), 2, generator=torch.Generator().manual_seed(0))
    order = torch.randperm(len(GROUPS))  # batches in any order: the error set is indexed by dataset index

    def batches(eval=False):
        assert eval  # the evaluation view: eval mode, no augmentation
        for chunk in order.split(16):
            yield logits[chunk], None, LABELS[chunk], chunk

    m.start_epoch(0, None, batches)  # stage 1: nothing happens
    assert m.sampling_weights() is None and not m.new_stage(0)
    m.start_epoch(2, None, batches)
    assert torch.equal(m.errors, logits.argmax(1) != LABELS) and m.new_stage(2)


def test_jtt_stage_two_draws_each_error_up_times_as_often():
    m = _method(JTT, JTTParams(stage1_epochs=1, up=8.0))
    m.errors[torch.arange(0, 80, 7)] = True  # 12 errors
    m.stage = 2
    idx = torch.cat(_draws(m.sampling_weights(), epochs=400))
    per_sample = torch.bincount(idx, minlength=len(GROUPS)).float()
    ratio = float(per_sample[m.errors].mean() / per_sample[~m.errors].mean())
    assert ratio == pytest.approx(8.0, rel=0.05)  # errors up-weighted, never the reverse


def test_jtt_through_the_loop_selects_a_stage_two_epoch_of_a_fresh_model():
    r = fit(TrainConfig(dataset="synthetic", method="jtt", epochs=5, patience=0,
                        method_params={"stage1_epochs": 2, "up": 10.0}), log=None)
    assert r.first_own_epoch == 3 and r.best_epoch >= 3
    assert [h["own"] for h in r.history] == [False, False, True, True, True]
    assert r.history[1]["error_frac"] is None and 0 <= r.history[2]["error_frac"] <= 1
    assert r.group_labels == "none"
    with pytest.raises(ValueError, match="epochs"):  # no stage-2 epoch left
        TrainConfig(dataset="synthetic", method="jtt", epochs=2, method_params={"stage1_epochs": 2}).resolved()


# ---------------------------------------------------------------- DFR


def test_dfr_head_never_sees_the_held_out_half(monkeypatch):
    rng = np.random.default_rng(0)
    n = 200
    g = rng.integers(0, 4, n)
    y = g // 2
    h = np.c_[rng.normal(size=(n, 5)) + y[:, None], np.arange(n)]  # last column: the sample's index
    order = rng.permutation(n)
    a_half, b_half = order[n // 2:], order[:n // 2]
    fitted = []
    real = dfr_module.fit_head

    def spy(hs, ys, c, seed):
        fitted.append(hs[:, -1].astype(int))
        return real(hs, ys, c, seed)

    monkeypatch.setattr(dfr_module, "fit_head", spy)
    best, pred_b, scores = dfr_module.tune(h, y, g, a_half, b_half, (1.0, 0.1), seed=0)
    assert len(fitted) == 2 and all(set(f) <= set(a_half) for f in fitted)
    # group-balanced: each group of half A cut to the smallest one
    counts = np.bincount(g[fitted[0]])
    assert (counts == np.bincount(g[a_half]).min()).all()
    assert best in (1.0, 0.1) and len(pred_b) == len(b_half) and set(scores) == {1.0, 0.1}


def test_dfr_through_the_loop_refits_the_head_and_reports_the_held_out_half():
    splits = load_splits("cmnist")
    erm = fit(TrainConfig(dataset="cmnist", method="erm", epochs=3), splits=splits, log=None)
    r = fit(TrainConfig(dataset="cmnist", method="dfr", epochs=3), splits=splits, log=None)
    # stage 1 is the ERM run itself: the same seed trains the same model
    assert [h["val_wga"] for h in r.history] == [h["val_wga"] for h in erm.history]
    assert sum(g["count"] for g in r.val["groups"]) == len(splits.val) // 2  # the half its head never saw
    assert r.group_labels == "val" and r.best_epoch == erm.best_epoch
    assert r.test["wga"] > erm.test["wga"] + 0.2  # re-fit on balanced val features: the shortcut is gone
