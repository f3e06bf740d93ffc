"""What a job kind's options are: :class:`Option` (accepted types, default, help) and
:class:`SpecError`, the one-line error of a spec that does not fit. :mod:`pipeline.jobs.kinds`
declares each kind's options with these; :mod:`pipeline.jobs.spec` reads specs against them."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from pipeline.errors import ConvpipeError
from pipeline.options import ValueType, WrongType, field_types


class SpecError(ConvpipeError):
    """A job spec or an override is malformed, unknown or does not fit."""


def did_you_mean(key: str, known) -> str:
    """`` (did you mean trials?)`` when ``key`` is a near miss of one of ``known``, else ``""``
    (names compared and shown as a spec spells them: ``min-steps``)."""
    spelt = [k.replace("_", "-") for k in known]
    close = difflib.get_close_matches(key.replace("_", "-"), spelt, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


@dataclass(frozen=True)
class Option:
    """One option of a job kind: its accepted types (``type(None)`` for optional),
    default and help."""

    name: str
    types: tuple
    default: object
    help: str = ""
    keys: tuple[str, ...] = ()  # a table option's own keys (``--set search.trials=4``)

    @property
    def spelt(self) -> str:
        """The option's name as a spec or ``--set`` spells it (``batch-size``)."""
        return self.name.replace("_", "-")

    @property
    def value_type(self) -> ValueType:
        return ValueType.of(self.types)

    def check(self, value, where: str):
        """Return ``value`` as this option's type (int accepted for float); else SpecError."""
        try:
            return self.value_type.convert(value)
        except WrongType:
            raise SpecError(
                f"{where}: {self.spelt} must be {self.value_type.name()}, got {value!r}"
            ) from None

    def parse(self, text: str, where: str):
        """Parse the text of ``--set name=text`` into this option's type."""
        try:
            return self.value_type.parse(text)
        except WrongType as exc:
            raise SpecError(
                f"{where}: {self.spelt} must be {self.value_type.name()}, got {exc.value!r}"
            ) from None


def options_from_dataclass(cls, exclude: tuple[str, ...] = ()) -> dict[str, Option]:
    """Options mirroring a settings dataclass (``TrainConfig``): names, types, defaults, help."""
    types_ = field_types(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        vtype = types_[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = Option(
            f.name,
            vtype.kinds + ((type(None),) if vtype.optional else ()),
            default,
            f.metadata.get("help", ""),
        )
    return out
