"""The restricted unpickler: real batch flavours load, anything that could run code is refused."""

import pickle
import pickletools

import numpy as np
import pytest

from pipeline.data.safe_pickle import UnsafePickleError, load_pickle, loads_pickle, str_keys
from pipeline.errors import DataError
from tests.helpers.data import dumps, make_batches, malicious_batch


def _globals(blob):
    out, strings = set(), []
    for op, arg, _ in pickletools.genops(blob):
        if op.name == "GLOBAL":
            out.add(tuple(arg.split(" ")))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            out.add((strings[-2], strings[-1]))
    return out


def test_py2_flavour_looks_like_cpickle_and_loads():
    files, truth = make_batches(per_batch=5, n_test=5, flavour="py2")
    blob = files["data_batch_1"]
    assert ("numpy.core.multiarray", "_reconstruct") in _globals(blob)
    assert not any(
        op.name in ("BINUNICODE", "SHORT_BINUNICODE") for op, _, _ in pickletools.genops(blob)
    )
    d = loads_pickle(blob, "data_batch_1")
    assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}
    d = str_keys(d)
    np.testing.assert_array_equal(d["data"].reshape(5, 3, 32, 32), truth["train_X"][:5])
    assert d["labels"] == truth["train_y"][:5].tolist()
    assert d["filenames"][0] == b"img_0_0.png"
    meta = str_keys(loads_pickle(files["batches.meta"], "batches.meta"))
    assert meta["label_names"][0] == b"airplane"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_py3_pickles_all_protocols(protocol):
    obj = {
        "data": np.arange(3072 * 2, dtype=np.uint8).reshape(2, 3072),
        "labels": [1, 2],
        "f32": np.linspace(0, 1, 7, dtype=np.float32),
        "scalar": np.int64(7),
        "fscalar": np.float64(2.5),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "b": b"\x00\xff",
        "nested": [("a", 1.5, None, True)],
    }
    out = loads_pickle(pickle.dumps(obj, protocol=protocol), "x")
    assert out.keys() == obj.keys()
    for k in ("data", "f32", "fortran"):
        np.testing.assert_array_equal(out[k], obj[k])
        assert out[k].dtype == obj[k].dtype
    assert out["scalar"] == 7 and out["scalar"].dtype == np.int64 and out["fscalar"] == 2.5
    assert (
        out["labels"] == [1, 2]
        and out["b"] == b"\x00\xff"
        and out["nested"] == [("a", 1.5, None, True)]
    )


def test_py2_encoding_latin1_gives_str_keys():
    files, _ = make_batches(per_batch=3, n_test=3, flavour="py2")
    d = loads_pickle(files["data_batch_2"], "b", encoding="latin1")
    assert "data" in d and d["data"].shape == (3, 3072)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    blob = malicious_batch(marker, protocol=protocol)
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError) as e:
        load_pickle(path)
    msg = str(e.value)
    assert str(path) in msg and "system" in msg and "\n" not in msg
    assert not marker.exists()
    # the same bytes really do run code with the plain unpickler: the test is meaningful
    pickle.loads(blob)
    assert marker.exists()


@pytest.mark.parametrize(
    "evil",
    [
        pickle.dumps(eval),  # a builtin by reference
        b"cbuiltins\neval\n(S'1+1'\ntR.",  # call builtins.eval
        b"c__builtin__\nexec\n(S'x=1'\ntR.",  # Python 2 name
        b"cnumpy\nload\n(S'/etc/passwd'\ntR.",  # a numpy function not allowed
        b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR.",  # allowed global, refused codec
    ],
)
def test_other_globals_refused(evil):
    with pytest.raises(UnsafePickleError, match="refused"):
        loads_pickle(evil, "evil.pkl")


def test_object_arrays_and_subclasses_refused():
    with pytest.raises(UnsafePickleError, match="dtype"):
        loads_pickle(pickle.dumps(np.array([1, "a"], dtype=object), protocol=2), "obj.pkl")
    with pytest.raises(UnsafePickleError):
        loads_pickle(pickle.dumps(np.ma.masked_array([1, 2], mask=[0, 1])), "masked.pkl")
    with pytest.raises(UnsafePickleError, match="numpy.matrix"):
        loads_pickle(pickle.dumps(np.eye(2).view(np.matrix), protocol=2), "matrix.pkl")
    with pytest.raises(UnsafePickleError, match="not numpy.ndarray"):
        # _reconstruct asked, through allowed names only, for something other than an ndarray
        loads_pickle(
            b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\ndtype\n(I0\ntS'b'\ntR.", "r.pkl"
        )


def test_truncated_and_garbage():
    files, _ = make_batches(per_batch=3, n_test=3)
    blob = files["data_batch_1"]
    with pytest.raises(DataError, match="b1: corrupt or truncated pickle"):
        loads_pickle(blob[: len(blob) // 2], "b1")
    with pytest.raises(DataError, match="corrupt or truncated"):
        loads_pickle(b"not a pickle at all", "junk")
    with pytest.raises(DataError, match="cannot read"):
        load_pickle("/nonexistent/data_batch_1")


def test_py2_flavour_matches_plain_pickle_load():
    files, _ = make_batches(per_batch=4, n_test=4, flavour="py2")
    for name, blob in files.items():
        if name == "readme.html":
            continue
        ours, theirs = loads_pickle(blob, name), pickle.loads(blob, encoding="bytes")
        assert ours.keys() == theirs.keys()
        for k in ours:
            if isinstance(ours[k], np.ndarray):
                np.testing.assert_array_equal(ours[k], theirs[k])
            else:
                assert ours[k] == theirs[k]


def test_dumps_py3_protocol_roundtrip():
    blob = dumps({"a": [1, 2]}, flavour="py3", protocol=5)
    assert loads_pickle(blob, "a") == {"a": [1, 2]}
