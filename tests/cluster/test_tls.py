"""TLS with client certificates: a scheduler started with TLS refuses a client without the
cluster's certificate, and a client holding it trains (directly and as a submitted job)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.cluster import ClusterError, InsecureSchedulerWarning, connect, plaintext_risk
from pipeline.cluster import security as sec
from pipeline.cluster.security import TLSConfigError, TLSFiles, security_for
from tests.helpers.cluster import TINY_SETS, TINY_TRAIN, ProcessCluster, convpipe, wait_status

REPO = Path(__file__).resolve().parents[2]


def make_certs(directory: Path) -> dict[str, str]:
    """A throwaway CA with scheduler/worker/client certificates: ``cryptography`` if installed
    (what ``convpipe certs`` uses), else the openssl command."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _openssl_certs(directory)
    return {k: str(v) for k, v in sec.make_certificates(directory).items()}


def _openssl_certs(d: Path) -> dict[str, str]:
    if not shutil.which("openssl"):
        pytest.skip("neither the cryptography package nor the openssl command is available")
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
    )
    paths = {"ca": str(d / "ca.pem"), "ca-key": str(d / "ca-key.pem")}
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for role in ("scheduler", "worker", "client"):
        run(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{role}-key.pem",
            "-out",
            f"{role}.csr",
            "-subj",
            f"/CN={role}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{role}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            f"{role}.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        )
        paths[role], paths[f"{role}-key"] = str(d / f"{role}.pem"), str(d / f"{role}-key.pem")
    return paths


def tls_env(certs: dict) -> dict:
    return {
        "CONVPIPE_TLS_CA_FILE": certs["ca"],
        "CONVPIPE_TLS_CERT": certs["client"],
        "CONVPIPE_TLS_KEY": certs["client-key"],
    }


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    from tests.helpers.training import make_store

    work = tmp_path_factory.mktemp("tls")
    certs = make_certs(work / "certs")
    make_store(work / "data" / "cifar10.zarr")
    with ProcessCluster(
        work,
        n_workers=2,
        tls=certs,
        env={"CONVPIPE_TLS_CA_FILE": "", "CONVPIPE_TLS_CERT": "", "CONVPIPE_TLS_KEY": ""},
    ) as pc:
        yield pc, certs, work


# ---------------------------------------------------------------- refused


