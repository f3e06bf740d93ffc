"""TLS with client certificates for a Dask cluster, from a job spec, the environment or a file.

A Dask scheduler runs whatever a connected client sends it, so a cluster reachable from other
hosts must only accept clients that hold a certificate signed by the cluster's own CA. Dask
does this itself (``distributed.security.Security``: mutual TLS, the server requires a client
certificate); this module only finds the three files and builds that object.

Where the files come from, first found wins, each a ``ca-file``, ``cert`` and ``key``:

1. explicit settings: the job spec's ``[tls]`` table or the caller's arguments;
2. the environment: ``CONVPIPE_TLS_CA_FILE``, ``CONVPIPE_TLS_CERT``, ``CONVPIPE_TLS_KEY``;
3. the ``[tls]`` table of convpipe's config file: ``$CONVPIPE_CONFIG`` or
   ``~/.config/convpipe/config.toml``;
4. Dask's own configuration (``distributed.comm.tls.ca-file`` and ``.client.cert/.key``, as
   set by ``DASK_DISTRIBUTED__COMM__TLS__...`` variables or ``~/.config/dask/*.yaml``).

TLS is used when the scheduler's address starts with ``tls://``; such an address without a
complete set of files is a one-line :class:`TLSConfigError` before anything connects.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dask
from distributed.security import Security

from pipeline.errors import ConvpipeError

ENV = {"ca_file": "CONVPIPE_TLS_CA_FILE", "cert": "CONVPIPE_TLS_CERT", "key": "CONVPIPE_TLS_KEY"}
#: keys of a ``[tls]`` table (job spec or config file)
TLS_KEYS = ("ca-file", "cert", "key")
CONFIG_ENV = "CONVPIPE_CONFIG"


class TLSConfigError(ConvpipeError):
    """TLS is asked for but its files are missing, incomplete or unreadable."""


@dataclass(frozen=True)
class TLSFiles:
    """The cluster CA's certificate and this client's certificate and private key (PEM files)."""

    ca_file: str
    cert: str
    key: str
    origin: str  # where they were found, for error messages

    def check(self) -> TLSFiles:
        for name, path in (("ca-file", self.ca_file), ("cert", self.cert), ("key", self.key)):
            if not Path(path).is_file():
                raise TLSConfigError(
                    f"TLS {name} {path} (from {self.origin}) does not exist or is not a file"
                )
        return self

    def security(self):
        """A ``distributed.security.Security`` for a client (mutual TLS, encryption required)."""
        self.check()
        return Security(
            tls_ca_file=self.ca_file,
            tls_client_cert=self.cert,
            tls_client_key=self.key,
            require_encryption=True,
        )


def config_path() -> Path:
    """convpipe's config file: ``$CONVPIPE_CONFIG`` or ``~/.config/convpipe/config.toml``."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "convpipe" / "config.toml"


def read_config() -> dict:
    """The config file's contents ({} when there is none); a malformed file is an error."""
    path = config_path()
    if not path.is_file():
        if os.environ.get(CONFIG_ENV):
            raise TLSConfigError(f"config file {path} (from ${CONFIG_ENV}) does not exist")
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TLSConfigError(f"config file {path}: {exc}") from None


def tls_from_table(table: dict, origin: str, base: Path | None = None) -> TLSFiles | None:
    """TLS files from a ``[tls]`` table; relative paths are taken from ``base``. None if empty."""
    if not table:
        return None
    if not isinstance(table, dict):
        raise TLSConfigError(f"{origin}: [tls] must be a table with {', '.join(TLS_KEYS)}")
    unknown = sorted(set(table) - set(TLS_KEYS))
    if unknown:
        raise TLSConfigError(
            f"{origin}: unknown [tls] key {unknown[0]!r} (expected {', '.join(TLS_KEYS)})"
        )
    missing = [k for k in TLS_KEYS if not table.get(k)]
    if missing:
        raise TLSConfigError(
            f"{origin}: [tls] needs {', '.join(TLS_KEYS)}; missing {', '.join(missing)}"
        )
    for k in TLS_KEYS:
        if not isinstance(table[k], str):
            raise TLSConfigError(f"{origin}: [tls] {k} must be a path (string), got {table[k]!r}")

    def path(p: str) -> str:
        p = Path(p).expanduser()
        return str(p if p.is_absolute() or base is None else base / p)

    return TLSFiles(path(table["ca-file"]), path(table["cert"]), path(table["key"]), origin)


def tls_from_env() -> TLSFiles | None:
    values = {k: os.environ.get(v, "") for k, v in ENV.items()}
    if not any(values.values()):
        return None
    missing = [ENV[k] for k, v in values.items() if not v]
    if missing:
        raise TLSConfigError(
            f"TLS from the environment needs {', '.join(ENV.values())}; missing "
            f"{', '.join(missing)}"
        )
    return TLSFiles(values["ca_file"], values["cert"], values["key"], "the environment")


