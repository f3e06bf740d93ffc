"""`convpipe data prepare|info`: exit codes, one-line errors, default source search, downloads."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.cluster import connect
from pipeline.data import open_store, prepare
from pipeline.data import sources as S
from tests.data_fixtures import md5, write_cifar_archive
from tests.test_data_sources import http_server  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def client():
    with connect(workers=2, processes=False) as c:
        yield c


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_subprocess(tmp_path):
    """The real command on the embedded process cluster: default store under ./data, info,
    re-run no-op, and an md5 error that is one line with exit code 2."""
    write_cifar_archive(tmp_path / "data", per_batch=20, n_test=10)   # found in ./data
    r = _run("data", "prepare", "--no-verify", "--val", "10", "--chunk", "16", "--workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote data/cifar10.zarr: train 90, val 10, test 10 images" in r.stdout
    s = open_store(tmp_path / "data" / "cifar10.zarr")
    assert s.splits == {"train": 90, "val": 10, "test": 10}
    r = _run("data", "info", "data/cifar10.zarr", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for text in ("train      images uint8 (90, 3, 32, 32) chunks (16, 3, 32, 32) [blosc zstd",
                 "classes    10: airplane", f"md5 {md5(tmp_path / 'data' / 'cifar-10-python.tar.gz')}",
                 "on disk"):
        assert text in r.stdout
    r = _run("data", "prepare", "--no-verify", "--val", "10", cwd=tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = _run("data", "prepare", "--out", "other.zarr", cwd=tmp_path)  # verification on
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("convpipe: error: data/cifar-10-python.tar.gz: md5 ")
    assert not (tmp_path / "other.zarr").exists()


@pytest.mark.parametrize("argv,message", [
    (["data", "prepare", "--source", "nowhere.tar.gz", "--out", "x.zarr"], "nowhere.tar.gz: no such file or folder"),
    (["data", "prepare", "--val", "-1"], "val must be an integer >= 0"),
    (["data", "prepare", "--chunk", "0"], "chunk must be an integer >= 1"),
    (["data", "prepare", "--workers", "0"], "--workers must be >= 1"),
    (["data", "info", "missing.zarr"], "missing.zarr: no data store here"),
])
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
    for opt in ("--source", "--out", "--val", "--chunk", "--scheduler", "--force", "--no-verify", "--workers"):
        assert opt in out
    assert main(["data"]) == 2


def test_default_source_download(tmp_path, client, monkeypatch):
    """Nothing found: the 'official' URL (here a file:// fixture) is downloaded into data/."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "nokeras"))
    arc, truth = write_cifar_archive(tmp_path / "www", per_batch=6, n_test=4)
    monkeypatch.setattr(S, "OFFICIAL_URL", arc.as_uri())
    root = tmp_path / "data"
    with pytest.raises(Exception, match="expected c58f30108f718f92721af3b95e74349a; nothing was saved"):
        prepare(None, tmp_path / "s.zarr", data_root=root, client=client)
    assert not (root / "cifar-10-python.tar.gz").exists() and list(root.iterdir()) == []
    r = prepare(None, tmp_path / "s.zarr", val=2, data_root=root, verify=False, client=client)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == arc.read_bytes()
    assert r.splits == {"train": 28, "val": 2, "test": 4}
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr").read_uint8("test")[0], truth["test_X"])


def test_url_source(tmp_path, client, http_server):  # noqa: F811
    www, base = http_server
    write_cifar_archive(www, per_batch=6, n_test=4)
    root = tmp_path / "data"
    url = f"{base}/cifar-10-python.tar.gz"
    with pytest.raises(Exception, match="is not the official CIFAR-10 archive's .*nothing was saved"):
        prepare(url, tmp_path / "s.zarr", data_root=root, client=client)
    assert not (root / "cifar-10-python.tar.gz").exists()
    r = prepare(url, tmp_path / "s.zarr", val=2, data_root=root, verify=False, client=client)
    assert r.source["path"] == str((root / "cifar-10-python.tar.gz").resolve())


def test_killed_conversion_leaves_no_complete_store(tmp_path, client):
    """SIGKILL in the middle of a conversion: no store under the final name, the partial one
    is never taken for complete, and the next run rebuilds and removes it."""
    import signal
    import time

    from pipeline.data.store import store_state
    arc, truth = write_cifar_archive(tmp_path, per_batch=2000, n_test=1000)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "data", "prepare", "--source", str(arc),
                             "--no-verify", "--out", "s.zarr", "--chunk", "100"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial = []
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob("s.zarr.partial-*") if (p / "train").is_dir()]
        if partial:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not partial:
        pytest.skip("the conversion finished before it could be interrupted")
    assert not (tmp_path / "s.zarr").exists()
    assert store_state(partial[0]) == "incomplete"
    r = prepare(arc, tmp_path / "s.zarr", val=1000, verify=False, client=client)
    assert not r.skipped and r.splits == {"train": 9000, "val": 1000, "test": 1000}
    assert not any(tmp_path.glob("s.zarr.*"))
    np.testing.assert_array_equal(open_store(tmp_path / "s.zarr").read_uint8("test")[0], truth["test_X"])
