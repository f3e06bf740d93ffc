"""The embedded cluster's worker processes talk TLS with a certificate made for that cluster
alone: another user of the machine (no certificate, or another one) cannot connect to run code."""

from __future__ import annotations

import errno
import operator

import pytest
from distributed import Client
from distributed.security import Security

from pipeline.cluster import connect


def test_the_embedded_cluster_refuses_clients_without_its_certificate():
    with connect(workers=1, dashboard_address=None) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(operator.add, 1, 2).result() == 3
        # another user: plain tcp to the same port, or TLS with a certificate of their own
        for stranger, security in (
            (address.replace("tls://", "tcp://"), None),
            (address, Security.temporary()),
        ):
            with pytest.raises((OSError, TimeoutError)):
                Client(stranger, security=security, timeout=3)


@pytest.mark.parametrize(
    "exc, lost",
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
        (OSError(errno.ECONNRESET, "Connection reset by peer"), True),
        (OSError(errno.EHOSTUNREACH, "No route to host"), True),
        (OSError("Timed out trying to connect to tls://127.0.0.1:1 after 3 s"), True),
        (TimeoutError(), True),
        (OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/metrics.jsonl"), False),
        (PermissionError(errno.EACCES, "Permission denied", "/data/jobs/x"), False),
        (OSError(errno.EROFS, "Read-only file system", "/data"), False),
        (ValueError("no"), False),
    ],
)
def test_a_full_disk_or_a_permission_is_not_a_lost_scheduler(exc, lost):
    from distributed.comm.core import CommClosedError

    from pipeline.cluster import connection_lost

    assert connection_lost(exc) is lost
    assert connection_lost(CommClosedError("in <TCP (closed)>"))


def test_a_job_that_fails_on_a_full_disk_says_so(tmp_path):
    from pipeline.jobs.runner import _failure_reason

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert _failure_reason(full) == (
        f"OSError: [Errno 28] No space left on device: '{tmp_path / 'metrics.jsonl'}'"
    )
    assert _failure_reason(ConnectionResetError(errno.ECONNRESET, "reset")).startswith(
        "lost the connection to the Dask scheduler (ConnectionResetError"
    )


def test_the_command_line_reports_an_os_error_as_what_it_is(monkeypatch, capsys, tmp_path):
    from pipeline import cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/r/params.npz")

    parser = cli.build_parser()
    real_parse = parser.parse_args

    def parse(argv):
        args = real_parse(argv)
        args.func = full_disk
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["status", "--root", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        "convpipe: error: /data/runs/r/params.npz: No space left on device\n"
    )
