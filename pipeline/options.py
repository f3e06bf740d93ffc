"""Typed settings: the types a setting accepts, checking a value, parsing command-line text.

One piece of code for :class:`pipeline.training.config.TrainConfig` (``convpipe train``'s
options, ``config.json``) and for job-spec options (:mod:`pipeline.jobs.spec`, TOML and
``--set key=value``); each words its own errors from :class:`WrongType`.

A setting accepts values of its ``kinds`` (int, float, str, bool) and ``None`` when it is
optional. ``True`` is not an int or a float; an int is accepted where only a float is (TOML's
``lr = 1``) and becomes that float; nothing else is converted.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass

NONE_WORDS = ("none", "null", "")
BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


class WrongType(ValueError):
    """A value that is none of a setting's types; ``value`` is the value as read."""

    def __init__(self, value):
        super().__init__(repr(value))
        self.value = value


@dataclass(frozen=True)
class ValueType:
    """What a setting accepts: ``kinds`` (in order of preference) and whether ``None`` is one."""

    kinds: tuple[type, ...]
    optional: bool = False

    @classmethod
    def of(cls, hint) -> ValueType:
        """From a type hint (``int``, ``str | None``) or a tuple of types
        (``(int, type(None))``)."""
        if isinstance(hint, tuple):
            args = hint
        elif isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = typing.get_args(hint)
        else:
            args = (hint,)
        return cls(tuple(a for a in args if a is not type(None)), type(None) in args)

    def name(self) -> str:
        """``int``, ``int or none``, ``str or int``: for messages."""
        names = " or ".join(k.__name__ for k in self.kinds)
        return f"{names} or none" if self.optional else names

    def accepts(self, value) -> bool:
        """Whether ``value`` is already of one of the types (no conversion)."""
        if value is None:
            return self.optional
        return any(
            isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
            for k in self.kinds
        )

    def convert(self, value):
        """``value`` as this type: an int becomes a float where only a float is accepted; else
        :class:`WrongType`."""
        if (
            float in self.kinds
            and int not in self.kinds
            and isinstance(value, int)
            and not isinstance(value, bool)
        ):
            return float(value)
        if not self.accepts(value):
            raise WrongType(value)
        return value

    def parse(self, text: str):
        """The value of command-line text (``--batch-size 64``, ``--set steps=none``).

        ``none``/``null``/empty is None for an optional setting (empty text is not, for one that
        takes only text: an empty ``--model`` is a mistake, not "leave it out"); a number as
        Python reads it (``1e-3``, ``.5``, ``1_000``); true/false/yes/no for a bool; for a
        string, a quoted TOML string's value (``"groupnorm"``) or else the text itself.
        Otherwise :class:`WrongType` with the value as TOML reads the text.
        """
        word = text.strip().lower()
        if self.optional and word in NONE_WORDS and (word or self.kinds != (str,)):
            return None
        for kind in self.kinds:
            try:
                if kind is bool:
                    return BOOL_WORDS[text.strip().lower()]
                if kind in (int, float):
                    return kind(text)
                if kind is str:
                    return _unquoted(text)
            except (KeyError, ValueError):
                continue
        raise WrongType(literal(text))


def _unquoted(text: str) -> str:
    """``"groupnorm"`` or ``'1:2'`` (a TOML string, as in a spec) as the string it writes; any
    other text as it is."""
    if text.strip()[:1] in ('"', "'"):
        value = literal(text)
        if isinstance(value, str):
            return value
    return text


def literal(text: str):
    """``text`` as a TOML value (``2.5``, ``true``), or the text itself: how a message shows it."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def field_types(cls) -> dict[str, ValueType]:
    """{field name: ValueType} of a settings dataclass, from its type hints."""
    hints = typing.get_type_hints(cls)
    return {f.name: ValueType.of(hints[f.name]) for f in dataclasses.fields(cls)}


def worker_range(value) -> tuple[int, int | None] | None:
    """The embedded cluster's size as a ``workers`` setting gives it: ``N`` (an int, or its
    text) is ``(N, None)``, a fixed size; ``"MIN:MAX"`` is ``(MIN, MAX)``, adaptive between
    them; None is None (one worker per core). ValueError says what was expected."""
    if value is None:
        return None
    text = str(value).strip()
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi) if sep else None
    except ValueError:
        raise ValueError(f"expected a number N or a range MIN:MAX, got {value!r}") from None
    if isinstance(value, bool) or low < 1 or (high is not None and high < low):
        raise ValueError(f"expected N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got {value!r}")
    return low, high
