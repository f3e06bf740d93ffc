"""`convpipe data prepare|info|verify`: exit codes, one-line errors, default source search,
downloads, a conversion killed mid-way."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.cluster import connect
from pipeline.data import open_store, prepare
from pipeline.data import sources as S
from tests.helpers.data import (
    damage_chunk,
    make_image_folder,
    make_store,
    md5,
    write_cifar_archive,
)
from tests.helpers.wait import wait_until


@pytest.fixture(scope="module")
def client():
    with connect(workers=2, processes=False) as c:
        yield c


def _env():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("CONVPIPE_DATA", None)
    return env


def _run(*args, cwd):
    env = _env()
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_end_to_end_subprocess(tmp_path):
    """The real command on the embedded process cluster: default store under ./data, info,
    re-run no-op, and an md5 error that is one line with exit code 2."""
    write_cifar_archive(tmp_path / "data", per_batch=20, n_test=10)  # found in ./data
    r = _run(
        "data",
        "prepare",
        "--no-verify",
        "--val",
        "10",
        "--chunk",
        "16",
        "--workers",
        "2",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote data/cifar10.zarr: train 90, val 10, test 10 images" in r.stdout
    s = open_store(tmp_path / "data" / "cifar10.zarr")
    assert s.splits == {"train": 90, "val": 10, "test": 10}
    r = _run("data", "info", "data/cifar10.zarr", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for text in (
        "train      images uint8 (90, 3, 32, 32) chunks (16, 3, 32, 32) [blosc zstd level 1 "
        "bitshuffle, crc32c]",
        "integrity  protected: crc32c checksum on every chunk",
        "order      every split shuffled, seed 0; val: the last images of the pool",
        "classes    10: airplane",
        f"md5 {md5(tmp_path / 'data' / 'cifar-10-python.tar.gz')}",
        "on disk",
    ):
        assert text in r.stdout
    r = _run("data", "prepare", "--no-verify", "--val", "10", cwd=tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = _run("data", "prepare", "--out", "other.zarr", cwd=tmp_path)  # verification on
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("convpipe: error: data/cifar-10-python.tar.gz: md5 ")
    assert not (tmp_path / "other.zarr").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["data", "prepare", "--source", "nowhere.tar.gz", "--out", "x.zarr"],
            "nowhere.tar.gz: no such file or folder",
        ),
        (["data", "prepare", "--val", "-1"], "val must be an integer >= 0"),
        (["data", "prepare", "--chunk", "0"], "chunk must be an integer >= 1"),
        (["data", "prepare", "--workers", "0"], "--workers must be >= 1"),
        (["data", "info", "missing.zarr"], "missing.zarr: no data store here"),
    ],
)
def test_cli_errors_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("convpipe: error: ") and message in err and err.count("\n") == 1


def test_cli_help(capsys):
    for argv in (["data", "--help"], ["data", "prepare", "--help"], ["data", "info", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in (
        "--source",
        "--out",
        "--val",
        "--chunk",
        "--scheduler",
        "--force",
        "--no-verify",
        "--workers",
    ):
        assert opt in out
    assert main(["data"]) == 2


def test_default_source_download(tmp_path, client, monkeypatch):
    """Nothing found: the 'official' URL (here a file:// fixture) is downloaded into data/."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "nokeras"))
    arc, truth = write_cifar_archive(tmp_path / "www", per_batch=6, n_test=4)
    monkeypatch.setattr(S, "OFFICIAL_URL", arc.as_uri())
    root = tmp_path / "data"
    with pytest.raises(
        Exception, match="expected c58f30108f718f92721af3b95e74349a; nothing was saved"
    ):
        prepare(None, tmp_path / "s.zarr", data_root=root, client=client)
    assert not (root / "cifar-10-python.tar.gz").exists() and list(root.iterdir()) == []
    r = prepare(None, tmp_path / "s.zarr", val=2, data_root=root, verify=False, client=client)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == arc.read_bytes()
    assert r.splits == {"train": 28, "val": 2, "test": 4}
    from pipeline.data.shuffle import split_rows

    np.testing.assert_array_equal(
        open_store(tmp_path / "s.zarr").read_uint8("test")[0],
        truth["test_X"][split_rows(30, 4, 2, shuffle_pool=False)["test"]],
    )


def test_url_source(tmp_path, client, http_server):  # noqa: F811
    www, base = http_server
    write_cifar_archive(www, per_batch=6, n_test=4)
    root = tmp_path / "data"
    url = f"{base}/cifar-10-python.tar.gz"
    with pytest.raises(
        Exception, match="is not the official CIFAR-10 archive's .*nothing was saved"
    ):
        prepare(url, tmp_path / "s.zarr", data_root=root, client=client)
    assert not (root / "cifar-10-python.tar.gz").exists()
    r = prepare(url, tmp_path / "s.zarr", val=2, data_root=root, verify=False, client=client)
    assert r.source["path"] == str((root / "cifar-10-python.tar.gz").resolve())


def test_killed_conversion_leaves_no_complete_store(tmp_path, client):
    """SIGKILL in the middle of a conversion: no store under the final name, the partial one
    is never taken for complete, and the next run rebuilds and removes it.

    One image of the source is a named pipe that nobody writes: the task that reads it
    blocks, so the conversion cannot finish, while the other worker writes chunks. The
    test kills the command once a chunk is written: always in the middle."""
    import signal

    from pipeline.data.store import store_state

    root = tmp_path / "img"
    truth = make_image_folder(
        root, per_class_train=8, per_class_test=4, classes=("cat", "dog", "emu")
    )
    blocker = root / "train" / "dog" / "0003.png"
    image = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "data",
            "prepare",
            "--source",
            str(root),
            "--out",
            "s.zarr",
            "--val",
            "3",
            "--chunk",
            "2",
            "--workers",
            "2",
        ],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def written():  # the partial stores holding a chunk
            return [p for p in tmp_path.glob("s.zarr.partial.*") if any(p.glob("*/images/c/*"))]

        # the partial stores, or True if the conversion ended first
        partial = wait_until(
            lambda: written() or proc.poll() is not None, timeout=120, what="a chunk written"
        )
        assert proc.poll() is None, f"the conversion ended on its own: {proc.stderr.read()}"
        assert partial, "no chunk written within 120 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not (tmp_path / "s.zarr").exists()
    assert store_state(partial[0]) == "incomplete"
    blocker.unlink()
    blocker.write_bytes(image)
    r = prepare(root, tmp_path / "s.zarr", val=3, chunk=2, client=client)
    assert not r.skipped and r.splits == {"train": 21, "val": 3, "test": 12} and r.kept == []
    assert not any(tmp_path.glob("s.zarr.*"))  # the dead run's partial removed
    X, y = open_store(tmp_path / "s.zarr").read_uint8("test")
    expect = sorted((img.tobytes(), c) for img, c in truth["test"].values())
    assert sorted(zip((x.tobytes() for x in X), y.tolist())) == expect


