"""Job specs: a TOML file plus ``--set key=value`` overrides, validated before anything runs.

A spec is flat: ``job`` names what it runs (``prepare``, ``train`` or ``evaluate``) and every
other key is an option of that command, spelt as on its command line (``batch-size`` for
``--batch-size``; ``batch_size`` is accepted too). Four keys belong to the job itself::

    job = "train"                     # prepare | train | evaluate
    name = "three-layer"              # a label for `convpipe status` (default: the file's name)
    scheduler = "tcp://127.0.0.1:8786" # where to submit (--scheduler and $CONVPIPE_SCHEDULER win)
    root = "data"                     # the shared data root: jobs/<id>/ and runs/<id>/ go there

    [model]                           # a train job's network (pipeline.netspec), or
    layers = ["conv 64 3", "bn", "relu", "pool 2", "gap", "affine"]   # model = "conv 64 3, ..."

    [tls]                             # optional client certificate for a tls:// scheduler
    ca-file = "certs/ca.pem"
    cert = "certs/client.pem"
    key = "certs/client-key.pem"

Unknown keys, values of the wrong type and settings that do not fit together are one-line
:class:`SpecError`s naming the file and the key. Paths in a spec are paths on the cluster's
workers (relative ones from a worker's working directory); whether a store exists is checked
there, by :mod:`pipeline.jobs.kinds`, before the job is queued.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from pipeline.cluster.security import TLSFiles, tls_from_table
from pipeline.jobs.kinds import KINDS
from pipeline.jobs.schema import Option, SpecError
from pipeline.netspec import NetSpec, NetSpecError
from pipeline.options import literal

#: keys of the job itself (not options of its command)
JOB_KEYS = ("job", "name", "scheduler", "root", "tls")
DEFAULT_ROOT = "data"


@dataclass
class JobSpec:
    """A validated job: its kind, label, options (canonical ``snake_case`` names) and target."""

    kind: str
    name: str
    options: dict
    scheduler: str | None = None
    root: str = DEFAULT_ROOT
    tls: TLSFiles | None = field(default=None, compare=False)
    source: str = "<spec>"

    def to_dict(self) -> dict:
        """What travels to the cluster and into the job's record (no local TLS paths)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "options": dict(self.options),
            "scheduler": self.scheduler,
            "root": self.root,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        return cls(
            kind=d["kind"],
            name=d["name"],
            options=dict(d["options"]),
            scheduler=d.get("scheduler"),
            root=d.get("root", DEFAULT_ROOT),
            source=d.get("source", "<record>"),
        )

    def to_toml(self) -> str:
        """The spec as a TOML document (what was submitted, overrides applied; unset options,
        which TOML cannot spell, left out)."""
        table = {"job": self.kind, "name": self.name, "root": self.root}
        if self.scheduler:
            table["scheduler"] = self.scheduler
        table.update({k.replace("_", "-"): v for k, v in self.options.items() if v is not None})
        return tomli_w.dumps(table)


def canonical(key: str) -> str:
    return key.strip().replace("-", "_")


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read the TOML spec at ``path``, apply ``key=value`` overrides, validate; return it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"job spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"job spec {path}: cannot read it ({exc})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"job spec {path}: not valid TOML ({exc})") from None
    return spec_from_table(
        table, where=str(path), overrides=overrides, default_name=path.stem, base=path.parent
    )


