"""Job specs: the shipped specs load, and every kind of bad spec is one clear error before
anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cluster.security import TLSConfigError
from pipeline.jobs.spec import SpecError, load_spec
from pipeline.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [
    "prepare-cifar10",
    "train-three-layer",
    "train-spatial-bn",
    "train-groupnorm",
    "evaluate",
]


def write(tmp_path, text: str, name: str = "job.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs_load(name):
    spec = load_spec(REPO / "jobs" / f"{name}.toml")
    assert spec.kind == name.split("-")[0]
    assert spec.root == "data"
    if spec.kind == "train":
        config = TrainConfig.from_dict({**spec.options, "scheduler": None})
        assert (
            config.norm
            == {
                "train-three-layer": "none",
                "train-spatial-bn": "spatial_batchnorm",
                "train-groupnorm": "groupnorm",
            }[name]
        )
        assert config.data == "data/cifar10.zarr"


@pytest.mark.parametrize("name", ["train-airbench", "train-airbench-small"])
def test_the_airbench_recipes_load_as_networks_of_their_widths(name):
    from pipeline.netspec import NetSpec

    config = TrainConfig.from_job(load_spec(REPO / "jobs" / f"{name}.toml").options)
    spec = NetSpec.from_text(config.model)
    convs = [layer.filters for layer in spec.body if layer.kind == "conv"]
    widths = {"train-airbench": [24, 64, 64, 256, 256, 256, 256]}.get(
        name, [24, 32, 32, 64, 64, 64, 64]
    )
    assert convs == widths and spec.body[1].init == "whiten"
    assert {layer.momentum for layer in spec.body if layer.kind == "bn"} == {0.6}
    assert spec.shapes((3, 32, 32), 10)[-1] == (10,) and spec.smoothing == 0.2
    assert (config.optimizer, config.schedule, config.flip, config.tta, config.lookahead) == (
        "sgd", "triangular", "alternate", "flip-translate", 5
    )  # fmt: skip


def test_the_muon_recipe_is_the_airbench_network_with_muon_for_six_and_a_third_epochs():
    from pipeline.netspec import NetSpec

    plain = TrainConfig.from_job(load_spec(REPO / "jobs" / "train-airbench.toml").options)
    config = TrainConfig.from_job(load_spec(REPO / "jobs" / "train-airbench-muon.toml").options)
    assert NetSpec.from_text(config.model) == NetSpec.from_text(plain.model)
    assert (config.optimizer, config.muon_lr, config.muon_momentum) == ("sgd", 0.16, 0.6)
    assert (config.epochs, config.steps, config.batch_size) == (7, 304, 1024)  # 48 steps an epoch
    assert config.whiten_bias_epochs == 3 and config.lookahead == 5


def test_train_specs_set_every_cli_option_or_comment_it():
    """'complete': each TrainConfig field appears in the train specs, set or commented out."""
    names = {f.replace("_", "-") for f in TrainConfig.__dataclass_fields__} - {"scheduler"}
    for name in ("train-three-layer", "train-spatial-bn", "train-groupnorm"):
        text = (REPO / "jobs" / f"{name}.toml").read_text()
        missing = [n for n in sorted(names) if f"{n} =" not in text]
        assert not missing, f"{name}.toml does not mention {missing}"


def test_dashes_and_underscores_are_the_same_key(tmp_path):
    a = load_spec(write(tmp_path, 'job = "train"\nbatch-size = 64\nshard_size = 32\n'))
    assert a.options["batch_size"] == 64 and a.options["shard_size"] == 32
    with pytest.raises(SpecError, match="given twice"):
        load_spec(write(tmp_path, 'job = "train"\nbatch-size = 64\nbatch_size = 32\n'))


@pytest.mark.parametrize(
    "text, match",
    [
        ('job = "train"\nbatch-sise = 64\n', r"job.toml: unknown key 'batch-sise' for a train job"),
        ('job = "train"\nepochs = "two"\n', r"job.toml: epochs must be int, got 'two'"),
        ('job = "train"\nlr = true\n', r"lr must be float, got True"),
        (
            'job = "train"\nbatch-size = 100\nshard-size = 64\n',
            r"shard-size 64 does not divide batch-size 100",
        ),
        ('job = "train"\nnorm = "layernorm"\n', r"unknown norm 'layernorm'"),
        ("batch-size = 64\n", r"missing key 'job'"),
        ('job = "fly"\n', r"unknown job 'fly'"),
        ('job = "train"\n[optimizer]\nlr = 0.1\n', r"unexpected table \[optimizer\]"),
        ('job = "train"\n[model]\nnorm = "none"\n', r"job.toml: \[model\]: unknown key 'norm'"),
        (
            'job = "train"\n[model]\nlayers = ["conv 8 3", "pool 64", "affine"]\n',
            r"job.toml: model layer 2 'pool 64': a 64x64 pool leaves no pixels",
        ),
        ('job = "train"\nmodel = "conv 8 3"\n', r"the network ends with \(8, 32, 32\)"),
        ('job = "evaluate"\nrun = "x"\n[model]\nlayers = []\n', r"unexpected table \[model\]"),
        ('job = "train"\nepochs = \n', r"not valid TOML"),
        ('job = "prepare"\nval = -1\n', r"val must be >= 0"),
        ('job = "evaluate"\n', r"needs run ="),
        ('job = "evaluate"\nrun = "x"\nsplit = "dev"\n', r"unknown split 'dev'"),
        ('job = "evaluate"\nrun = "x"\ntta = "rotate"\n', r"unknown tta 'rotate' \(expected one"),
        ('job = "train"\ntta = "rotate"\n', r"unknown tta 'rotate': expected one of none, flip"),
        ('job = "train"\nflip = "sometimes"\n', r"unknown flip 'sometimes'"),
        ('job = "train"\nschedule = "linear"\n', r"unknown schedule 'linear'"),
        (
            'job = "train"\n[tls]\nca-file = "ca.pem"\n',
            r"\[tls\] needs ca-file, cert, key; missing cert, key",
        ),
        ('job = "train"\n[tls]\nca = "ca.pem"\n', r"unknown \[tls\] key 'ca'"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises((SpecError, TLSConfigError), match=match) as info:
        load_spec(path)
    assert "\n" not in str(info.value)


def test_a_model_table_or_list_is_the_models_one_line_text(tmp_path):
    table = load_spec(
        write(
            tmp_path,
            'job = "train"\n[model]\nlayers = ["Conv 8 3", {kind = "bn", momentum = 0.5}, '
            '"relu", "gap", "linear"]\n',
        )
    )
    assert table.options["model"] == "conv 8 3, bn momentum=0.5, relu, gap, affine"
    listed = load_spec(write(tmp_path, 'job = "train"\nmodel = ["conv 8 3", "gap", "affine"]\n'))
    assert listed.options["model"] == "conv 8 3, gap, affine"
    text = load_spec(write(tmp_path, 'job = "train"\nmodel = "conv 8 3, gap, affine"\n'))
    assert text.options["model"] == "conv 8 3, gap, affine"
    over = load_spec(write(tmp_path, 'job = "train"\n'), ["model=conv 4 5, gap, affine"])
    assert TrainConfig.from_job(over.options).model == "conv 4 5, gap, affine"


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")


def test_set_overrides_are_typed(tmp_path):
    path = write(tmp_path, 'job = "train"\n')
    spec = load_spec(
        path,
        [
            "epochs=3",
            "lr=0.01",
            "norm=groupnorm",
            "steps=none",
            "out=runs/x",
            "name=quick",
            "root=/srv/data",
            "scheduler=tcp://10.0.0.1:8786",
            "batch-size=64",
            "shard_size=32",
        ],
    )
    o = spec.options
    assert (o["epochs"], o["lr"], o["norm"], o["steps"], o["out"]) == (
        3,
        0.01,
        "groupnorm",
        None,
        "runs/x",
    )
    assert (o["batch_size"], o["shard_size"]) == (64, 32)
    assert (spec.name, spec.root, spec.scheduler) == ("quick", "/srv/data", "tcp://10.0.0.1:8786")
    assert isinstance(o["lr"], float) and isinstance(o["epochs"], int)
    p = load_spec(
        write(tmp_path, 'job = "prepare"\n', "p.toml"), ["no-verify=true", "force=yes", "chunk=500"]
    )
    assert (p.options["no_verify"], p.options["force"], p.options["chunk"]) == (True, True, 500)


def test_a_quoted_toml_string_in_set_is_that_string(tmp_path):
    """`--set 'norm="groupnorm"'` and `--set workers="1:2"` (quoted as in a spec) are the
    strings they quote; unquoted text stays as it is."""
    path = write(tmp_path, 'job = "train"\n')
    spec = load_spec(path, ['norm="groupnorm"', "workers='1:2'", 'out="runs/a b"'])
    assert (spec.options["norm"], spec.options["workers"]) == ("groupnorm", "1:2")
    assert spec.options["out"] == "runs/a b"
    spec = load_spec(path, ['workers="3"', 'name=it\'s "mine"'])
    assert TrainConfig.from_job(spec.options).workers == 3 and spec.name == 'it\'s "mine"'


def test_empty_text_is_none_but_for_a_setting_of_text_only(tmp_path):
    """`--set steps=` leaves steps unset; `--set model=` is an empty model (refused, as an empty
    source is, rather than read as "the three-layer net" or "the current directory")."""
    spec = load_spec(write(tmp_path, 'job = "train"\nsteps = 5\n'), ["steps=", "workers="])
    assert (spec.options["steps"], spec.options["workers"]) == (None, None)
    with pytest.raises(SpecError, match=r"^--set source=: source is empty \(leave it out"):
        load_spec(write(tmp_path, 'job = "prepare"\n', "p.toml"), ["source="])


@pytest.mark.parametrize(
    "override, match",
    [
        ("epochs=2.5", r"--set epochs: epochs must be int, got 2.5"),
        ("epoch=2", r"--set epoch: unknown key for a train job"),
        ("epochs", r"expected key=value"),
        (
            "shard-size=100",
            r"^--set shard-size=100: shard-size 100 does not divide batch-size 256",
        ),
        ("job=fly", r"unknown job 'fly'"),
        ("model=", r"^--set model=: model: empty network spec \(leave it out for the three"),
    ],
)
def test_bad_overrides(tmp_path, override, match):
    with pytest.raises(SpecError, match=match):
        load_spec(write(tmp_path, 'job = "train"\n'), [override])


def test_tls_paths_are_relative_to_the_spec(tmp_path):
    spec = load_spec(
        write(
            tmp_path,
            'job = "train"\n[tls]\nca-file = "c/ca.pem"\ncert = "c/me.pem"\nkey = "/k.pem"\n',
        )
    )
    assert spec.tls.ca_file == str(tmp_path / "c" / "ca.pem")
    assert spec.tls.key == "/k.pem"


def test_spec_round_trips_through_its_record(tmp_path):
    spec = load_spec(
        write(tmp_path, 'job = "train"\nname = "x"\nepochs = 2\nlr = 0.5\n'), ["out=o"]
    )
    again = load_spec(write(tmp_path, spec.to_toml(), "again.toml"))
    assert again.options == spec.options and again.name == "x"


def test_cli_submit_rejects_a_bad_spec_in_one_line_before_connecting(tmp_path, capsys):
    path = write(tmp_path, 'job = "train"\nepochs = "two"\nscheduler = "tcp://127.0.0.1:9"\n')
    assert main(["submit", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "epochs must be int" in err and str(path) in err


def test_job_options_and_train_settings_share_one_type_check():
    """A train job's options are TrainConfig's fields, typed and parsed by the same code."""
    from pipeline.jobs.kinds import Train
    from pipeline.training.config import parse_value

    options = Train.options()
    for text, name in (
        (".5", "lr"),
        ("1_000", "batch_size"),
        ("none", "steps"),
        ("1", "weight_scale"),
    ):
        assert options[name].parse(text, "--set") == parse_value(name, text)
    assert isinstance(parse_value("lr", "1"), float) and options["lr"].check(1, "spec") == 1.0
    assert options["steps"].value_type.name() == "int or none"
    with pytest.raises(SpecError, match=r"--set x: batch-size must be int, got 2.5"):
        options["batch_size"].parse("2.5", "--set x")
    with pytest.raises(SpecError, match=r"spec: lr must be float, got True"):
        options["lr"].check(True, "spec")


def test_spec_toml_round_trips_newlines_quotes_and_backslashes(tmp_path):
    tricky = 'two\nlines "quoted" \\ back\tslash'
    spec = load_spec(write(tmp_path, 'job = "train"\n'), [f"out=runs/{tricky}"])
    spec.name = tricky
    again = load_spec(write(tmp_path, spec.to_toml(), "again.toml"))
    assert again.name == tricky and again.options["out"] == f"runs/{tricky}"
    assert again.options == spec.options


SWEEP = 'job = "sweep"\ndata = "x"\n[search]\nlr = { log-uniform = [1e-4, 1e-2] }\n'


@pytest.mark.parametrize(
    "override, hint",
    [
        (
            "trials=4",
            "--set trials: unknown key for a sweep job (a key of the [search] table: "
            "--set search.trials=4)",
        ),
        ("min-steps=5", "(a key of the [early-stopping] table: --set early-stopping.min-steps=5)"),
    ],
)
def test_a_table_key_set_at_the_top_says_how_to_set_it(tmp_path, override, hint):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, SWEEP), [override])
    assert hint in str(err.value)
    fix = hint.rsplit("--set ", 1)[1].rstrip(")")  # the hint's own command works
    spec = load_spec(write(tmp_path, SWEEP + "[early-stopping]\nmin-steps = 1\n"), [fix])
    table, key = fix.split("=")[0].split(".")
    assert spec.options[table.replace("-", "_")][key.replace("-", "_")] == int(fix.split("=")[1])


def test_a_table_key_at_the_top_of_the_file_says_which_table(tmp_path):
    path = write(tmp_path, SWEEP.replace('data = "x"\n', 'data = "x"\ntrials = 4\n'))
    with pytest.raises(
        SpecError,
        match=r"unknown key 'trials' for a sweep job \(it belongs in "
        r"the \[search\] table\)",
    ):
        load_spec(path)


def test_a_bad_value_from_set_is_blamed_on_the_set_and_spelt_as_typed(tmp_path):
    path = write(tmp_path, 'job = "train"\nlr = 0.01\n')
    with pytest.raises(SpecError) as err:
        load_spec(path, ["lr=-1"])
    assert str(err.value) == "--set lr=-1: lr must be > 0, got -1.0"
    # the same value in the file names the file; a multi-word key as the spec spells it
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, 'job = "train"\nbatch-size = 0\n'), ["lr=0.5"])
    assert str(err.value) == f"{path}: batch-size must be >= 1, got 0"


@pytest.mark.parametrize(
    "sets, line",
    [
        (
            # blamed on the --set that gave the key, not on the last --set nor the file
            ["search.trails=[1,2]", "epochs=1"],
            "--set search.trails=[1,2]: [search]: unknown key 'trails' (did you mean trials?)",
        ),
        (
            ["search.trails=4"],
            "--set search.trails=4: [search]: unknown key 'trails' (did you mean trials?)",
        ),
        (
            ["epochs=1", "early-stopping.min-step=3"],
            "--set early-stopping.min-step=3: [early-stopping]: unknown key 'min-step' (did you "
            "mean min-steps?)",
        ),
        (
            ["search.trials=0", "steps=2"],
            "--set search.trials=0: [search]: trials must be an integer >= 1, got 0",
        ),
    ],
)
def test_a_bad_search_key_from_set_is_unknown_and_blamed_on_its_set(capsys, sets, line):
    argv = ["submit", str(REPO / "jobs" / "sweep-lr-reg.toml")]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 2
    assert capsys.readouterr().err == f"convpipe: error: {line}\n"


def test_a_typo_in_the_search_table_of_the_file_is_an_unknown_key(tmp_path, capsys):
    path = write(tmp_path, SWEEP + "trails = 4\n")
    assert main(["submit", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"convpipe: error: {path}: [search]: unknown key 'trails' (did you mean trials?)\n"
    )
