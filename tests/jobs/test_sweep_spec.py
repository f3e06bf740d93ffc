"""Sweep specs: the shipped ones load, every bad [search] / [early-stopping] is one line before
anything runs, trials are a pure function of the spec, rungs and promotions are pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.jobs.kinds import Sweep
from pipeline.jobs.spec import SpecError, load_spec
from pipeline.jobs.sweep import EarlyStopping, SweepError, promote, rungs

REPO = Path(__file__).resolve().parents[2]

BASE = 'job = "sweep"\ndata = "d.zarr"\nsteps = 9\nbatch-size = 64\nshard-size = 16\n'


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    return p


def test_shipped_sweep_specs_load():
    spec = load_spec(REPO / "jobs" / "sweep-lr-reg.toml")
    plan = Sweep.plan(spec.options)
    assert spec.kind == "sweep" and plan.search.method == "random" and plan.search.trials == 16
    assert plan.base["train_limit"] == 10000 and plan.early_stopping == EarlyStopping(10, 3)
    trials = plan.search.settings()
    assert len(trials) == 16 and all(
        1e-4 <= t["lr"] <= 1e-2 and 1e-5 <= t["reg"] <= 1e-1 for t in trials
    )
    grid = Sweep.plan(load_spec(REPO / "jobs" / "sweep-grid.toml").options)
    assert grid.search.settings() == [
        {"norm": n, "hidden_dim": h} for n in ("none", "spatial_batchnorm") for h in (100, 250, 500)
    ]


def test_same_spec_same_trials_and_the_seed_changes_them(tmp_path):
    text = (
        BASE + "[search]\ntrials = 5\nlr = { log-uniform = [1e-4, 1e-2] }\n"
        "hidden-dim = { int-uniform = [8, 12] }\n"
        'norm = ["none", "groupnorm"]\nweight-scale = { uniform = [1e-3, 2e-3] }\n'
    )
    a = Sweep.plan(load_spec(write(tmp_path, text)).options).search.settings()
    b = Sweep.plan(load_spec(write(tmp_path, text)).options).search.settings()
    c = Sweep.plan(load_spec(write(tmp_path, text), ["search.seed=1"]).options).search.settings()
    assert a == b and a != c and len(a) == 5
    assert all(isinstance(t["hidden_dim"], int) and 8 <= t["hidden_dim"] <= 12 for t in a)
    assert all(type(t["lr"]) is float and type(t["weight_scale"]) is float for t in a)


def test_a_sweep_searches_networks_optimizers_schedules_and_augmentation(tmp_path):
    """Any key a train job computes with is searchable: the model's text, the optimizer, the
    schedule, the flips; each trial's TrainConfig is the base with its values."""
    small = "conv 8 3, relu, pool 2, affine"
    bn_gap = "conv 8 3, bn, gelu, gap, affine"
    text = (
        BASE + '[search]\nmethod = "grid"\n'
        f'model = ["{small}", "{bn_gap}"]\noptimizer = ["adam", "sgd"]\n'
        'schedule = ["constant", "cosine"]\nflip = ["none", "alternate"]\n'
    )
    plan = Sweep.plan(load_spec(write(tmp_path, text)).options)
    trials = plan.search.settings()
    assert len(trials) == 16 and trials[0] == {
        "model": small, "optimizer": "adam", "schedule": "constant", "flip": "none"
    }  # fmt: skip
    config = plan.trial_config(trials[-1], str(tmp_path / "t15"), 9)
    assert (config.model, config.optimizer, config.schedule, config.flip) == (
        bn_gap, "sgd", "cosine", "alternate"
    )  # fmt: skip
    assert (config.batch_size, config.steps) == (64, 9)  # the base's and the rung's