def spec_from_table(
    table: dict,
    *,
    where: str = "<spec>",
    overrides=(),
    default_name: str = "job",
    base: Path | None = None,
) -> JobSpec:
    """Validate a parsed spec (a dict as TOML gives) with ``key=value`` overrides applied."""
    table = dict(table)
    # ---- normalise keys; a key given twice (batch-size and batch_size) is an error
    flat: dict[str, object] = {}
    for key, value in table.items():
        if key == "tls":
            flat["tls"] = value
            continue
        c = canonical(key)
        if c in flat:
            raise SpecError(f"{where}: {key!r} is given twice (as {c.replace('_', '-')} and {c})")
        flat[c] = value  # a table ([search]) only where the kind has a table option: checked below

    kind = flat.get("job")
    # an override may set the kind itself
    sets = [_split_override(o) for o in overrides]
    for key, text in sets:
        if key == "job":
            kind = text
    if kind is None:
        raise SpecError(f"{where}: missing key 'job' (one of {', '.join(KINDS)})")
    if kind not in KINDS:
        raise SpecError(f"{where}: unknown job {kind!r} (expected one of {', '.join(KINDS)})")
    schema = KINDS[kind].options()
    top = {
        "name": Option("name", (str,), default_name),
        "scheduler": Option("scheduler", (str, type(None)), None),
        "root": Option("root", (str,), DEFAULT_ROOT),
        "job": Option("job", (str,), kind),
    }

    tls_table = dict(flat.pop("tls", None) or {})
    values: dict[str, object] = {}
    for key, value in flat.items():
        opt = top.get(key) or schema.get(key)
        if key == "model" and opt is not None and isinstance(value, (dict, list)):
            value = _model_text(value, where)  # a [model] table, or a list of layers
        if isinstance(value, dict) and (opt is None or dict not in opt.types):
            raise SpecError(
                f"{where}: unexpected table [{key}] (options are flat keys; the only table is "
                "[tls])"
            )
        if opt is None:
            raise SpecError(
                f"{where}: unknown key {key.replace('_', '-')!r} for a {kind} job"
                + _unknown_key_hint(schema, key)
            )
        values[key] = opt.check(value, where)
    for key, text in sets:
        if key.startswith("tls."):
            tls_table[key[4:].replace("_", "-")] = text
            continue
        table, _, sub = key.partition(".")
        if sub and table in schema and dict in schema[table].types:  # --set search.trials=4
            values[table] = {**(values.get(table) or {}), sub: literal(text)}
            continue
        opt = top.get(key) or schema.get(key)
        if opt is None:
            raise SpecError(
                f"--set {key.replace('_', '-')}: unknown key for a {kind} job"
                + _unknown_key_hint(schema, key, set_to=text)
            )
        values[key] = opt.parse(text, f"--set {key.replace('_', '-')}")

    options = {k: values.get(k, o.default) for k, o in schema.items()}
    spec = JobSpec(
        kind=kind,
        name=values.get("name") or default_name,
        options=options,
        scheduler=values.get("scheduler"),
        root=values.get("root") or DEFAULT_ROOT,
        tls=tls_from_table(tls_table, where, base=base) if tls_table else None,
        source=where,
    )
    try:
        KINDS[kind].validate(spec)
    except SpecError as exc:
        raise _blame_override(exc, where, sets) from None
    return spec


def _model_text(value: dict | list, where: str) -> str:
    """A spec's ``[model]`` table (``layers = [...]``, each a layer's text or an inline table
    ``{kind = "conv", filters = 64}``) or a bare list of layers, as the model's one-line text."""
    try:
        table = value if isinstance(value, dict) else {"layers": value}
        return NetSpec.from_dict(table, where="[model]").to_text()
    except NetSpecError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected key=value")
    key, _, value = text.partition("=")
    key = canonical(key)
    if not key:
        raise SpecError(f"--set {text!r}: expected key=value")
    return key, value.strip()


def _unknown_key_hint(schema: dict, key: str, set_to: str | None = None) -> str:
    """What to say of an unknown key: the table it belongs in when it is a key of one of the
    kind's tables (``trials`` of [search]: ``--set search.trials=4`` for a ``--set``), else the
    known keys."""
    table = next((name for name, opt in schema.items() if key in opt.keys), None)
    if table is None:
        return _known(schema)
    table = table.replace("_", "-")
    if set_to is None:
        return f" (it belongs in the [{table}] table)"
    return f" (a key of the [{table}] table: --set {table}.{key.replace('_', '-')}={set_to})"


def _blame_override(exc: SpecError, where: str, sets: list[tuple[str, str]]) -> SpecError:
    """A setting that does not fit, blamed on the ``--set`` that gave it rather than on the
    file, when the message names a key the command line set (the last such ``--set``: it is the
    one that counts). A table's key (``--set search.trials=4``) is named as ``[search] ...
    trials``. What a message lists in parentheses (the known keys, a did-you-mean) names
    nothing."""
    message = str(exc)
    if not message.startswith(f"{where}: "):
        return exc
    said = message.removeprefix(f"{where}: ")
    named = re.sub(r"\([^()]*\)", "", said)
    for key, text in reversed(sets):
        table, _, sub = key.partition(".")
        if sub and f"[{table.replace('_', '-')}]" not in named:
            continue
        name = sub or key
        spellings = f"{re.escape(name.replace('_', '-'))}|{re.escape(name)}"
        if re.search(rf"(?<![\w-])({spellings})(?![\w-])", named):
            return SpecError(f"--set {key.replace('_', '-')}={text}: {said}")
    return exc


def _known(schema: dict) -> str:
    names = sorted(k.replace("_", "-") for k in schema)
    return f" (known: {', '.join(['name', 'scheduler', 'root', '[tls]'] + names)})"
