"""`convpipe train` / `convpipe evaluate` input errors: one line, exit code 2, no traceback,
nothing written."""

from __future__ import annotations

import pytest

from pipeline.cli import build_parser, main
from pipeline.cli.train import config_from_args
from tests.helpers.training import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(
        tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=64, n_val=16, n_test=16
    )


def _error(capsys, argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--shard-size", 100], "--shard-size 100 does not divide --batch-size 256"),
        (
            ["--norm", "layernorm"],
            "unknown norm 'layernorm': expected one of none, spatial_batchnorm, groupnorm",
        ),
        (
            ["--workers", 2, "--scheduler", "tcp://127.0.0.1:8786"],
            "workers and scheduler exclude each other",
        ),
        (["--train-limit", 1000], "--train-limit 1000 exceeds the 64 training images"),
        (["--workers", "3:1"], "expected N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got '3:1'"),
        (["--workers", "two"], "expected a number N or a range MIN:MAX, got 'two'"),
        (["--workers", 0], "expected N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got 0"),
    ],
)
def test_settings_that_do_not_fit_are_one_line_errors(store, tmp_path, capsys, extra, words):
    code, err = _error(capsys, ["train", "--data", store, "--out", tmp_path / "run", *extra])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("convpipe: error: ") and words in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_missing_and_incompatible_stores(tmp_path, capsys):
    code, err = _error(
        capsys, ["train", "--data", tmp_path / "absent.zarr", "--out", tmp_path / "run"]
    )
    assert code == 2 and err.count("\n") == 1 and "absent.zarr" in err and "no data store" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "zarr.json").write_text(
        '{"node_type": "group", "attributes": {"format": "x"}}'
    )
    code, err = _error(capsys, ["train", "--data", tmp_path / "other"])
    assert code == 2 and err.count("\n") == 1 and "not a convpipe CIFAR store" in err


def test_unreachable_scheduler_is_one_line(store, tmp_path, capsys):
    code, err = _error(
        capsys,
        ["train", "--data", store, "--scheduler", "tcp://127.0.0.1:9", "--out", tmp_path / "run"],
    )
    assert code == 2 and err.count("\n") == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_resume_and_evaluate_need_a_run_directory(tmp_path, capsys):
    code, err = _error(capsys, ["train", "--resume", tmp_path])
    assert code == 2 and err.count("\n") == 1 and "not a convpipe run directory" in err
    code, err = _error(capsys, ["evaluate", tmp_path])
    assert code == 2 and err.count("\n") == 1 and "not a convpipe run directory" in err


def test_options_map_onto_train_config(tmp_path):
    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "s.zarr",
            "--batch-size",
            "64",
            "--shard-size",
            "32",
            "--norm",
            "spatial_batchnorm",
            "--lr",
            "3e-4",
            "--steps",
            "5",
        ]
    )
    c = config_from_args(args)
    assert (c.data, c.batch_size, c.shard_size, c.norm, c.lr, c.steps, c.epochs) == (
        "s.zarr",
        64,
        32,
        "spatial_batchnorm",
        3e-4,
        5,
        1,
    )
    assert c.hidden_dim == 500 and c.workers is None  # untouched options keep their defaults


def _fresh_machine(tmp_path, monkeypatch):
    """A working directory whose data/ holds only a CIFAR-10 archive, as a user's would."""
    from tests.helpers.data import md5, write_cifar_archive

    monkeypatch.chdir(tmp_path)
    archive, _ = write_cifar_archive(tmp_path / "data", per_batch=220, n_test=20)
    return archive, md5(archive)


