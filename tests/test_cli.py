import json

import pytest
import torch
import torchvision

from trainer.models import build_model


from conftest import trainer_main as run_trainer


def test_cli_writes_result_json(tmp_path):
    out = tmp_path / "r" / "result.json"
    p = run_trainer("--dataset", "synthetic", "--method", "fim", "--epochs", "2", "--rho", "0.5",
                    "--scope", "last_layer", "--output", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("epoch ") >= 2 and "test wga" in p.stdout
    r = json.loads(out.read_text())
    assert {"method", "dataset", "seed", "hparams", "best_epoch", "epochs_run", "seconds", "val", "test",
            "history"} <= set(r)
    assert r["hparams"]["method_params"]["rho"] == 0.5 and r["hparams"]["method_params"]["scope"] == "last_layer"
    assert r["hparams"]["lr"] == 0.05 and r["hparams"]["model"] == "cnn"  # dataset defaults filled in
    assert {"group", "acc", "count", "y", "a"} == set(r["test"]["groups"][0])
    groups = r["test"]["groups"]
    assert [(g["y"], g["a"]) for g in groups] == [(g["group"] // 2, g["group"] % 2) for g in groups]
    assert {"epoch", "train_loss", "val_wga", "violated_frac", "lambda_share", "lambda_enrichment", "at_cap_frac",
            "at_zero_frac"} <= set(r["history"][-1])
    assert 0 <= r["history"][-1]["at_cap_frac"] + r["history"][-1]["at_zero_frac"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--method", "erm", "--eta-q", "0.1"], "error: --eta-q is a parameter of groupdro, not of erm"),
    (["--dataset", "waterbirds", "--data-dir", "/nonexistent/wb"], "error: /nonexistent/wb: data directory not found"),
    (["--epochs", "0"], "error: epochs must be an integer >= 1 or unset, got 0"),
    (["--method", "fim", "--rho", "2"], "error: fim.rho must be a finite number in (0.0, 1.0], got 2.0"),
    # argparse's own refusals, in the same one line (not its usage text)
    (["--method", "fim", "--lambda-max", "big"],
     "error: argument --lambda-max: invalid float value: 'big' (see python -m trainer --help)"),
    (["--epochs"], "error: argument --epochs: expected one argument (see python -m trainer --help)"),
    (["--lamda-max", "2"], "error: unrecognized arguments: --lamda-max 2 (see python -m trainer --help)"),
])
def test_cli_bad_input_is_one_line_error(args, message, tmp_path):
    out = tmp_path / "result.json"
    p = run_trainer("--dataset", "synthetic", *args, "--output", str(out))
    assert p.returncode != 0
    assert p.stderr.strip() == message
    assert not out.exists()


def test_cli_unknown_method_rejected():
    p = run_trainer("--method", "irm")
    assert p.returncode == 2 and p.stderr.startswith("error: unknown method 'irm' (choose from erm, ")
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_resnet_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"pretrained resnet18 weights not found: copy resnet18-.*\.pth into"):
        build_model("resnet18", 2, pretrained=True)


def test_resnet_loads_weights_file_and_replaces_head(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 3, weights_path=str(tmp_path / "r18.pth"))
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)
    logits, h = model(torch.randn(2, 3, 64, 64), return_features=True)
    assert logits.shape == (2, 3) and h.shape == (2, 512)
    with pytest.raises(ValueError, match="do not match the architecture"):
        build_model("resnet50", 2, weights_path=str(tmp_path / "r18.pth"))
