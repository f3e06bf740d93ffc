"""Augmentation from a counter-based generator: what each image gets is a pure function of
(seed, epoch, index), flips and shifts are exact, the alternating flip alternates."""

import numpy as np
import pytest

from pipeline.augment import Augment, draws, tta_scores, tta_views


def images(n=6, size=8):
    return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)


def test_an_images_draw_depends_on_seed_epoch_and_index_only():
    a = draws(3, 5, [10, 11, 12])
    assert np.array_equal(a, draws(3, 5, [12, 10, 11])[[1, 2, 0]])  # not on its neighbours
    assert np.array_equal(a[1:], draws(3, 5, [11, 12]))
    assert not np.array_equal(a, draws(4, 5, [10, 11, 12]))
    assert not np.array_equal(a, draws(3, 6, [10, 11, 12]))
    aug = Augment("random", 2, seed=1)
    X = images()
    idx = np.array([4, 9, 2, 7, 30, 1])
    whole = aug.apply(X, idx, epoch=3)
    parts = np.concatenate([aug.apply(X[:2], idx[:2], 3), aug.apply(X[2:], idx[2:], 3)])
    assert np.array_equal(whole, parts) and whole.dtype == np.float32


def test_flip_and_translate_move_pixels_exactly():
    X = images(1, 8)
    aug = Augment("random", 3, seed=0)
    for epoch in range(20):
        flip, dy, dx = aug.choices(epoch, [0])
        out = aug.apply(X, [0], epoch)
        padded = np.pad(X, ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect")
        want = padded[:, :, 3 + dy[0] : 11 + dy[0], 3 + dx[0] : 11 + dx[0]]
        if flip[0]:
            want = want[..., ::-1]
        assert np.array_equal(out, want)
        if dy[0] == dx[0] == 0 and not flip[0]:
            assert np.array_equal(out, X)
    # a pure shift keeps the pixels that stay inside: out[h, w] = X[h + dy, w + dx]
    shift = Augment("none", 2, seed=5)
    _, dy, dx = shift.choices(0, [0])
    out = shift.apply(X, [0], 0)
    y0, x0 = max(0, -dy[0]), max(0, -dx[0])
    y1, x1 = min(8, 8 - dy[0]), min(8, 8 - dx[0])
    assert np.array_equal(
        out[0, :, y0:y1, x0:x1], X[0, :, y0 + dy[0] : y1 + dy[0], x0 + dx[0] : x1 + dx[0]]
    )


def test_draws_cover_every_choice_evenly():
    flip, dy, dx = Augment("random", 2, seed=0).choices(0, np.arange(20000))
    assert abs(flip.mean() - 0.5) < 0.02
    for d in (dy, dx):
        counts = np.bincount(d + 2, minlength=5) / len(d)
        assert np.all(np.abs(counts - 0.2) < 0.02), counts
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.03


def test_alternating_flip_mirrors_the_other_images_each_epoch():
    aug = Augment("alternate", 0, seed=2)
    idx = np.arange(1000)
    first = aug.choices(0, idx)[0]
    assert np.array_equal(first, Augment("random", 0, seed=2).choices(0, idx)[0])
    for epoch in range(1, 5):
        assert np.array_equal(aug.choices(epoch, idx)[0], first ^ bool(epoch % 2))


def test_no_augmentation_returns_the_images_untouched_and_bad_settings_are_refused():
    X = images()
    assert Augment().apply(X, np.arange(6), 0) is X
    with pytest.raises(ValueError, match="flip must be one of none, random, alternate, got 'yes'"):
        Augment("yes")
    with pytest.raises(ValueError, match=r"translate must be a whole number of pixels in \[0, 8\]"):
        Augment("none", 9)


def test_test_time_views_are_the_image_its_mirror_and_one_pixel_shifts():
    X = images(2, 6)
    assert [w for w, _ in tta_views(X, "none")] == [1.0]
    (wa, a), (wb, b) = tta_views(X, "flip")
    assert (wa, wb) == (0.5, 0.5) and a is X and np.array_equal(b, X[..., ::-1])
    views = tta_views(X, "flip-translate")
    assert [w for w, _ in views] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    padded = np.pad(X, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    assert np.array_equal(views[2][1], padded[:, :, 0:6, 0:6])
    assert np.array_equal(views[5][1], padded[:, :, 2:8, 2:8][..., ::-1])

    # scores: the weighted mean of each view's, whatever the score function
    def score(v):
        return v.reshape(len(v), -1)[:, :3]

    want = sum(w * score(v).astype(np.float64) for w, v in views)
    np.testing.assert_allclose(tta_scores(score, X, "flip-translate"), want, rtol=1e-12)
    with pytest.raises(ValueError, match="tta must be one of none, flip, flip-translate"):
        tta_views(X, "rotate")
