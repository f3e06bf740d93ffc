"""Finding and classifying sources, reading batches, downloading (file:// and a local HTTP
server)."""

import hashlib

import numpy as np
import pytest

from pipeline.data import sources as S
from pipeline.data.download import download, is_url, url_basename
from pipeline.errors import DataError
from tests.helpers.data import (
    make_image_folder,
    tar_dir,
    write_batches_dir,
    write_cifar_archive,
    write_tar,
)


def test_classify_kinds(tmp_path):
    arc, _ = write_cifar_archive(tmp_path / "a", per_batch=4, n_test=4)
    assert S.classify(arc).kind == "cifar-archive"
    d, _ = write_batches_dir(tmp_path / "b", per_batch=4, n_test=4)
    assert (S.classify(d).kind, S.classify(d).path) == ("cifar-batches", d)
    assert S.classify(d.parent).path == d  # the folder holding cifar-10-batches-py/
    make_image_folder(tmp_path / "img", per_class_train=1, per_class_test=1)
    assert S.classify(tmp_path / "img").kind == "image-folder"
    t = tar_dir(tmp_path / "img", tmp_path / "img.tar.gz", arc_prefix="cifar10/")
    src = S.classify(t)
    assert (src.kind, src.container, src.prefix) == ("image-folder", "tar", "cifar10/")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a tar archive"):
        S.classify(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="single pickle"):
        S.classify(d / "data_batch_1")
    with pytest.raises(DataError, match="no such file"):
        S.classify(tmp_path / "missing.tar.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither"):
        S.classify(tmp_path / "empty")


def test_find_cifar10_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    root = tmp_path / "data"
    assert S.find_cifar10(root) is None
    k3 = tmp_path / "keras" / "datasets" / "cifar-10-batches-py-target_archive"
    k3.parent.mkdir(parents=True)
    k3.write_bytes(b"x")
    assert S.find_cifar10(root) == k3
    kd, _ = write_batches_dir(tmp_path / "keras" / "datasets", per_batch=2, n_test=2)
    assert S.find_cifar10(root) == kd
    arc = root / "cifar-10-python.tar.gz"
    root.mkdir()
    arc.write_bytes(b"x")
    assert S.find_cifar10(root) == arc
    d, _ = write_batches_dir(root, per_batch=2, n_test=2)
    assert S.find_cifar10(root) == d


def test_check_batch_errors():
    X = np.zeros((3, 3072), np.uint8)
    Xo, y = S.check_batch({b"data": X, b"labels": [0, 1, 9]}, "b", 10)
    assert Xo.shape == (3, 3, 32, 32) and y.dtype == np.int64
    with pytest.raises(DataError, match="b: wrong image size: rows of 1024 values"):
        S.check_batch({b"data": np.zeros((3, 1024), np.uint8), b"labels": [0, 1, 2]}, "b", 10)
    with pytest.raises(DataError, match="b: label 10 of image 2 out of range 0..9"):
        S.check_batch({b"data": X, b"labels": [0, 1, 10]}, "b", 10)
    with pytest.raises(DataError, match="label -1 of image 0"):
        S.check_batch({"data": X, "labels": [-1, 1, 2]}, "b", 10)
    with pytest.raises(DataError, match="2 labels for 3 images"):
        S.check_batch({b"data": X, b"labels": [0, 1]}, "b", 10)
    with pytest.raises(DataError, match="expected keys"):
        S.check_batch({b"pixels": X}, "b", 10)
    with pytest.raises(DataError, match="dtype float64"):
        S.check_batch({b"data": X.astype(float), b"labels": [0, 1, 2]}, "b", 10)
    with pytest.raises(DataError, match="expected a dict"):
        S.check_batch([X], "b", 10)