@pytest.mark.parametrize("no_verify", [False, True])
def test_train_prepares_the_default_store_on_first_run(tmp_path, monkeypatch, capsys, no_verify):
    """An archive standing in for the official one; or a non-official copy with --no-verify,
    the flag the md5 error names (passed on to the preparation)."""
    import pipeline.data.sources as sources
    from pipeline.data import open_store

    archive, digest = _fresh_machine(tmp_path, monkeypatch)
    if not no_verify:
        monkeypatch.setattr(sources, "OFFICIAL_MD5", digest)
    code = main(
        ["train"]
        + (["--no-verify"] if no_verify else [])
        + [
            "--steps",
            "1",
            "--batch-size",
            "16",
            "--shard-size",
            "16",
            "--workers",
            "1",
            "--num-filters",
            "2",
            "--hidden-dim",
            "8",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "preparing it first" in err
    assert open_store(tmp_path / "data" / "cifar10.zarr").splits == {
        "train": 100,
        "val": 1000,
        "test": 20,
    }
    assert (tmp_path / "run" / "params.npz").is_file()


def test_train_first_run_with_an_unofficial_archive_stops_before_training(
    tmp_path, monkeypatch, capsys
):
    archive, digest = _fresh_machine(tmp_path, monkeypatch)
    code = main(["train", "--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and err[-1].startswith("convpipe: error: ")
        and digest in err[-1]
        and "--no-verify" in err[-1]
    )
    assert not (tmp_path / "run").exists()


def test_a_value_argparse_refuses_is_one_line_not_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--lr", "abc"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage:" not in err
    assert err == (
        "convpipe train: error: argument --lr: expected float, got 'abc' "
        "(see convpipe train --help)\n"
    )


def test_train_help_says_where_runs_and_jobs_write(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "runs/<date>-<time>/ under the current directory" in out
    assert "a job (`convpipe submit`) writes its run under the data root instead" in out
    assert "ROOT/runs/<job id>/" in out and "--no-verify" in out


def test_the_progress_bars_images_per_second_is_wall_clock_over_recent_steps():
    """A step's own time made the step after an evaluation (computed while the coordinator
    scored) read 10,000-17,000 images/s; the bar measures the last steps on the wall clock."""
    import pipeline.cli.train as cli_train

    clock = iter([0.0, 1.0, 2.0, 2.01, 3.01])
    bar = cli_train._Progress(clock=lambda: next(clock))
    rates = [bar._rate(100) for _ in range(5)]
    assert rates[0] is None
    assert rates[1:] == pytest.approx([100.0, 100.0, 300 / 2.01, 400 / 3.01])


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", ""], "--model: empty network spec (leave it out for the three-layer net"),
        (["--model", "  "], "--model: empty network spec (leave it out for the three-layer net"),
        (
            ["--model", "conv 16 3, relu, affine 7"],
            "--model: the network ends with (7,), expected one score per class (10,): end it "
            "with 'affine' (no units: one per class) or 'affine 10'",
        ),
        # a run with no steps, and schedules that leave none to come down on
        (["--schedule", "cosine", "--steps", "0"], "steps must be >= 1, got 0"),
        (["--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--schedule", "triangular", "--warmup", "1.5"], "warmup must be in [0, 1], got 1.5"),
        (
            ["--schedule", "triangular", "--warmup", "1"],
            "warmup must be < 1 (a fraction of the run), got 1.0",
        ),
    ],
)
def test_a_model_or_schedule_that_cannot_run_is_one_line(store, tmp_path, capsys, args, words):
    code, err = _error(capsys, ["train", "--data", store, "--out", tmp_path / "run", *args])
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"convpipe: error: {words}"), err
    assert not (tmp_path / "run").exists()


def _fake_train(monkeypatch, events: list[dict], summary: dict | None = None):
    """`convpipe train` with the coordinator's progress events and summary given (the training
    itself is not what these tests look at); KeyboardInterrupt after the events without one."""
    import pipeline.training

    def train(config, progress=None, **_):
        for event in events:
            progress(event)
        if summary is None:
            raise KeyboardInterrupt
        return summary

    monkeypatch.setattr(pipeline.training, "train", train)


START = {"event": "start", "run_dir": "runs/my run", "start_step": 40, "total_steps": 200}
START.update(workers=1, transport="shm", dashboard=None)


def test_ctrl_c_says_at_which_step_and_how_to_continue(store, monkeypatch, capsys):
    checkpoint = {"event": "checkpoint", "step": 52, "path": "runs/my run/checkpoints/x.npz"}
    _fake_train(monkeypatch, [START, checkpoint])
    code, err = _error(capsys, ["train", "--data", store, "--scheduler", "tcp://127.0.0.1:9"])
    assert code == 130
    assert err.splitlines()[-1] == (
        "convpipe: interrupted at step 52; continue with: convpipe train --resume 'runs/my run'"
    ), err
    _fake_train(monkeypatch, [START])  # no checkpoint this session: where it started
    code, err = _error(capsys, ["train", "--data", store, "--scheduler", "tcp://127.0.0.1:9"])
    assert err.splitlines()[-1].startswith("convpipe: interrupted at step 40; continue with:")
    _fake_train(monkeypatch, [])  # before the run started: nothing to continue
    code, err = _error(capsys, ["train", "--data", store, "--scheduler", "tcp://127.0.0.1:9"])
    assert (code, err) == (130, "convpipe: interrupted\n")


SUMMARY = {"train_acc": 0.5, "val_acc": 0.25, "test_acc": 0.125, "tta": "none", "steps": 124}
SUMMARY.update(seconds=21.0, run_dir="runs/r", workers=2)


@pytest.mark.parametrize(
    "session, line",
    [
        (  # resumed: 'seconds' counts the earlier sessions too; steps, time and rate are this one's
            {"steps_this_session": 84, "train_seconds": 12.5, "images_per_s": 1719.04},
            "84 steps this session in 12.5 s of training, 1,719 images/s on 2 workers",
        ),
        (
            {"steps": 1, "steps_this_session": 1, "train_seconds": 0.25, "workers": 1},
            "1 step in 0.2 s of training, 512 images/s on 1 worker",
        ),
    ],
)
def test_the_end_line_gives_this_sessions_steps_seconds_and_rate(
    store, monkeypatch, capsys, session, line
):
    summary = {**SUMMARY, "images_per_s": 512.0, **session}
    _fake_train(monkeypatch, [], summary)
    code = main(["train", "--data", str(store), "--scheduler", "tcp://127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 0
    assert (
        out == f"train acc 0.5000, val acc 0.2500, test acc 0.1250; {line}\nrun directory: runs/r\n"
    )
