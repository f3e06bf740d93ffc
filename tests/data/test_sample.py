"""The CIFAR-10 sample of the model tests: real images when the shared archive is there; the
synthetic stand-in says so, and tests that need real images skip instead."""

import io
import tarfile

import numpy as np
import pytest

from tests.helpers import cifar_sample as cs


def test_missing_archive_warns_or_skips(tmp_path, monkeypatch):
    monkeypatch.setattr(cs, "SHARED_JPEG", tmp_path / "missing.tar.gz")
    with pytest.warns(
        cs.SyntheticSampleWarning, match="missing.tar.gz is missing: synthetic stand-in"
    ):
        d = cs.cifar_sample(20, 10)
    assert d["X_train"].shape == (20, 3, 32, 32) and d["y_val"].shape == (10,)
    with pytest.raises(pytest.skip.Exception, match="needs real CIFAR-10 images: .*missing.tar.gz"):
        cs.cifar_sample(20, 10, real=True)


def test_real_sample_is_the_archives_images(tmp_path, monkeypatch):
    """With an archive (here a small one in the same layout), the sample is its images."""
    from PIL import Image

    rng = np.random.default_rng(5)
    arc = tmp_path / "cifar10-jpeg.tar.gz"
    pixels = {}
    with tarfile.open(arc, "w:gz") as tar:
        for c in (
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ):
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                info = tarfile.TarInfo(f"train/{c}/{i:04d}.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
                pixels[(c, i)] = np.asarray(Image.open(io.BytesIO(buf.getvalue()))).transpose(
                    2, 0, 1
                )
    monkeypatch.setattr(cs, "SHARED_JPEG", arc)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", cs.SyntheticSampleWarning)
        d = cs.cifar_sample(10, 10, real=True)
    y = np.r_[d["y_train"], d["y_val"]]
    assert np.bincount(y, minlength=10).tolist() == [2] * 10  # the first 2 of each class
    # mean subtraction keeps differences: X + (raw of X[0]) - X[0] gives back the raw images
    X = np.concatenate([d["X_train"], d["X_val"]])
    want = sorted(pixels[(c, i)].tobytes() for c, i in pixels if i < 2)
    ok = any(
        sorted(np.rint(x - X[0] + r0.astype(np.float32)).astype(np.uint8).tobytes() for x in X)
        == want
        for (c, i), r0 in pixels.items()
        if i < 2
    )
    assert ok


@pytest.mark.skipif(not cs.SHARED_JPEG.is_file(), reason=f"{cs.SHARED_JPEG} is missing")
def test_shared_archive_gives_real_balanced_images():
    d = cs.cifar_sample(100, 100, real=True)
    y = np.r_[d["y_train"], d["y_val"]]
    assert np.bincount(y, minlength=10).tolist() == [20] * 10
    assert d["X_train"].dtype == np.float32 and d["X_train"].shape == (100, 3, 32, 32)
