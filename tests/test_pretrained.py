"""The pretrained regime offline: the small CNNs' backbones pretrained on a disjoint source (trainer/backbones.py),
their recipe, their cache and the weights files of a CNN."""
import pytest
import torch

from trainer import TrainConfig, backbones
from trainer.data.texdigits import TEXTURES
from trainer.models import build_model


@pytest.fixture
def quick(monkeypatch, tmp_path):
    """A backbone built in a second: one render of each source digit, one epoch (the procedure, not its quality)."""
    monkeypatch.setenv("DEBIAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backbones, "COPIES", 1)
    monkeypatch.setattr(backbones, "EPOCHS", 1)
    return tmp_path


def test_the_source_is_disjoint_from_the_benchmarks_and_drawn_in_their_form():
    digits, labels = backbones._source_digits()
    assert tuple(digits.shape) == (1797, 8, 8) and set(labels.tolist()) == set(range(10))  # UCI's, not MNIST's
    assert not set(backbones.PHOTOS) & set(TEXTURES)  # never grass or gravel
    gen = torch.Generator().manual_seed(0)
    x = backbones._in_channels(digits[:40], 2, 7, gen)
    assert tuple(x.shape) == (40, 2, 7, 7) and ((x.flatten(2).amax(2) > 0).sum(1) == 1).all()  # one colour each
    assert set(x.flatten(2).amax(2).argmax(1).tolist()) == {0, 1}  # both colours, whatever the digit
    photo = backbones._on_photos(digits[:3], 3, 16, gen)
    assert tuple(photo.shape) == (3, 3, 16, 16) and 0 <= float(photo.min()) and float(photo.max()) <= 1


def test_a_backbone_is_built_once_deterministically_and_a_damaged_cache_file_is_rebuilt(quick, capsys):
    a = backbones.pretrained_backbone("cmnist", "cnn_narrow", 2, 7)
    assert "pretrained cnn_narrow for cmnist on UCI Optical Recognition" in capsys.readouterr().err
    files = list((quick / "cache" / "backbones").glob("*.pt"))
    assert len(files) == 1
    assert all(torch.equal(a[k], v) for k, v in backbones.pretrained_backbone("cmnist", "cnn_narrow", 2, 7).items())
    assert "pretrained" not in capsys.readouterr().err  # read from the cache, not trained again
    files[0].write_bytes(files[0].read_bytes()[:-100])  # truncated
    b = backbones.pretrained_backbone("cmnist", "cnn_narrow", 2, 7)
    err = capsys.readouterr().err
    assert "damaged" in err and "rebuilt" in err and "pretrained cnn_narrow" in err
    assert backbones.digest(a) == backbones.digest(b)  # the same weights from the same seeds and one thread


def test_the_pretrained_recipe_fine_tunes_and_the_model_starts_from_the_backbone(quick):
    cfg = TrainConfig(dataset="cmnist", pretrained=True).resolved()
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.pretrained) == ("cnn_narrow", 1e-3, 30, True)
    scratch = TrainConfig(dataset="cmnist").resolved()
    assert (scratch.lr, scratch.epochs, scratch.pretrained) == (0.01, 20, False)  # the default is unchanged
    model = build_model("cnn_narrow", 2, True, in_channels=2, source=("cmnist", 7))
    state = backbones.pretrained_backbone("cmnist", "cnn_narrow", 2, 7)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match=r"model 'cnn' has pretrained weights only for cmnist, texdigits"):
        TrainConfig(dataset="synthetic", model="cnn", pretrained=True).resolved()


def test_a_cnn_starts_from_a_weights_file_or_is_refused_in_one_line(tmp_path):
    mine = build_model("cnn_narrow", 2, in_channels=2)
    torch.save(mine.state_dict(), tmp_path / "mine.pt")  # a whole classifier: its head is dropped
    loaded = build_model("cnn_narrow", 2, weights_path=str(tmp_path / "mine.pt"), in_channels=2)
    assert all(torch.equal(loaded.backbone.state_dict()[k], v) for k, v in mine.backbone.state_dict().items())
    torch.save(build_model("cnn", 2, in_channels=2).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"^weights for cnn_narrow do not match the architecture \(size mismatch"):
        build_model("cnn_narrow", 2, weights_path=str(tmp_path / "wide.pt"), in_channels=2)
    with pytest.raises(ValueError, match=r"^--weights .*nothing.pt: file not found$"):
        build_model("cnn_narrow", 2, weights_path=str(tmp_path / "nothing.pt"), in_channels=2)
    from study.experiment import Experiment  # init checks the file as every trial will load it: 2 channels here
    Experiment.of(name="w", datasets=["cmnist"], methods=["erm"], weights=str(tmp_path / "mine.pt")).check_weights(
        "cmnist", 2)
    with pytest.raises(ValueError, match=r"^dataset cmnist: weights for cnn_narrow do not match"):
        Experiment.of(name="w", datasets=["cmnist"], methods=["erm"], weights=str(tmp_path / "wide.pt")).check_weights(
            "cmnist", 2)


def test_the_full_scope_without_clipping_at_a_large_rate_is_said_before_the_run(tmp_path):
    """Measured: the full scope unclipped at lr 0.05 on 64-px images turned the loss non-finite; the trainer and
    `study init` say so, with the rate to use; a clipped recipe (cmnist's) is not warned about."""
    from study.experiment import Experiment
    from trainer.methods.fim import FisherConstrained
    cfg = TrainConfig(dataset="synthetic", method="fim", grad_clip=0.0, lr=0.05, method_params={"scope": "full"})
    assert cfg.resolved().warning() == (
        "fim --scope full without gradient clipping at lr up to 0.05: its loss turned non-finite at lr 0.05 on 64-px "
        "images; use --lr 0.005 or lower, or --grad-clip 5")
    assert TrainConfig(dataset="synthetic", method="fim", grad_clip=0.0, lr=0.005,
                       method_params={"scope": "full"}).resolved().warning() is None
    assert FisherConstrained.recipe_warning({"scope": ("logits",)}, 0.05, 0.0) is None
    searched = Experiment.of(name="w", datasets=["synthetic", "cmnist"], methods=["fim", "erm"], grad_clip=0.0)
    assert [w.split(":")[0] for w in searched.warnings()] == ["synthetic/fim", "cmnist/fim"]  # scope searched
    assert Experiment.of(name="w", datasets=["cmnist"], methods=["fim"]).warnings() == []  # clipped at 5


def test_the_trainer_says_the_warning_before_its_first_epoch(capsys):
    from trainer.cli import main
    main(["--dataset", "synthetic", "--method", "fim", "--scope", "full", "--grad-clip", "0", "--lr", "0.05",
          "--epochs", "2", "--threads", "1"])
    err = capsys.readouterr().err
    assert err.startswith("warning: fim --scope full without gradient clipping at lr up to 0.05")


def test_study_init_builds_the_backbone_before_it_writes_anything(quick, capsys):
    from study.experiment import Experiment
    exp = Experiment.of(name="p", datasets=["cmnist"], methods=["erm"], pretrained=True)
    assert exp.recipe("cmnist").resolved().lr == 1e-3  # the fine-tuning recipe, searched around
    assert exp.epochs_for("cmnist") == 30  # its budget: what the search space and the patience are sized for
    exp.check_weights("cmnist", 2)
    assert len(list((quick / "cache" / "backbones").glob("*.pt"))) == 1
    assert "pretrained cnn_narrow for cmnist" in capsys.readouterr().err