def tls_from_config_file() -> TLSFiles | None:
    path = config_path()
    return tls_from_table(read_config().get("tls") or {}, f"config file {path}", base=path.parent)


def tls_from_dask_config() -> TLSFiles | None:
    get = lambda key: dask.config.get(f"distributed.comm.tls.{key}", None)  # noqa: E731
    ca, cert, key = get("ca-file"), get("client.cert"), get("client.key")
    if ca and cert:
        return TLSFiles(ca, cert, key or cert, "Dask's configuration (distributed.comm.tls)")
    return None


def find_tls(explicit: TLSFiles | None = None) -> TLSFiles | None:
    """The first set of TLS files found (see the module's docstring for the order), or None."""
    for found in (explicit, tls_from_env(), tls_from_config_file(), tls_from_dask_config()):
        if found is not None:
            return found
    return None


def security_for(address: str | None, explicit: TLSFiles | None = None):
    """The ``security`` argument for a client of ``address``: None for tcp://, Security for tls://.

    A ``tls://`` address without certificates is a :class:`TLSConfigError`; certificates given
    for a ``tcp://`` address are an error too (they would silently not be used).
    """
    if not address:
        return None
    if address.startswith("tls://"):
        files = find_tls(explicit)
        if files is None:
            raise TLSConfigError(
                f"scheduler {address} uses TLS but no client certificate is configured: set [tls] "
                f"ca-file/cert/key in the job spec or {config_path()}, or {', '.join(ENV.values())}"
            )
        return files.security()
    if explicit is not None:
        raise TLSConfigError(
            f"TLS certificates are set ({explicit.origin}) but scheduler {address} is not a tls:// "
            "address"
        )
    return None


# ---- certificates for a private cluster -----------------------------------------------------


def default_ca_dir(directory: str | Path) -> Path:
    """Where the CA's private key goes:
    a folder beside ``directory`` (``certs`` -> ``certs-ca``)."""
    d = Path(directory).resolve()
    return d.parent / f"{d.name}-ca"


def make_certificates(
    directory: str | Path,
    *,
    ca_dir: str | Path | None = None,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 365,
    common_name: str = "convpipe cluster CA",
) -> dict[str, Path]:
    """Write a new CA and certificates for the scheduler, the workers and a client.

    ``directory`` gets what the cluster's processes need and may be mounted into containers:
    ``ca.pem`` (the CA certificate) and ``{scheduler,worker,client}.pem`` / ``...-key.pem``.
    The CA's private key, which signs new certificates, goes elsewhere: ``ca_dir/ca-key.pem``
    (default :func:`default_ca_dir`, a folder beside ``directory``), mode 0600 in a 0700
    folder. Needs the ``cryptography`` package. Returns {name: path}.
    """
    try:
        from cryptography import x509  # noqa: PLC0415 (lazy: the tls extra)
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 (lazy: the tls extra)
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 (lazy: the tls extra)
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415 (lazy: the tls extra)
    except ImportError:  # pragma: no cover - depends on the environment
        raise TLSConfigError(
            "making certificates needs the 'cryptography' package (pip install cryptography), "
            "or make them with openssl"
        ) from None

    out = Path(directory)
    key_dir = Path(ca_dir) if ca_dir is not None else default_ca_dir(out)
    if key_dir.resolve() == out.resolve() or out.resolve() in key_dir.resolve().parents:
        raise TLSConfigError(
            f"the CA key folder {key_dir} must not be {out} or inside it: {out} is what "
            f"the cluster's containers mount"
        )
    out.mkdir(parents=True, exist_ok=True)
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    now = datetime.datetime.now(datetime.UTC)

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(path: Path, data: bytes, private: bool = False) -> Path:
        mode = 0o600 if private else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # also when the file was already there
            f.write(data)
        return path

    def key_usage(signs_certificates: bool):
        """ECDSA signatures (the TLS handshake's), and for the CA certificates and CRLs too."""
        return x509.KeyUsage(
            digital_signature=True,
            key_cert_sign=signs_certificates,
            crl_sign=signs_certificates,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(signs_certificates=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM)),
        "ca-key": write(key_dir / "ca-key.pem", key_pem(ca_key), private=True),
    }
    alt_names = []
    for h in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt_names.append(x509.DNSName(h))
    # what each role's certificate may be used for: the scheduler and the workers accept
    # connections (server) and open them (client: the scheduler calls its workers, a worker its
    # peers and the scheduler); a client only opens them
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    usages = {"scheduler": both, "worker": both, "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}
    for role, usage in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"convpipe {role}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(key_usage(signs_certificates=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        paths[role] = write(out / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}-key"] = write(out / f"{role}-key.pem", key_pem(key), private=True)
    return paths
