"""A cluster whose workers run the kernels at different vector widths (CPUs of different widths,
or CONVPIPE_VECTOR_BYTES) trains the same bits as one worker: every width computes the same
results (pipeline._kernels.simd), so no width has to be agreed on."""

from __future__ import annotations

import logging

import pytest
from distributed import Client, Nanny, Scheduler, SpecCluster

from pipeline import fast_layers
from pipeline.training import train
from tests.helpers.cluster import local_cluster
from tests.helpers.training import assert_same_params, final_params, make_store, tiny_config

#: a net on every SIMD kernel: 7-wide filters (the direct conv), 64 hidden units and shards of 16
#: rows (the few-row affine forward, dx and dw kernels)
SIMD_NET = dict(num_filters=6, filter_size=7, hidden_dim=64, batch_size=64, shard_size=16, steps=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data") / "tiny.zarr", n_train=192, n_val=32)


def test_workers_at_16_32_and_64_byte_vectors_train_the_bits_of_one_worker(store, tmp_path):
    with local_cluster(1, dashboard_address=None, silence_logs=logging.WARNING) as cluster:
        with Client(cluster) as c:
            train(tiny_config(store, tmp_path / "one", **SIMD_NET), client=c)
    workers = {
        f"w{nbytes}": {
            "cls": Nanny,
            "options": {"nthreads": 1, "env": {"CONVPIPE_VECTOR_BYTES": str(nbytes)}},
        }
        for nbytes in (16, 32, 64)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    with SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING) as mixed:
        with Client(mixed) as c:
            assert sorted(c.run(fast_layers.vector_bytes).values()) == [16, 32, 64]
            for transport in ("shm", "tcp"):
                summary = train(
                    tiny_config(store, tmp_path / transport, transport=transport, **SIMD_NET),
                    client=c,
                )
                assert summary["workers"] == 3
                assert_same_params(
                    final_params(tmp_path / "one"), final_params(tmp_path / transport)
                )
