"""The conversion job on an in-process Dask cluster (and once on processes): round trips,
bad sources, atomicity, re-runs, stored order, leftovers of other hosts, offline errors."""

import os
import shutil
import socket

import numpy as np
import pytest

from pipeline.cluster import connect
from pipeline.data import open_store, prepare
from pipeline.data.leftovers import leftover_owner, leftover_path, remove_stale
from pipeline.data.safe_pickle import UnsafePickleError
from pipeline.data.shuffle import SHUFFLE_SEED, shuffle_order, split_rows
from pipeline.data.sources import OFFICIAL_MD5
from pipeline.data.store import store_state
from pipeline.errors import DataError
from pipeline.procs import Owner, pid_namespace
from tests.helpers.data import (
    make_batches,
    make_image_folder,
    malicious_batch,
    md5,
    tar_dir,
    write_batches_dir,
    write_cifar_archive,
    write_tar,
)


@pytest.fixture(scope="module")
def client():
    with connect(workers=2, processes=False) as c:
        yield c


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def _expected_mean(X):
    n = len(X)
    return (X.reshape(n, -1).sum(axis=0, dtype=np.int64) / n).reshape(3, 32, 32).astype(np.float32)


def _check_cifar_store(out, truth, val):
    """Val holds the last ``val`` training images of the source (cs231n's), train the others;
    each split stored in the order split_rows gives; pixels, labels and mean exact."""
    s = open_store(out)
    n_pool, n_test = len(truth["train_y"]), len(truth["test_y"])
    n_train = n_pool - val
    assert s.splits == {"train": n_train, "val": val, "test": n_test}
    rows = split_rows(n_pool, n_test, val, shuffle_pool=False)
    assert sorted(rows["train"]) == list(range(n_train)) and sorted(rows["val"]) == list(
        range(n_train, n_pool)
    )
    pool, test = (truth["train_X"], truth["train_y"]), (truth["test_X"], truth["test_y"])
    for split, (X0, y0) in {"train": pool, "val": pool, "test": test}.items():
        X, y = s.read_uint8(split, None)
        np.testing.assert_array_equal(X, X0[rows[split]])
        np.testing.assert_array_equal(y, y0[rows[split]])
    np.testing.assert_array_equal(s.mean_image, _expected_mean(truth["train_X"][:n_train]))
    assert s.class_names[:2] == ["airplane", "automobile"]
    assert (
        s.protected and s.attrs["format_version"] == 2 and s.attrs["shuffle_seed"] == SHUFFLE_SEED
    )
    return s


def test_archive_py2_round_trip(tmp_path, client):
    arc, truth = write_cifar_archive(tmp_path, per_batch=40, n_test=30, flavour="py2")
    out = tmp_path / "store.zarr"
    seen = []
    r = prepare(
        arc, out, val=15, chunk=16, verify=False, client=client, progress=lambda *a: seen.append(a)
    )
    assert not r.skipped and r.splits == {"train": 185, "val": 15, "test": 30}
    s = _check_cifar_store(out, truth, 15)
    assert s.chunks == {"train": 16, "val": 15, "test": 16}
    src = s.attrs["source"]
    assert src["md5"] == md5(arc) and src["kind"] == "cifar-archive"
    assert (src["official"], src["verified"]) == (False, False)
    assert s.attrs["labels_dtype"] == "uint8" and s.attrs["complete"] is True
    assert seen[-1] == ("convert", 230, 230) and any(a[0] == "read" for a in seen)
    assert _leftovers(out) == []


@pytest.mark.parametrize("protocol", [2, 5])
def test_batches_folder_py3_round_trip(tmp_path, client, protocol):
    d, truth = write_batches_dir(
        tmp_path, per_batch=25, n_test=12, flavour="py3", protocol=protocol
    )
    out = tmp_path / "s.zarr"
    prepare(d, out, val=7, chunk=9, verify=False, client=client)
    s = _check_cifar_store(out, truth, 7)
    assert set(s.attrs["source"]["files"]) == {
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    }