def test_a_client_without_a_certificate_is_refused(tls_cluster, monkeypatch):
    pc, certs, work = tls_cluster
    for var in sec.ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CONVPIPE_CONFIG", str(work / "no-config.toml"))
    (work / "no-config.toml").write_text("")
    env = {**{v: "" for v in sec.ENV.values()}, "CONVPIPE_CONFIG": str(work / "no-config.toml")}

    # no certificate at all: convpipe says so before connecting
    r = convpipe("status", "--scheduler", pc.address, cwd=work, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "uses TLS but no client certificate is configured" in r.stderr

    # plain TCP to the TLS port: the scheduler drops the connection
    plain = pc.address.replace("tls://", "tcp://")
    r = convpipe("status", "--scheduler", plain, "--timeout", "3", cwd=work, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"cannot reach the Dask scheduler at {plain}" in r.stderr

    # a certificate from another CA: the scheduler refuses the handshake
    other = make_certs(work / "other-certs")
    r = convpipe(
        "status", "--scheduler", pc.address, "--timeout", "3", cwd=work, env=tls_env(other)
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"cannot reach the Dask scheduler at {pc.address}" in r.stderr
    assert "TLS handshake failed" in pc.log("scheduler")

    # and from Python: the same refusal, nothing submitted
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with connect(
            pc.address,
            security=TLSFiles(other["ca"], other["client"], other["client-key"], "t").security(),
            timeout=3,
        ):
            pass


# ---------------------------------------------------------------- accepted


def test_a_client_with_the_certificate_trains_and_submits(tls_cluster):
    pc, certs, work = tls_cluster
    env = tls_env(certs)
    r = convpipe(
        "train",
        "--scheduler",
        pc.address,
        "--out",
        "data/runs/tls-direct",
        "--steps",
        "3",
        *TINY_TRAIN,
        cwd=work,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((work / "data" / "runs" / "tls-direct" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["workers"] == 2

    sets = [a for s in TINY_SETS for a in ("--set", s)]
    r = convpipe(
        "submit",
        REPO / "jobs" / "train-three-layer.toml",
        "--scheduler",
        pc.address,
        "--set",
        "steps=3",
        *sets,
        cwd=work,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    job = r.stdout.split()[0]
    status = wait_status(job, pc.address, work, env=env)
    assert status["state"] == "done", status
    assert status["worker"].startswith("tls://")
    assert (Path(status["run_dir"]) / "params.npz").exists()


# ---------------------------------------------------------------- where the certificate comes from


def test_tls_files_come_from_spec_then_env_then_config_file(tmp_path, monkeypatch):
    for var in sec.ENV.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CONVPIPE_CONFIG", str(tmp_path / "config.toml"))
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    (tmp_path / "config.toml").write_text("")
    assert sec.find_tls() is None or sec.find_tls().origin.startswith("Dask")
    (tmp_path / "config.toml").write_text(
        'scheduler = "tls://h:8786"\n[tls]\nca-file = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n'
    )
    found = sec.find_tls()
    assert found.origin.startswith("config file") and found.ca_file == str(tmp_path / "ca.pem")
    monkeypatch.setenv("CONVPIPE_TLS_CA_FILE", "/e/ca.pem")
    with pytest.raises(TLSConfigError, match="missing CONVPIPE_TLS_CERT, CONVPIPE_TLS_KEY"):
        sec.find_tls()
    monkeypatch.setenv("CONVPIPE_TLS_CERT", "/e/c.pem")
    monkeypatch.setenv("CONVPIPE_TLS_KEY", "/e/k.pem")
    assert sec.find_tls().origin == "the environment"
    explicit = TLSFiles("a", "b", "c", "job spec")
    assert sec.find_tls(explicit) is explicit
    with pytest.raises(TLSConfigError, match="does not exist"):
        security_for("tls://h:1", explicit)
    with pytest.raises(TLSConfigError, match="not a tls:// address"):
        security_for("tcp://h:1", explicit)
    assert security_for("tcp://h:1") is None


def test_a_malformed_config_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVPIPE_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text("[tls\n")
    with pytest.raises(TLSConfigError, match="config.toml"):
        sec.read_config()
    monkeypatch.setenv("CONVPIPE_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(TLSConfigError, match="does not exist"):
        sec.read_config()


def test_convpipe_certs_writes_a_working_set(tmp_path):
    pytest.importorskip("cryptography")
    r = convpipe("certs", tmp_path / "certs", "--host", "scheduler", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (tmp_path / "certs").iterdir())
    assert files == [
        "ca.pem",
        "client-key.pem",
        "client.pem",
        "scheduler-key.pem",
        "scheduler.pem",
        "worker-key.pem",
        "worker.pem",
    ]
    assert oct((tmp_path / "certs" / "client-key.pem").stat().st_mode & 0o777) == "0o600"
    ca_key = tmp_path / "certs-ca" / "ca-key.pem"
    assert (
        oct(ca_key.stat().st_mode & 0o777) == "0o600"
        and oct(ca_key.parent.stat().st_mode & 0o777) == "0o700"
    )
    assert str(ca_key) in r.stdout
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.pem").read_bytes())
    client = x509.load_pem_x509_certificate((tmp_path / "certs" / "client.pem").read_bytes())
    client.verify_directly_issued_by(ca)


def test_the_folder_the_containers_mount_holds_no_ca_key(tmp_path):
    """docker-compose.tls.yml mounts CONVPIPE_CERTS into every container: no key there may sign."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.cluster.test_compose_config import compose_config, mounts

    r = convpipe("certs", tmp_path / "certs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = compose_config(
        "docker-compose.yml",
        "docker-compose.tls.yml",
        env={"CONVPIPE_CERTS": str(tmp_path / "certs")},
    )
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.pem").read_bytes())
    ca_public = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for name in ("scheduler", "worker", "job"):
        mounted = Path(mounts(cfg["services"][name])["/certs"])
        assert mounted == tmp_path / "certs"
        for f in mounted.rglob("*"):
            assert f.name != "ca-key.pem"
            if f.is_file() and b"PRIVATE KEY" in f.read_bytes():
                key = serialization.load_pem_private_key(f.read_bytes(), password=None)
                public = key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                assert public != ca_public, f"{f} is the CA's private key"
    assert (tmp_path / "certs-ca" / "ca-key.pem").exists()


def test_the_ca_key_folder_cannot_be_the_mounted_one(tmp_path):
    pytest.importorskip("cryptography")
    for inside in (tmp_path / "certs", tmp_path / "certs" / "private"):
        with pytest.raises(TLSConfigError, match="must not be .* or inside it"):
            sec.make_certificates(tmp_path / "certs", ca_dir=inside)


# ---------------------------------------------------------------- plain TCP to another host


@pytest.mark.parametrize(
    "address, risky",
    [
        ("tcp://10.0.0.5:8786", True),
        ("10.0.0.5:8786", True),
        ("tcp://scheduler:8786", True),
        ("ws://10.0.0.5:8786", True),
        ("tcp://127.0.0.1:8786", False),
        ("tcp://127.0.0.2:8786", False),
        ("tcp://[::1]:8786", False),
        ("localhost:8786", False),
        ("tcp://localhost:8786", False),
        ("tls://10.0.0.5:8786", False),
        ("inproc://10.0.0.5/1/2", False),
    ],
)
def test_plaintext_risk_is_named_for_other_hosts_only(address, risky):
    risk = plaintext_risk(address)
    assert bool(risk) == risky
    if risky:
        assert "\n" not in risk and "anyone who can reach it can run code" in risk
        assert "convpipe certs" in risk and "tls://" in risk


def test_connecting_over_tcp_to_another_host_warns(tmp_path):
    unroutable = "tcp://192.0.2.1:9"  # TEST-NET-1: nothing answers
    with (
        pytest.warns(InsecureSchedulerWarning, match="reached without TLS"),
        pytest.raises(ClusterError),
    ):
        with connect(unroutable, timeout=1):
            pass
    env = {**{v: "" for v in sec.ENV.values()}, "CONVPIPE_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    r = convpipe("status", "--scheduler", unroutable, "--timeout", "1", cwd=tmp_path, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 2, r.stderr
    assert lines[0] == f"convpipe: warning: {plaintext_risk(unroutable)}"
    assert lines[1].startswith(f"convpipe: error: cannot reach the Dask scheduler at {unroutable}")
    r = convpipe(
        "status", "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1", cwd=tmp_path, env=env
    )
    assert r.returncode == 2 and "warning" not in r.stderr and r.stderr.count("\n") == 1


def _handshake(tmp_path, paths, server_role, client_role):
    """A real TLS handshake on 127.0.0.1 with the cluster's settings (each side requires and
    checks the other's certificate against ca.pem): None, or the errors of both sides."""
    import socket
    import ssl
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths[server_role], paths[f"{server_role}-key"])
    server_ctx.load_verify_locations(paths["ca"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(paths[client_role], paths[f"{client_role}-key"])
    client_ctx.load_verify_locations(paths["ca"])
    client_ctx.check_hostname = False
    errors = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError) as exc:
                errors.append(f"server: {exc}")

        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with client_ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"x")
        except (ssl.SSLError, OSError) as exc:
            errors.append(f"client: {exc}")
        t.join()
    return "; ".join(sorted(errors)) or None


def test_each_certificate_has_the_key_usage_of_its_role(tmp_path):
    """The scheduler's and workers' certificates serve and connect; the client's only connects:
    a process holding client.pem cannot pose as the scheduler."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

    paths = sec.make_certificates(tmp_path / "certs")
    for role, usage in {
        "scheduler": {EKU.SERVER_AUTH, EKU.CLIENT_AUTH},
        "worker": {EKU.SERVER_AUTH, EKU.CLIENT_AUTH},
        "client": {EKU.CLIENT_AUTH},
    }.items():
        cert = x509.load_pem_x509_certificate(paths[role].read_bytes())
        assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == usage
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert _handshake(tmp_path, paths, "scheduler", "client") is None
    assert _handshake(tmp_path, paths, "worker", "scheduler") is None  # the scheduler calls workers
    assert _handshake(tmp_path, paths, "worker", "worker") is None
    refused = _handshake(tmp_path, paths, "client", "worker")
    assert refused is not None and "unsuitable certificate purpose" in refused, refused
