"""The method contract: what a method is given, what it declares, and that one step skeleton serves every method."""
import pytest
import torch

from study.experiment import Experiment
from trainer import TrainConfig, fit
from trainer.cli import get_args_parser, method_flags, method_params_from_args
from trainer.methods import METHODS, Method, TrainSplit
from trainer.methods.base import Choice
from trainer.settings import check

def test_group_ids_reach_only_the_methods_that_declare_them():
    labels, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
    for name, cls in METHODS.items():
        view = TrainSplit.view(cls, labels, groups, 2, 4)
        assert (view.groups is not None) == (cls.group_labels == "train"), name
        method = cls(cls.Params(), view)
        if cls.group_labels == "train":
            assert torch.equal(method.train_group_ids, groups), name
        else:
            with pytest.raises(RuntimeError, match="is given no training group ids"):
                method.train_group_ids


def test_only_the_methods_whose_step_differs_own_it():
    """One step skeleton (Method.training_step): no method overrides it; the whole forward/backward is owned only
    where it is not one loss's gradient (SAM's two passes, the full-scope constraint's double backprop)."""
    assert [n for n, c in METHODS.items() if c.training_step is not Method.training_step] == []
    owners = {n for n, c in METHODS.items() if c.gradients is not Method.gradients}
    assert owners == {"sam", "fim", "fim_relative"}  # fim_relative inherits fim's


def test_a_parameter_name_means_one_thing_across_the_registry():
    helps: dict[str, set] = {}
    for cls in METHODS.values():
        for f in cls.param_fields():
            helps.setdefault(f.name, set()).add(f.metadata["help"])
    assert {name: texts for name, texts in helps.items() if len(texts) > 1} == {}
    assert method_flags()["rho"] == ["fim", "fim_relative"] and method_flags()["radius"] == ["sam"]
    # `--rho` fixes Ours' active fraction only; SAM's radius has a flag of its own
    args = get_args_parser().parse_args(["--rho", "0.2", "--radius", "0.1"])
    assert method_params_from_args(args, ["fim", "sam"]) == {"fim": {"rho": 0.2}, "sam": {"radius": 0.1}}


def test_every_search_range_lies_in_its_parameters_domain():
    for name, cls in METHODS.items():
        declared = {f.name: f for f in cls.param_fields()}
        for pname, spec in cls.SPACE.items():
            values = spec.choices if isinstance(spec, Choice) else (spec.low, spec.high)
            for v in values:
                check(declared[pname], v, f"{name}.")  # raises, naming it, when outside


@pytest.mark.parametrize("space, expect", [
    ({"lff": {"q": [0.5, 1.5]}}, "search space lff.q: value 1.5 is not accepted (lff.q must be a finite number in "
                                 "(0.0, 1.0], got 1.5)"),
    ({"lff": {"ema_alpha": [0.5, 1.0]}}, "search space lff.ema_alpha: value 1.0 is not accepted (lff.ema_alpha must "
                                         "be a finite number in [0.0, 1.0), got 1.0)"),
])
def test_a_search_range_outside_the_domain_is_refused_naming_it(space, expect):
    with pytest.raises(ValueError) as e:
        Experiment.of(name="x", datasets=["synthetic"], methods=list(space), space=space)
    assert expect in str(e.value)


@pytest.mark.parametrize("method, params, expect", [
    ("groupdro", {"eta_q": 0.0}, "eta_q must be a finite number > 0.0, got 0.0"),
    ("lff", {"q": 1.5}, "q must be a finite number in (0.0, 1.0], got 1.5"),
    ("jtt", {"up": 0.5}, "up must be a finite number >= 1.0, got 0.5"),
    ("dfr", {"c_grid": "1,x"}, "c_grid: must be comma-separated numbers > 0, got '1,x'"),
    ("latent_aug", {"latent_dim": 1}, "latent_dim must be an integer from 2 to 1024, got 1"),
])
def test_a_parameter_outside_its_declared_domain_is_refused_by_the_settings_and_the_method(method, params, expect):
    with pytest.raises(ValueError) as e:  # the command line, a TOML file and a stored study go through this
        TrainConfig(dataset="synthetic", method=method, method_params=params).resolved()
    assert f"{method}.{expect}" in str(e.value)
    cls = METHODS[method]
    with pytest.raises(ValueError) as e:  # and a method built directly checks the same declarations
        cls(cls.Params(**params), TrainSplit(torch.tensor([0, 1, 0, 1]), 2, 4, torch.arange(4)))
    assert expect in str(e.value)


def test_every_method_has_a_card():
    for name, cls in METHODS.items():
        assert cls.card.label and cls.card.family and cls.card.cites, name
    assert len({c.card.label for c in METHODS.values()}) == len(METHODS)  # one row each in the report


def test_the_manual_example_method_is_a_working_method(monkeypatch):
    """The manual's "Adding a method" example (docs/extending.md), as written there: registered, it trains, and its
    parameter's domain is checked like every other."""
    import re
    import types
    from pathlib import Path

    manual = (Path(__file__).parents[1] / "docs" / "extending.md").read_text()
    section = manual[manual.index("## Adding a method"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 16  # what a new method writes
    module = types.ModuleType("trainer.methods.focal")
    module.__package__ = "trainer.methods"
    exec(compile(code, "docs/extending.md", "exec"), module.__dict__)
    monkeypatch.setitem(METHODS, "focal", module.Focal)
    r = fit(TrainConfig(dataset="synthetic", method="focal", epochs=2, method_params={"gamma": 1.0}), log=None)
    assert r.hparams["method_params"] == {"gamma": 1.0} and r.history[-1]["train_loss"] < r.history[-1]["train_nll"]
    with pytest.raises(ValueError, match=r"focal.gamma must be a finite number >= 0.0, got -1.0"):
        TrainConfig(dataset="synthetic", method="focal", method_params={"gamma": -1.0}).resolved()
