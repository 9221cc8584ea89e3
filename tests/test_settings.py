"""Settings declared once: TrainConfig's and the methods' fields make both command lines, the TOML keys and the
checks; an experiment composes the trainer's config and can fix any run setting or method parameter."""
import shlex

import optuna
import pytest

from conftest import start_worker, study_main, trainer_main
from study.experiment import Experiment, init_experiment, load_experiment, search_space
from test_study import init, storage_for, studies_of
from trainer.cli import get_args_parser
from trainer.config import TRIAL, TrainConfig
from trainer.methods import METHODS
from trainer.settings import flag


def test_both_command_lines_are_generated_from_the_declarations(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one help entry per line
    trainer, init_help = trainer_main("--help").stdout, study_main("init", "--help").stdout
    for f in TrainConfig.settings():
        assert flag(f.name) in trainer and f.metadata["help"] in trainer, f.name
        in_init = flag(f.name) + " " in init_help or flag(f.name) + "," in init_help
        assert in_init == (f.metadata.get("scope") != TRIAL), f.name  # per-trial settings are the study's
    for cls in METHODS.values():
        for f in cls.param_fields():
            assert flag(f.name) in trainer and flag(f.name) in init_help, f.name
    # the trainer's parser yields exactly TrainConfig's fields (and its method flags), nothing declared twice
    args = vars(get_args_parser().parse_args([]))
    assert {f.name for f in TrainConfig.settings()} <= set(args)
    assert all(v is None for k, v in args.items() if k != "progress")  # unset: the dataclass's default applies


@pytest.mark.parametrize("settings, expect", [
    ({"epochs": 0}, "epochs must be an integer >= 1 or unset, got 0"),
    ({"momentum": "high"}, "momentum must be a finite number >= 0.0, got 'high'"),
    ({"train_agreement": 1.5}, "train_agreement must be a finite number from 0.0 to 1.0, got 1.5"),
    ({"selection": "val_best"}, "unknown selection 'val_best' (choose from val_wga, val_worst_class, val_avg)"),
    ({"run": {"deterministic": "yes"}}, "deterministic must be true or false, got 'yes'"),
    ({"params": {"fim": {"lambda_max": "big"}}},
     "fim.lambda_max must be a finite number in (0.0, 1000000.0], got 'big'"),
    ({"params": {"fim": {"lambda_max": -1.0}}}, "fim.lambda_max must be a finite number in (0.0, 1000000.0], got -1.0"),
    ({"params": {"erm": {"rho": 0.2}}}, "unknown parameter(s) rho for method 'erm'"),
    ({"params": {"groupdro": {"eta_q": 0.1}}}, "params for groupdro: not a method of this experiment"),
    ({"device": "cuda"}, "unknown setting(s) device"),  # the worker's, not the experiment's
])
def test_an_experiment_checks_every_setting_against_its_declaration(settings, expect):
    with pytest.raises(ValueError) as e:
        Experiment.from_dict({"name": "x", "datasets": ["synthetic"], "methods": ["erm", "fim"], **settings})
    assert expect in str(e.value)


def test_a_fixed_setting_is_not_searched():
    exp = Experiment.of(name="x", datasets=["cmnist"], methods=["erm", "fim"], lr=0.02,
                        params={"fim": {"rho": 0.3, "lambda_max": 5.0}})
    fim, erm = search_space(exp, "cmnist", "fim"), search_space(exp, "cmnist", "erm")
    assert "lr" not in fim and "lr" not in erm and "rho" not in fim and "weight_decay" in fim
    assert exp.recipe("cmnist", "fim").resolved().method_params["lambda_max"] == 5.0
    with pytest.raises(ValueError, match="space override fim.rho: no such searched parameter .fixed by the exp"):
        Experiment.of(name="x", datasets=["cmnist"], methods=["fim"], params={"fim": {"rho": 0.3}},
                      space={"fim": {"rho": [0.1, 0.2]}})


def test_init_fixes_a_method_parameter_for_every_trial(pg_url):
    init(pg_url, "--experiment", "fixed", "--datasets", "synthetic", "--methods", "erm,fim", "--trials", "2",
         "--epochs", "2", "--lambda-max", "2.5", "--rho", "0.25", "--lr", "0.02", "--pruner", "none")
    studies = studies_of(pg_url, "fixed")
    assert studies["fixed/synthetic/fim"].user_attrs["experiment"]["params"] == {
        "fim": {"lambda_max": 2.5, "rho": 0.25}}
    assert studies["fixed/synthetic/erm"].user_attrs["experiment"]["run"]["lr"] == 0.02
    w = start_worker(pg_url, "fixed")
    out = w.communicate(timeout=600)[0]
    assert w.returncode == 0, out
    for name, study in studies_of(pg_url, "fixed").items():
        for t in study.trials:
            assert "lr" not in t.params and "rho" not in t.params, t.params  # fixed: not searched
            cmd = shlex.split(t.user_attrs["command"])
            assert cmd[cmd.index("--lr") + 1] == "0.02", cmd
            if name.startswith("fixed/synthetic/fim"):
                assert cmd[cmd.index("--lambda-max") + 1] == "2.5" and cmd[cmd.index("--rho") + 1] == "0.25"
    # a method flag that none of the experiment's methods has is one line, and nothing is written
    p = study_main("init", "--storage", pg_url, "--experiment", "other", "--datasets", "synthetic",
                   "--methods", "erm", "--lambda-max", "2")
    assert p.returncode == 2
    assert p.stderr.strip() == "error: --lambda-max is a parameter of fim/fim_relative, not of erm"
    assert not [n for n in optuna.get_all_study_names(storage_for(pg_url)) if n.startswith("other/")]
    # adding a method keeps the experiment's fixed settings; changing one is a named conflict
    p = study_main("init", "--storage", pg_url, "--experiment", "fixed", "--datasets", "synthetic",
                   "--methods", "fim", "--trials", "2", "--epochs", "2", "--lambda-max", "3", "--rho", "0.25",
                   "--lr", "0.02", "--pruner", "none")
    assert p.returncode == 2 and "different settings: params.fim.lambda_max: 2.5 -> 3.0 (a new" in p.stderr, p.stderr


def test_toml_params_and_flags_merge(pg_url, tmp_path):
    cfg = tmp_path / "e.toml"
    cfg.write_text('name = "tp"\ndatasets = ["synthetic"]\nmethods = ["fim"]\ntrials = 1\n[run]\nepochs = 3\n'
                   '[params.fim]\nlambda_max = 4.0\ndual_lr = 0.5\n')
    init(pg_url, "--config", str(cfg), "--dual-lr", "2.0")
    exp, _ = load_experiment(storage_for(pg_url), "tp")
    assert exp.run.epochs == 3 and exp.params == {"fim": {"lambda_max": 4.0, "dual_lr": 2.0}}


def test_an_experiment_stored_by_the_earlier_version_loads(pg_url):
    """Before run settings were TrainConfig's, a study stored them at the top level: read as they were."""
    s = storage_for(pg_url)
    exp = Experiment.of(name="old", datasets=["synthetic"], methods=["erm"], trials=1, epochs=3, seed=7)
    init_experiment(s, exp, check_data=False)
    flat = {"name": "old", "datasets": ["synthetic"], "methods": ["erm"], "trials": 1, "epochs": 3, "pruner": "median",
            "data_dir": None, "model": None, "pretrained": None, "weights": None, "augment": None, "freeze_bn": None,
            "deterministic": False, "image_size": None, "patience": None, "seed": 7, "data_seed": 0,
            "selection": "val_wga", "grad_clip": None, "space": {}}
    for name in optuna.get_all_study_names(s):
        s.set_study_user_attr(s.get_study_id_from_name(name), "experiment", flat)
    loaded, studies = load_experiment(s, "old")
    assert loaded.run.epochs == 3 and loaded.run.seed == 7 and len(studies) == 1
    assert loaded.settings() == exp.settings()