def test_verification(tmp_path, client):
    arc, _ = write_cifar_archive(tmp_path, per_batch=4, n_test=4)
    out = tmp_path / "s.zarr"
    with pytest.raises(
        DataError, match=f"md5 {md5(arc)} is not the official .*{OFFICIAL_MD5}.*--no-verify"
    ):
        prepare(arc, out, client=client)
    assert not out.exists() and _leftovers(out) == []
    d, _ = write_batches_dir(tmp_path / "f", per_batch=4, n_test=4)
    with pytest.raises(DataError, match=r"data_batch_1: md5 .* is not the official c99cafc1"):
        prepare(d, out, client=client)
    assert not out.exists() and _leftovers(out) == []


def test_truncated_archive(tmp_path, client):
    arc, _ = write_cifar_archive(tmp_path, per_batch=60, n_test=60)
    cut = tmp_path / "cifar-cut.tar.gz"
    cut.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    out = tmp_path / "s.zarr"
    with pytest.raises(DataError, match="cifar-cut.tar.gz: truncated or corrupt archive"):
        prepare(cut, out, verify=False, client=client)
    assert not out.exists() and _leftovers(out) == []


def test_bad_batches(tmp_path, client):
    out = tmp_path / "s.zarr"
    files, _ = make_batches(per_batch=5, n_test=5)
    del files["test_batch"]
    arc = write_tar(tmp_path / "missing.tar.gz", files)
    with pytest.raises(
        DataError, match="missing.tar.gz: missing batch cifar-10-batches-py/test_batch"
    ):
        prepare(arc, out, verify=False, client=client)
    # a label out of range, found by a worker task
    import pickle

    files, _ = make_batches(per_batch=5, n_test=5, flavour="py3")
    d = pickle.loads(files["data_batch_4"])
    d["labels"][3] = 10
    files["data_batch_4"] = pickle.dumps(d, protocol=2)
    arc = write_tar(tmp_path / "labels.tar.gz", files)
    with pytest.raises(
        DataError, match=r"labels.tar.gz:cifar-10-batches-py/data_batch_4: label 10 of image 3"
    ):
        prepare(arc, out, verify=False, client=client)
    assert not out.exists() and _leftovers(out) == []


def test_malicious_batch_in_archive(tmp_path, client):
    marker = tmp_path / "pwned"
    files, _ = make_batches(per_batch=5, n_test=5)
    files["data_batch_2"] = malicious_batch(marker)
    arc = write_tar(tmp_path / "evil.tar.gz", files)
    out = tmp_path / "s.zarr"
    with pytest.raises(
        UnsafePickleError, match="evil.tar.gz:cifar-10-batches-py/data_batch_2: refused"
    ):
        prepare(arc, out, verify=False, client=client)
    assert not marker.exists()
    assert not out.exists() and _leftovers(out) == []


@pytest.mark.parametrize("fmt,container", [("PNG", "dir"), ("JPEG", "tar")])
def test_image_folder_round_trip(tmp_path, client, fmt, container):
    root = tmp_path / "img"
    truth = make_image_folder(
        root, per_class_train=5, per_class_test=3, fmt=fmt, classes=("dog", "cat", "bird", "frog")
    )
    src = root if container == "dir" else tar_dir(root, tmp_path / "img.tar.gz", arc_prefix="set/")
    out = tmp_path / "s.zarr"
    r = prepare(src, out, val=4, chunk=3, client=client)
    assert r.class_names == ["bird", "cat", "dog", "frog"]
    s = open_store(out)
    assert s.splits == {"train": 16, "val": 4, "test": 12}
    # every training image lands in train or val exactly once, pixels and labels exact
    Xtv = np.concatenate([s.read_uint8("train")[0], s.read_uint8("val")[0]])
    ytv = np.concatenate([s.read_uint8("train")[1], s.read_uint8("val")[1]])
    expect = sorted((img.tobytes(), c) for img, c in truth["train"].values())
    assert sorted(zip((x.tobytes() for x in Xtv), ytv.tolist())) == expect
    Xte, yte = s.read_uint8("test")
    listed = [truth["test"][k] for k in sorted(truth["test"])]  # listed by (class, name)...
    ordered = [
        listed[i] for i in split_rows(20, 12, 4, shuffle_pool=True)["test"]
    ]  # ...stored shuffled
    np.testing.assert_array_equal(Xte, np.stack([img for img, _ in ordered]))
    np.testing.assert_array_equal(yte, [c for _, c in ordered])
    np.testing.assert_array_equal(s.mean_image, _expected_mean(s.read_uint8("train")[0]))
    assert s.attrs["source"]["kind"] == "image-folder" and len(s.attrs["source"]["md5"]) == 32
    if container == "tar":
        assert s.attrs["source"]["md5"] == md5(src)