def test_cli_verify_and_info(tmp_path, monkeypatch, capsys):
    """verify: "all N chunks intact", or one line per damaged chunk and exit 1; info says
    whether a store is protected and how it is ordered; both default to $CONVPIPE_DATA."""
    monkeypatch.setenv("CONVPIPE_DATA", str(tmp_path))
    p = tmp_path / "cifar10.zarr"
    make_store(p, {"train": 250, "val": 30, "test": 60}, chunk=100)
    assert main(["data", "verify"]) == 0
    assert capsys.readouterr().out == f"{p}: all 11 chunks intact (crc32c checksums match)\n"
    assert main(["data", "info"]) == 0
    out = capsys.readouterr().out
    assert "integrity  protected: crc32c checksum on every chunk" in out
    assert "order      every split shuffled, seed 0" in out
    f1 = damage_chunk(p, "train", 1)
    f2 = damage_chunk(p, "val", 0, array="labels", nbytes=1)
    assert main(["data", "verify", str(p)]) == 1
    cap = capsys.readouterr()
    assert cap.out.splitlines() == [
        f"{p}: damaged chunk: split 'train', images chunk 1 "
        f"(rows 100-199, file {f1.relative_to(p)}): "
        "crc32c checksum mismatch (its bytes changed after it was written)",
        f"{p}: damaged chunk: split 'val', labels chunk 0 (rows 0-29, file {f2.relative_to(p)}): "
        "crc32c checksum mismatch (its bytes changed after it was written)",
    ]
    assert cap.err.count("\n") == 1 and "2 of 11 chunks damaged" in cap.err


def test_cli_old_format_store_is_unprotected(tmp_path, capsys):
    p = tmp_path / "old.zarr"
    make_store(p, {"train": 20, "val": 10, "test": 10}, chunk=10, old_format=True)
    assert main(["data", "info", str(p)]) == 0
    out = capsys.readouterr().out
    assert "integrity  UNPROTECTED: no checksums (format 1)" in out
    assert "order      not shuffled (format 1)" in out
    assert main(["data", "verify", str(p)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"{p}: all 9 chunks decode, but the store is UNPROTECTED (format 1, no checksums)"
    )
    assert "`convpipe data prepare --force` rebuilds it with checksums" in out


def test_cli_offline_download_is_one_line(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "nokeras"))
    monkeypatch.setenv("CONVPIPE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(S, "OFFICIAL_URL", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    assert main(["data", "prepare", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"convpipe: error: http://127.0.0.1:{port}/")
    assert "download failed" in err and "`convpipe data prepare --source PATH`" in err
    assert not (tmp_path / "data" / "cifar10.zarr").exists()