def test_extract_truncated_and_missing(tmp_path):
    arc, _ = write_cifar_archive(tmp_path, per_batch=50, n_test=50)
    md5, staged = S.extract_cifar_archive(arc, tmp_path / "stage")
    assert md5 == hashlib.md5(arc.read_bytes()).hexdigest()
    assert set(staged) == {*S.TRAIN_BATCHES, S.TEST_BATCH, S.META}
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(arc.read_bytes()[: arc.stat().st_size * 2 // 3])
    with pytest.raises(DataError, match=r"cut.tar.gz: truncated or corrupt archive"):
        S.extract_cifar_archive(cut, tmp_path / "stage2")
    from tests.helpers.data import make_batches

    files, _ = make_batches(per_batch=2, n_test=2)
    del files["data_batch_3"]
    partial = write_tar(tmp_path / "p.tar.gz", files)
    _, staged = S.extract_cifar_archive(partial, tmp_path / "stage3")
    with pytest.raises(DataError, match="missing batch cifar-10-batches-py/data_batch_3"):
        S.batch_files(tmp_path / "stage3", staged, label=str(partial))


def test_image_listing_errors(tmp_path):
    root = tmp_path / "img"
    make_image_folder(root, per_class_train=2, per_class_test=1)
    listing = S.list_image_folder(S.classify(root))
    assert listing.classes == ["bird", "cat", "dog"]
    assert listing.items["train"][0] == ("train/bird/0000.png", 0)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    assert len(S.list_image_folder(S.classify(root)).items["train"]) == 6
    (root / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="train/cat/notes.txt is not a JPEG or PNG image"):
        S.list_image_folder(S.classify(root))
    (root / "train" / "cat" / "notes.txt").unlink()
    (root / "test" / "fish").mkdir()
    with pytest.raises(DataError, match="empty class test/fish/"):
        S.list_image_folder(S.classify(root))
    (root / "test" / "fish").rmdir()
    import shutil

    shutil.rmtree(root / "test" / "dog")
    with pytest.raises(DataError, match="classes only in train/: dog"):
        S.list_image_folder(S.classify(root))


def test_decode_image_errors(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buf, "PNG")
    with pytest.raises(DataError, match="x.png: wrong image size 28x28, expected 32x32"):
        S.decode_image(buf.getvalue(), "x.png")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "BMP")
    with pytest.raises(DataError, match="y.png: not a JPEG or PNG image"):
        S.decode_image(buf.getvalue(), "y.png")
    with pytest.raises(DataError, match="cannot decode"):
        S.decode_image(b"garbage", "z.jpg")
    buf = io.BytesIO()
    Image.new("L", (32, 32), 7).save(buf, "PNG")  # greyscale becomes RGB
    assert S.decode_image(buf.getvalue(), "g.png").shape == (3, 32, 32)


# -------------------------------------------------------------------------------- download


def test_url_helpers():
    assert is_url("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    assert is_url("file:///tmp/x") and not is_url("/tmp/x") and not is_url("data/x.tar.gz")
    assert url_basename("https://h/a/cifar-10-python.tar.gz?x=1") == "cifar-10-python.tar.gz"


def test_download_file_url_and_md5_mismatch(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc" * 100000)
    good = hashlib.md5(src.read_bytes()).hexdigest()
    seen = []
    dest = tmp_path / "out" / "f.bin"
    assert download(src.as_uri(), dest, md5=good, progress=lambda *a: seen.append(a)) == good
    assert dest.read_bytes() == src.read_bytes() and seen[-1][1] == 300000
    dest2 = tmp_path / "out" / "g.bin"
    with pytest.raises(DataError, match="md5 .* expected 0+; nothing was saved"):
        download(src.as_uri(), dest2, md5="0" * 32)
    assert sorted(p.name for p in dest2.parent.iterdir()) == ["f.bin"]  # no temp files either
    with pytest.raises(DataError, match="download failed"):
        download((tmp_path / "nope").as_uri(), tmp_path / "out" / "h.bin")


def test_download_http(http_server, tmp_path):
    root, base = http_server
    arc, _ = write_cifar_archive(root, per_batch=3, n_test=3)
    dest = tmp_path / "data" / "cifar-10-python.tar.gz"
    seen = []
    md5 = download(f"{base}/cifar-10-python.tar.gz", dest, progress=lambda *a: seen.append(a))
    assert (
        md5 == hashlib.md5(arc.read_bytes()).hexdigest() and dest.read_bytes() == arc.read_bytes()
    )
    assert seen[-1] == ("download", arc.stat().st_size, arc.stat().st_size)
    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{base}/missing.tar.gz", tmp_path / "data" / "m.tar.gz")
    bad = tmp_path / "data2" / "cifar-10-python.tar.gz"
    with pytest.raises(
        DataError, match="expected c58f30108f718f92721af3b95e74349a; nothing was saved"
    ):
        download(f"{base}/cifar-10-python.tar.gz", bad, md5=S.OFFICIAL_MD5)
    assert list(bad.parent.iterdir()) == []


def test_image_tar_truncated_and_layout(tmp_path):
    root = tmp_path / "img"
    make_image_folder(root, per_class_train=20, per_class_test=2, fmt="PNG")
    t = tar_dir(root, tmp_path / "img.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.tar.gz: truncated or corrupt archive"):
        S.list_image_folder(S.classify(cut))
    listing = S.list_image_folder(S.classify(t))
    assert listing.md5 == hashlib.md5(t.read_bytes()).hexdigest()
    assert len(listing.blobs) == 66 and listing.items["test"][0] == ("test/bird/0000.png", 0)
    (root / "train" / "stray.png").write_bytes(b"x")
    t2 = tar_dir(root, tmp_path / "img2.tar")
    with pytest.raises(DataError, match="train/stray.png is not in a class folder"):
        S.list_image_folder(S.classify(t2))


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.bz2", ".tar.xz"])
def test_an_image_tar_that_unpacks_past_its_limit_is_refused_in_one_line(
    tmp_path, monkeypatch, suffix
):
    """A compression bomb: a small archive whose tar is large (here a member of zeros, 2 MB
    unpacked from a few kB) stops at the limit instead of filling memory; the same archive under
    a larger limit lists as usual, so the limit is what refused it."""
    import io
    import tarfile

    root = tmp_path / "img"
    make_image_folder(root, per_class_train=2, per_class_test=1, fmt="PNG")
    mode = {".tar.gz": "w:gz", ".tar.bz2": "w:bz2", ".tar.xz": "w:xz"}[suffix]
    bomb = tmp_path / f"bomb{suffix}"
    with tarfile.open(bomb, mode) as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
        zeros = tarfile.TarInfo("padding.bin")
        zeros.size = 2_000_000
        tar.addfile(zeros, io.BytesIO(bytes(zeros.size)))
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(S, "UNPACK_FLOOR", 1_000_000)
    monkeypatch.setattr(S, "UNPACK_RATIO", 10)
    with pytest.raises(DataError) as err:
        S.list_image_folder(S.classify(bomb))
    assert str(err.value).startswith(f"{bomb}: unpacks to more than 1,000,000 bytes from ")
    assert "refused as a likely compression bomb" in str(err.value)
    monkeypatch.setattr(S, "UNPACK_FLOOR", 4_000_000)
    listed = S.list_image_folder(S.classify(bomb)).items["train"]
    assert len(listed) == len(list((root / "train").rglob("*.png"))) > 0


def test_a_cifar_archive_member_larger_than_a_batch_is_refused_before_it_is_written(
    tmp_path, monkeypatch
):
    arc, _ = write_cifar_archive(tmp_path / "a", per_batch=4, n_test=4)
    monkeypatch.setattr(S, "MAX_BATCH_BYTES", 100)  # every batch of 4 images is larger
    staging = tmp_path / "staging"
    with pytest.raises(DataError, match=r"data_batch_1 holds [\d,]+ bytes, more than a CIFAR"):
        S.extract_cifar_archive(arc, staging)
    assert list(staging.iterdir()) == []  # nothing written


def test_a_download_larger_than_its_cap_is_cut_off_with_nothing_saved(http_server, tmp_path):
    root, base = http_server
    (root / "big.bin").write_bytes(b"x" * 50_000)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="the server announces 50,000 bytes, the most allowed is"):
        download(f"{base}/big.bin", out / "a.bin", max_bytes=10_000)
    assert list(out.iterdir()) == []
    assert download(f"{base}/big.bin", out / "c.bin", max_bytes=50_000)  # exactly the cap: kept


def test_a_download_without_a_length_is_cut_off_at_its_cap(tmp_path, monkeypatch):
    """A server that announces no length (or a wrong one) is stopped by the bytes it sends."""
    import urllib.request

    class Endless:  # what urlopen returns: headers without Content-Length, bytes without end
        headers = {}

        def read(self, n):
            return b"x" * n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Endless())
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"sent more than 3,145,728 bytes.*nothing was saved"):
        download("https://example.invalid/big.bin", out / "b.bin", max_bytes=3 << 20)
    assert list(out.iterdir()) == []