@pytest.mark.parametrize(
    "search, words",
    [
        ("lr = []", "[search] lr: empty list of values"),
        ("lr = { uniform = [1e-2, 1e-3] }", "[search] lr: empty range"),
        ("lr = { log-uniform = [0, 1e-3] }", "log-uniform needs low > 0"),
        ("lr = { normal = [0, 1] }", "unknown range 'normal'"),
        ("lr = { uniform = [1e-3] }", "takes [low, high]"),
        (
            "hidden-dim = [16, 0]",
            "hidden-dim: value 0 would be refused by a train job: hidden_dim must be >= 1",
        ),
        (
            "hidden-dim = { uniform = [8, 16] }",
            "hidden-dim: value 8.0 would be refused by a train job",
        ),
        ("filter-size = { int-uniform = [3, 4] }", "filter_size must be odd"),
        ('norm = ["none", "layernorm"]', "unknown norm 'layernorm'"),
        (
            'model = ["conv 8 3, relu, affine", "conv 8 3, frobnicate, affine"]',
            "model: value 'conv 8 3, frobnicate, affine' would be refused by a train job: "
            "model layer 2 'frobnicate': unknown layer 'frobnicate'",
        ),
        ('model = ["conv 8 3, pool 64, affine"]', "a 64x64 pool leaves no pixels"),
        ('flip = ["none", "sideways"]', "unknown flip 'sideways': expected one of none, random"),
        ("lr = [-1.0]", "lr must be > 0"),
        ("leraning-rate = [1e-3]", "[search]: unknown key 'leraning-rate' (neither"),
        ('data = ["a.zarr"]', "data: says where or how a trial runs"),
        ('method = "bayes"\nlr = [1e-3]', "unknown method 'bayes'"),
        ('metric = "loss"\nlr = [1e-3]', "unknown metric 'loss'"),
        ("trials = 0\nlr = [1e-3]", "trials must be an integer >= 1"),
        (
            'method = "grid"\nlr = { uniform = [1e-3, 1e-2] }',
            "a grid search takes a list of values",
        ),
        ('method = "grid"\ntrials = 3\nlr = [1e-3]', "remove trials"),
        ("seed = 1", "no setting to search"),
        ("parallel = 0\nlr = [1e-3]", "parallel must be an integer >= 1"),
    ],
)
def test_a_bad_search_table_is_one_line_naming_the_setting(tmp_path, search, words):
    path = write(tmp_path, BASE + "[search]\n" + search + "\n")
    with pytest.raises((SweepError, SpecError)) as err:
        load_spec(path)
    assert words in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "table, words",
    [
        ("[early-stopping]\nreduction-factor = 3", "missing min-steps"),
        ("[early-stopping]\nmin-steps = 0", "min-steps must be an integer >= 1, got 0"),
        (
            "[early-stopping]\nmin-steps = 2\nreduction-factor = 1",
            "reduction-factor must be an integer >= 2",
        ),
        ("[early-stopping]\nmin-steps = 2\npatience = 1", "unknown key 'patience'"),
    ],
)
def test_a_bad_early_stopping_table_is_one_line(tmp_path, table, words):
    path = write(tmp_path, BASE + "[search]\nlr = [1e-3, 1e-2]\n" + table + "\n")
    with pytest.raises(SweepError, match=".*") as err:
        load_spec(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_the_base_settings_are_a_train_jobs_and_tables_stay_sweep_only(tmp_path):
    with pytest.raises(SpecError, match="batch-size must be >= 1"):
        load_spec(
            write(
                tmp_path,
                BASE.replace("batch-size = 64", "batch-size = 0") + "[search]\nlr = [1e-3]\n",
            )
        )
    with pytest.raises(SpecError, match="missing .*search|needs a \\[search\\] table"):
        load_spec(write(tmp_path, BASE))
    with pytest.raises(SpecError, match=r"unexpected table \[search\]"):
        load_spec(write(tmp_path, BASE.replace('"sweep"', '"train"') + "[search]\nlr = [1e-3]\n"))


def test_cli_submit_refuses_a_bad_sweep_in_one_line_before_connecting(tmp_path, capsys):
    path = write(
        tmp_path,
        BASE + 'scheduler = "tcp://127.0.0.1:9"\n[search]\nlr = { uniform = [0.0, 1e-2] }\n',
    )
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0
        and "lr: value 0.0 would be refused by a train job: lr must be > 0" in err
    )


def test_rungs_multiply_by_the_factor_and_end_at_the_trials_end():
    assert rungs(27, EarlyStopping(1, 3)) == [1, 3, 9, 27]
    assert rungs(30, EarlyStopping(2, 3)) == [2, 6, 18, 30]
    assert rungs(5, EarlyStopping(8, 2)) == [5]
    assert rungs(30, None) == [30]


def test_promotion_keeps_the_best_third_ties_to_the_lower_id_failed_never():
    scores = {0: 0.5, 1: 0.7, 2: 0.7, 3: None, 4: 0.1, 5: 0.9}
    assert promote(scores, 3) == [1, 5]  # 6 // 3 = 2: 0.9 (5), then 0.7 tie -> id 1
    assert promote(scores, 2) == [1, 2, 5]
    assert promote({0: None, 1: None}, 3) == []
    assert promote({4: 0.2}, 3) == [4]  # at least one goes on
