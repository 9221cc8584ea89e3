"""Per-dataset and per-model recipes: augmentation, BatchNorm, learning rates and search ranges; --deterministic."""
import pytest
import torch
from torch import nn

from study.experiment import Experiment, reference_params, search_space
from trainer import TrainConfig, fit
from trainer.data import recipe
from trainer.data.decoded import centre_crop
from trainer.methods import METHODS
from trainer.methods.erm import ERM
from trainer.models import build_model


class Recorder(ERM):
    """ERM that keeps every training batch as the step saw it, with the BatchNorm layers' modes."""
    seen: list = []

    def training_step(self, model, optimizer, batch, autocast):
        bn = [m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        Recorder.seen.append((batch.x.clone(), batch.idx.clone(), bn))
        return super().training_step(model, optimizer, batch, autocast)


@pytest.fixture
def recorder(monkeypatch):
    Recorder.seen = []
    monkeypatch.setitem(METHODS, "recorder", Recorder)
    return Recorder.seen


def _run(waterbirds_dir, **kw):
    kw = {"pretrained": False, **kw}
    return fit(TrainConfig(dataset="waterbirds", data_dir=str(waterbirds_dir), method="recorder", model="resnet18",
                           image_size=24, epochs=1, batch_size=4, num_workers=0, device="cpu", patience=0, **kw),
               log=None)


@pytest.mark.parametrize("loader", ["decoded", "pil"])
def test_waterbirds_recipe_trains_on_the_evaluation_transform(waterbirds_dir, recorder, loader):
    r = _run(waterbirds_dir, image_loader=loader)
    assert r.hparams["augment"] is False  # Sagawa et al.'s Waterbirds recipe: no augmentation
    from trainer.data import load_splits
    evals = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=24)  # decoded eval transform
    assert len(recorder) == 2
    for x, idx, _ in recorder:
        torch.testing.assert_close(x, centre_crop(evals.train.x[idx], 24), atol=1e-5, rtol=0)


def test_augmentation_on_changes_the_training_batches(waterbirds_dir, recorder):
    _run(waterbirds_dir, augment=True)
    from trainer.data import load_splits
    evals = load_splits("waterbirds", data_dir=str(waterbirds_dir), image_size=24)
    x, idx, _ = recorder[0]
    assert x.shape == (4, 3, 24, 24) and not torch.allclose(x, centre_crop(evals.train.x[idx], 24), atol=1e-3)


def test_frozen_batchnorm_keeps_statistics_and_trains_affine_weights(waterbirds_dir, recorder, tmp_path):
    weights = tmp_path / "resnet18.pth"  # a "pretrained" file: freezing needs a pretrained model
    torch.save(build_model("resnet18", 2).backbone.state_dict(), weights)
    _run(waterbirds_dir, freeze_bn=True, pretrained=True, weights=str(weights))
    assert recorder and all(not any(bn) for _, _, bn in recorder)  # every step: BatchNorm in eval mode
    _run(waterbirds_dir, pretrained=True, weights=str(weights))
    assert all(all(bn) for _, _, bn in recorder[2:])  # the recipe's default: BatchNorm trains

    model = build_model("resnet18", 2, freeze_bn=True).train()
    bn = model.backbone.bn1
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2] and bn.weight.grad.abs().sum() > 0
    assert model.training and model.head.training


def test_recipes_follow_the_dataset_and_the_model():
    wb = TrainConfig(dataset="waterbirds").resolved()
    assert (wb.model, wb.pretrained, wb.lr, wb.augment, wb.freeze_bn) == ("resnet50", True, 1e-3, False, False)
    assert TrainConfig(dataset="folder").resolved().augment is True
    # a from-scratch model on a dataset whose recipe fine-tunes a pretrained ResNet: the from-scratch lr
    for cfg in (TrainConfig(dataset="folder", model="cnn"), TrainConfig(dataset="waterbirds", pretrained=False)):
        r = cfg.resolved()
        assert r.lr == 0.05 and r.pretrained is False
    assert TrainConfig(dataset="cmnist").resolved().lr == 0.01  # the dataset's own model keeps its recipe
    assert recipe("folder", "cnn").lr == 0.05 and recipe("folder", "resnet18").lr == 1e-3
    # the search range and the enqueued reference configuration move with the model
    exp = Experiment.of(name="r", datasets=["folder"], methods=["erm"], model="cnn")
    lr = search_space(exp, "folder", "erm")["lr"]
    assert (lr.low, lr.high) == pytest.approx((0.005, 0.5)) and reference_params(exp, "folder", "erm")["lr"] == 0.05
    lr = search_space(Experiment.of(name="r", datasets=["folder"], methods=["erm"]), "folder", "erm")["lr"]
    assert (lr.low, lr.high) == pytest.approx((1e-4, 1e-2))


@pytest.mark.parametrize("kw, message", [
    (dict(dataset="cmnist", augment=True), "dataset 'cmnist' has no augmentation"),
    (dict(dataset="folder", model="cnn", freeze_bn=True), "freeze_bn needs a pretrained model"),
    (dict(dataset="folder", model="cnn", pretrained=True), "model 'cnn' has pretrained weights only for cmnist"),
])
def test_impossible_recipes_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kw).resolved()
    exp_kw = {k: v for k, v in kw.items() if k != "dataset"}
    with pytest.raises(ValueError, match=message):  # refused by init too, before anything is written
        Experiment.of(name="r", datasets=[kw["dataset"]], methods=["erm"], **exp_kw)


def test_recipe_settings_reach_the_recorded_command():
    from trainer.cli import command_for, config_from_args, get_args_parser
    cmd = command_for(TrainConfig(dataset="folder", data_dir="/d", model="cnn", deterministic=True))
    assert "--augment" in cmd and "--no-freeze-bn" in cmd and "--deterministic" in cmd and "--no-pretrained" in cmd
    args = get_args_parser().parse_args(cmd.split()[3:])
    assert config_from_args(args).resolved() == TrainConfig(dataset="folder", data_dir="/d", model="cnn",
                                                            deterministic=True).resolved()


def test_deterministic_mode_is_on_during_the_run_only(recorder, monkeypatch):
    modes = []
    monkeypatch.setattr(Recorder, "loss", lambda self, logits, h, batch: (
        modes.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                      torch.backends.cudnn.benchmark)) or ERM.loss(self, logits, h, batch)))
    runs = [fit(TrainConfig(dataset="synthetic", method="recorder", epochs=2, deterministic=True), log=None)
            for _ in range(2)]
    assert modes and set(modes) == {(True, True, False)}
    assert not torch.are_deterministic_algorithms_enabled()  # restored for the worker's next trial
    assert runs[0].history[-1]["train_loss"] == runs[1].history[-1]["train_loss"]
    assert runs[0].test == runs[1].test
