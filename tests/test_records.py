"""The typed trial record: one migration for the records of earlier versions, a one-line refusal of newer ones, and
one ranking rule for every reader."""
import warnings

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from study.experiment import Experiment, init_experiment
from study.records import SCHEMA, Group, RecordError, best, plan, ranked, read
from study.storage import make_storage

DIST = {"lr": FloatDistribution(1e-3, 1e-1, log=True)}


def stored(state=TrialState.COMPLETE, value=0.5, **attrs):
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None, params={"lr": 0.01},
                        distributions=DIST, user_attrs=attrs)


def metrics(wga, avg=0.9, **more):
    return {"wga": wga, "avg_plain": avg, "avg_train_weighted": avg, **more}


def test_a_record_of_an_earlier_version_reads_through_the_migration():
    """Schema 1 (no `schema` attribute): no first own epoch, no worst-class accuracy, groups without y and a."""
    old = stored(seed=0, epochs_run=3, best_epoch=2, train_seconds=12.5,
                 val=metrics(0.5), test=metrics(0.4, groups=[{"group": 2, "acc": 0.4, "count": 10}]))
    r = read(old)
    assert r.run is not None and r.run.first_own_epoch == 1 and r.run.best_epoch == 2 and r.train_seconds == 12.5
    assert r.run.test.worst_class is None and r.run.test.groups == (Group(2, 0.4, 10),)
    assert r.run.test.groups[0].name == "group 2"
    new = stored(schema=SCHEMA, seed=0, epochs_run=3, best_epoch=2, first_own_epoch=2, val=metrics(0.5),
                 test=metrics(0.4, worst_class=0.3, groups=[{"group": 2, "acc": 0.4, "count": 10, "y": 1, "a": 0}]))
    m = read(new).run.test
    assert read(new).run.first_own_epoch == 2 and m.worst_class == 0.3 and m.groups[0].name == "y=1, a=0"


@pytest.mark.parametrize("schema", [SCHEMA + 1, 0, "2"])
def test_a_record_this_version_cannot_read_is_refused_naming_its_schema(schema):
    with pytest.raises(RecordError, match=f"trial -1 holds a record of schema {schema!r}; this version reads schemas "
                                          f"1 to {SCHEMA}"):
        read(stored(schema=schema, seed=0, val=metrics(0.5), test=metrics(0.4)))


def test_the_report_refuses_a_newer_record_in_one_line(tmp_path):
    from conftest import study_main
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = make_storage(url)
    init_experiment(s, Experiment.of(name="new", datasets=["synthetic"], methods=["erm"], trials=1, epochs=2),
                    check_data=False)
    optuna.load_study(study_name="new/synthetic/erm", storage=s).add_trial(
        stored(schema=SCHEMA + 1, seed=0, val=metrics(0.5), test=metrics(0.4)))
    p = study_main("report", "--storage", url, "--experiment", "new")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert f"schema {SCHEMA + 1}" in line and "newer version" in line, line


def test_one_ranking_rule_value_then_val_average_then_fewer_epochs_then_the_earlier_trial():
    def t(number, value, avg, epochs):
        frozen = stored(value=value, schema=SCHEMA, seed=0, epochs_run=epochs, val=metrics(value, avg),
                        test=metrics(0.1))
        frozen.number = number
        return read(frozen)
    trials = [t(0, 0.5, 0.9, 4), t(1, 0.6, 0.8, 4), t(2, 0.6, 0.9, 4), t(3, 0.6, 0.9, 3), t(4, 0.6, 0.9, 3)]
    assert [r.number for r in ranked(trials)] == [3, 4, 2, 1, 0]
    assert best(trials).number == 3 and best([]) is None


def test_a_trial_without_a_readable_result_is_no_run_and_never_a_crash():
    odd = [stored(seed=0, val="a string", test=metrics(0.4)), stored(seed=0, val=metrics(0.5)),
           stored(seed=None, val=metrics(0.5), test=metrics(0.4)), stored(seed=True, val=metrics(0.5),
                                                                        test=metrics(0.4)),
           stored(seed=0, val=metrics(0.5), test={"wga": 0.4, "avg_plain": 0.9}),  # no train-weighted average
           stored(seed=0, val=metrics(0.5), test=metrics(float("nan"))),
           stored(TrialState.PRUNED, seed=0, val=metrics(0.5), test=metrics(0.4), train_seconds="ten")]
    records = [read(t) for t in odd]
    assert [r.run for r in records] == [None] * len(odd) and ranked(records) == []
    assert records[-1].train_seconds == 0.0


def test_the_plan_is_what_a_retry_inherits():
    from study.records import inherited
    p = plan(3, config=7, rank=1)
    assert p == {"schema": SCHEMA, "seed": 3, "config": 7, "rank": 1} and plan(reference=True)["reference"] is True
    done = stored(**p, val=metrics(0.5), test=metrics(0.4), fail_reason="x", train_seconds=3.0)
    assert inherited(done) == p