def test_bad_image_folders(tmp_path, client):
    from PIL import Image

    out = tmp_path / "s.zarr"
    root = tmp_path / "img"
    make_image_folder(root, per_class_train=3, per_class_test=2)
    Image.new("RGB", (64, 64)).save(root / "train" / "dog" / "big.png")
    with pytest.raises(
        DataError, match=r"train/dog/big.png: wrong image size 64x64, expected 32x32"
    ):
        prepare(root, out, val=1, client=client)
    (root / "train" / "dog" / "big.png").unlink()
    (root / "test" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"test/cat/broken.jpg: not a JPEG or PNG image"):
        prepare(root, out, val=1, client=client)
    (root / "test" / "cat" / "broken.jpg").unlink()
    (root / "train" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"train/cat/readme.txt is not a JPEG or PNG image"):
        prepare(root, out, val=1, client=client)
    (root / "train" / "cat" / "readme.txt").unlink()
    (root / "train" / "emu").mkdir()
    (root / "test" / "emu").mkdir()
    with pytest.raises(DataError, match=r"empty class train/emu/"):
        prepare(root, out, val=1, client=client)
    assert not out.exists() and _leftovers(out) == []
    shutil.rmtree(root / "train" / "emu")
    shutil.rmtree(root / "test" / "emu")
    tar = tar_dir(root, tmp_path / "img.tar")
    Image.new("RGB", (31, 32)).save(root / "test" / "bird" / "odd.png")
    tar = tar_dir(root, tmp_path / "img2.tar")
    with pytest.raises(DataError, match=r"img2.tar:test/bird/odd.png: wrong image size 31x32"):
        prepare(tar, out, val=1, client=client)
    with pytest.raises(DataError, match="val=18 leaves no training images"):
        prepare(root, out, val=18, client=client)
    assert not out.exists() and _leftovers(out) == []


def test_rerun_force_and_interrupted(tmp_path, client):
    arc, truth = write_cifar_archive(tmp_path, per_batch=10, n_test=10)
    out = tmp_path / "s.zarr"
    prepare(arc, out, val=5, chunk=8, verify=False, client=client)
    first = open_store(out).attrs["store_id"]
    stamp = os.stat(out / "zarr.json").st_mtime_ns
    r = prepare(arc, out, val=5, verify=False, client=client)  # complete: a no-op
    assert r.skipped and os.stat(out / "zarr.json").st_mtime_ns == stamp
    with pytest.raises(DataError, match="val=5.*--force rebuilds it with val=7"):
        prepare(arc, out, val=7, verify=False, client=client)
    # --force with a bad source: the old store survives untouched
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(arc.read_bytes()[:3000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        prepare(bad, out, val=7, verify=False, force=True, client=client)
    assert open_store(out).attrs["store_id"] == first
    r = prepare(arc, out, val=7, verify=False, force=True, client=client)
    s = open_store(out)
    assert not r.skipped and s.attrs["store_id"] != first and s.splits["val"] == 7
    _check_cifar_store(out, truth, 7)
    assert _leftovers(out) == []

    # an interrupted run: a partial folder of a dead process, and a store never finalized
    dead = tmp_path / _name("s.zarr", "partial", socket.gethostname(), pid_namespace(), 999999999)
    shutil.copytree(out, dead)
    unnamed = tmp_path / "s.zarr.partial-999999999-abcd1234"  # an older convpipe's: whose?
    unnamed.mkdir()
    other = tmp_path / "t.zarr"
    shutil.copytree(out, other)
    import json

    meta = json.loads((other / "zarr.json").read_text())
    del meta["attributes"]["complete"]
    (other / "zarr.json").write_text(json.dumps(meta))
    assert store_state(other) == "incomplete"
    with pytest.raises(DataError, match="incomplete store"):
        open_store(other)
    r = prepare(arc, other, val=7, verify=False, client=client)  # rebuilt, not skipped
    assert not r.skipped and open_store(other).attrs["complete"] is True
    r = prepare(arc, out, val=7, verify=False, force=True, client=client)
    assert not dead.exists()  # stale partial removed
    assert unnamed.is_dir() and [p for p, _ in r.kept] == [unnamed]  # kept, and said so


def test_refuses_to_overwrite_foreign(tmp_path, client):
    arc, _ = write_cifar_archive(tmp_path, per_batch=4, n_test=4)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a convpipe store"):
        prepare(arc, out, verify=False, force=True, client=client)
    assert (out / "precious.txt").read_text() == "keep me"


def test_process_cluster(tmp_path):
    """Once on real worker processes (the default embedded cluster): pickling of tasks/errors."""
    arc, truth = write_cifar_archive(tmp_path, per_batch=30, n_test=20, flavour="py2")
    out = tmp_path / "p.zarr"
    with connect(workers=2, processes=True) as c:
        r = prepare(arc, out, val=10, chunk=25, verify=False, client=c)
        assert r.splits == {"train": 140, "val": 10, "test": 20}
        files, _ = make_batches(per_batch=5, n_test=5)
        files["data_batch_5"] = files["data_batch_5"][:-40]
        bad = write_tar(tmp_path / "bad.tar.gz", files)
        with pytest.raises(
            DataError,
            match="bad.tar.gz:cifar-10-batches-py/data_batch_5: corrupt or truncated pickle",
        ):
            prepare(bad, tmp_path / "q.zarr", verify=False, client=c)
    _check_cifar_store(out, truth, 10)


# ------------------------------------------------------------------------ stored order


def test_shuffle_order_is_pinned():
    """The stored order depends on (n, seed, stream) alone: pinned values, not NumPy's RNG."""
    assert shuffle_order(10, 0, 1).tolist() == [7, 4, 8, 1, 2, 6, 5, 0, 9, 3]
    for n in (0, 1, 2, 7, 1000):
        assert sorted(shuffle_order(n, 0, 3).tolist()) == list(range(n))
    assert shuffle_order(1000, 0, 1).tolist() != shuffle_order(1000, 0, 2).tolist()
    assert shuffle_order(1000, 1, 1).tolist() != shuffle_order(1000, 0, 1).tolist()
    assert shuffle_order(1000, 0, 1).dtype == np.int64


def test_split_rows_disjoint_and_deterministic():
    for pool in (False, True):
        r = split_rows(500, 100, 60, shuffle_pool=pool)
        assert len(r["train"]) == 440 and len(r["val"]) == 60
        assert set(r["train"]).isdisjoint(r["val"])
        assert sorted([*r["train"], *r["val"]]) == list(range(500))
        assert sorted(r["test"]) == list(range(100))
        again = split_rows(500, 100, 60, shuffle_pool=pool)
        assert all(np.array_equal(r[k], again[k]) for k in r)
        assert not np.array_equal(r["train"], np.sort(r["train"]))  # stored shuffled
    assert sorted(split_rows(500, 100, 60, shuffle_pool=False)["val"]) == list(range(440, 500))


def _histogram_ok(y, n_classes):
    counts = np.bincount(y, minlength=n_classes)
    return (counts > 0).sum() >= n_classes - 1 and counts.max() <= len(y) // 2


def test_every_split_starts_with_all_classes(tmp_path, client):
    """An image folder lists its images by class; the first images of every split stored
    from it are a sample of all classes (was: test = all of the first class), and
    the same settings give the same bits."""
    root = tmp_path / "img"
    make_image_folder(root, per_class_train=30, per_class_test=15, classes=("a", "b", "c", "d"))
    out, again = tmp_path / "s.zarr", tmp_path / "again.zarr"
    prepare(root, out, val=20, chunk=8, client=client)
    s = open_store(out)
    assert s.attrs["shuffle_seed"] == SHUFFLE_SEED and "val" in s.attrs["order"]
    for split in ("train", "val", "test"):
        y = s.read_uint8(split, np.arange(20))[1]
        assert _histogram_ok(y, 4), (split, np.bincount(y, minlength=4))
    prepare(root, again, val=20, chunk=8, client=client)
    s2 = open_store(again)
    for split in ("train", "val", "test"):
        for a, b in zip(s.read_uint8(split), s2.read_uint8(split)):
            np.testing.assert_array_equal(a, b)


def test_cifar_batches_sorted_by_class_are_stored_shuffled(tmp_path, client):
    """CIFAR-10 batches are shuffled too (a copy sorted by class, like an image folder's)."""
    import pickle

    files, truth = make_batches(per_batch=40, n_test=40, flavour="py3")
    for name in files:
        if name.startswith(("data_batch", "test_batch")):
            d = pickle.loads(files[name])
            order = np.argsort(d["labels"], kind="stable")
            d["labels"] = [d["labels"][i] for i in order]
            d["data"] = d["data"][order]
            files[name] = pickle.dumps(d, protocol=2)
    arc = write_tar(tmp_path / "sorted.tar.gz", files)
    out = tmp_path / "s.zarr"
    prepare(arc, out, val=40, chunk=16, verify=False, client=client)
    s = open_store(out)
    for split in ("train", "val", "test"):
        y = s.read_uint8(split, np.arange(30))[1]
        assert _histogram_ok(y, 10), (split, np.bincount(y, minlength=10))


# ------------------------------------------------------------------------ leftovers


def _name(store, kind, host, ns, pid):
    return f"{store}.{kind}.{pid}.{ns}.abcd1234.{host}"


def test_leftover_names_carry_host_namespace_and_pid(tmp_path):
    out = tmp_path / "s.zarr"
    p = leftover_path(out, "partial")
    assert leftover_owner(out, p) == ("partial", Owner.me())
    host = "node-7.cluster.example"
    q = tmp_path / _name("s.zarr", "staging", host, 42, 17)
    assert leftover_owner(out, q) == ("staging", Owner(host, 42, 17))
    assert leftover_owner(out, tmp_path / "s.zarr.partial-17-abcd1234") == ("partial", None)
    assert leftover_owner(out, tmp_path / "s.zarr.backup") is None


def test_stale_leftovers_of_other_hosts_and_namespaces_are_kept(tmp_path):
    out = tmp_path / "s.zarr"
    host, ns, dead = socket.gethostname(), pid_namespace(), 999999999
    mine_dead = tmp_path / _name("s.zarr", "partial", host, ns, dead)
    mine_alive = tmp_path / _name("s.zarr", "staging", host, ns, os.getpid())
    other_host = tmp_path / _name("s.zarr", "partial", "elsewhere.example", ns, dead)
    other_ns = tmp_path / _name("s.zarr", "staging", host, ns + 1, dead)
    unnamed = tmp_path / "s.zarr.partial-999999999-abcd1234"
    old_dead = tmp_path / _name("s.zarr", "old", host, ns, dead)  # the store is absent: keep
    for p in (mine_dead, mine_alive, other_host, other_ns, unnamed, old_dead):
        p.mkdir()
    kept = dict(remove_stale(out))
    assert not mine_dead.exists()
    assert all(p.is_dir() for p in (mine_alive, other_host, other_ns, unnamed, old_dead))
    assert set(kept) == {other_host, other_ns, unnamed}
    assert "host elsewhere.example" in kept[other_host] and "older convpipe" in kept[unnamed]


# ------------------------------------------------------------------------ offline


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_download_says_how_to_prepare_from_a_local_copy(tmp_path, monkeypatch):
    """No copy found and the download cannot connect (a closed local port: no network use)."""
    from pipeline.data import sources as S

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "nokeras"))
    monkeypatch.setattr(
        S, "OFFICIAL_URL", f"http://127.0.0.1:{_closed_port()}/cifar-10-python.tar.gz"
    )
    root = tmp_path / "data"
    with pytest.raises(DataError) as e:
        prepare(None, tmp_path / "s.zarr", data_root=root)
    msg = str(e.value)
    assert "\n" not in msg and "download failed" in msg
    # where it looked, in the words of the places it searched (torchvision's and Keras's)
    assert (
        f"no CIFAR-10 copy found (cifar-10-python.tar.gz or cifar-10-batches-py/ in {root} " in msg
    )
    assert f"torchvision's places with root={root}" in msg
    assert f"Keras's {tmp_path / 'nokeras' / 'datasets'}" in msg
    assert f"put the official cifar-10-python.tar.gz in {root}" in msg
    assert "`convpipe data prepare --source PATH`" in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(DataError, match=r"download failed .*`convpipe data prepare --source PATH`"):
        prepare(f"http://127.0.0.1:{_closed_port()}/x.tar.gz", tmp_path / "s.zarr", data_root=root)
    assert not (tmp_path / "s.zarr").exists() and _leftovers(tmp_path / "s.zarr") == []
