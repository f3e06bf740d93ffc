"""A network as a short list of cs231n layers: the spec a job, the CLI and :class:`ConvNet` share.

A spec is text, one layer after another separated by commas; each layer is its kind, then its
positional values, then ``key=value`` settings::

    conv 64 3, bn, relu, pool 2, conv 128 3, bn, relu, pool 2, gap, affine, softmax smoothing=0.2

=========  =====================  =============================================================
kind       positional             settings
=========  =====================  =============================================================
conv       filters [size=3]       stride=1, pad (default (size - 1) // 2: 'same' at stride 1),
                                  init=default (PyTorch's), dirac (its first min(filters,
                                  channels) filters pass their channel through: airbench's), or
                                  whiten (the first conv only: patch whitening from the
                                  training images, then frozen)
bn         -                      momentum=0.9 (cs231n's: running = m * running + (1 - m) *
                                  batch), eps=1e-5, scale=true (false: gamma frozen at one)
gn         groups                 eps=1e-5
relu, gelu -                      -
pool       size [=2]              stride (default: size): max pooling; the last rows and
                                  columns that no whole window covers are left out (PyTorch's
                                  floor), so a 2x2 pool takes 31x31 to 15x15
gap, gmp   -                      -  (global average / max pooling: (C, H, W) -> (C,))
affine     [units]                -  (units default: the number of classes)
scale      factor                 -  (multiplies its input by a constant)
softmax    -                      smoothing=0.0 (label smoothing); only last, and optional
=========  =====================  =============================================================

Aliases: ``batchnorm``/``spatial_batchnorm`` (bn), ``groupnorm`` (gn), ``maxpool`` (pool),
``linear`` (affine). Parameters are named as cs231n's nets name them: the k-th conv or affine
layer has ``Wk`` and ``bk``, the k-th norm ``gammak`` and ``betak`` (a bn with scale=false has
no gamma). So ``conv 32 7, relu, pool 2, affine 500, relu, affine`` is
:class:`~pipeline.cnn.ThreeLayerConvNet`'s network, with its parameter names.

Everything here is pure: specs are frozen values (``from_text``/``to_text``,
``from_dict``/``to_dict``), and :meth:`NetSpec.shapes` checks that a spec fits an input before
any array exists, with one-line messages naming the layer (:class:`NetSpecError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.options import literal


class NetSpecError(ValueError):
    """A model spec that cannot be built: the message names the layer and what was expected."""


@dataclass(frozen=True)
class Layer:
    """One layer of a spec: its kind and its settings (every one filled in)."""

    kind: str
    filters: int = 0  # conv
    size: int = 0  # conv, pool
    stride: int = 1  # conv, pool
    pad: int = 0  # conv
    groups: int = 0  # gn
    units: int = 0  # affine (0: the number of classes)
    factor: float = 1.0  # scale
    momentum: float = 0.9  # bn
    eps: float = 1e-5  # bn, gn
    scale: bool = True  # bn: gamma learned
    smoothing: float = 0.0  # softmax
    init: str = "default"  # conv: "whiten" (patch whitening, frozen) or "dirac" (identity part)

    @property
    def has_weights(self) -> bool:
        return self.kind in ("conv", "affine")

    @property
    def is_norm(self) -> bool:
        return self.kind in ("bn", "gn")

    def to_text(self) -> str:
        """The layer as spec text, positional values first, settings that differ from their
        defaults after."""
        pos = [str(getattr(self, k)) for k in _KINDS[self.kind][0]]
        if self.kind == "affine" and not self.units:
            pos = []
        if self.kind == "pool" and self.stride == self.size:
            keys = ()
        else:
            keys = _KINDS[self.kind][1]
        default = _default(self.kind, self)
        extra = [
            f"{k}={_text(getattr(self, k))}"
            for k in keys
            if getattr(self, k) != getattr(default, k)
        ]
        return " ".join([self.kind, *pos, *extra])

    def to_dict(self) -> dict:
        pos, keys = _KINDS[self.kind]
        d = {"kind": self.kind, **{k: getattr(self, k) for k in (*pos, *keys)}}
        if self.kind == "affine" and not self.units:
            del d["units"]  # the number of classes
        return d


# kind: (positional names, setting names); the first positional of conv/gn/scale is required
_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "conv": (("filters", "size"), ("stride", "pad", "init")),
    "bn": ((), ("momentum", "eps", "scale")),
    "gn": (("groups",), ("eps",)),
    "relu": ((), ()),
    "gelu": ((), ()),
    "pool": (("size",), ("stride",)),
    "gap": ((), ()),
    "gmp": ((), ()),
    "affine": (("units",), ()),
    "scale": (("factor",), ()),
    "softmax": ((), ("smoothing",)),
}
_REQUIRED = {"conv": "filters", "gn": "groups", "scale": "factor"}
#: a conv's initial weights: PyTorch's default, patch whitening (airbench's first layer), or
#: the default with an identity part (dirac, airbench's other convs)
INITS = ("default", "whiten", "dirac")
_ALIASES = {
    "batchnorm": "bn",
    "spatial_batchnorm": "bn",
    "groupnorm": "gn",
    "maxpool": "pool",
    "linear": "affine",
}
_TYPES = {f.name: f.type for f in dataclasses.fields(Layer)}


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _literal(raw: str):
    """A setting's value from its text: a TOML number or boolean, else the word itself."""
    value = literal(raw)
    return raw if isinstance(value, str) else value


def _default(kind: str, given: Layer | None = None) -> Layer:
    """The layer of ``kind`` with default settings (pad and stride follow the given size)."""
    if kind == "conv":
        size = given.size if given else 3
        return Layer("conv", size=size, pad=(size - 1) // 2)
    if kind == "pool":
        size = given.size if given else 2
        return Layer("pool", size=size, stride=size)
    return Layer(kind)


def _check_value(where: str, key: str, value):
    """``value`` for setting ``key``, of its type and range."""
    want = _TYPES[key]
    if want == "str":
        if value not in INITS:
            raise NetSpecError(f"{where}: {key} must be one of {', '.join(INITS)}, got {value!r}")
        return value
    if want == "bool":
        if not isinstance(value, bool):
            raise NetSpecError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NetSpecError(f"{where}: {key} must be a number, got {value!r}")
    if want == "int":
        if value != value or value in (float("inf"), float("-inf")) or value != int(value):
            raise NetSpecError(f"{where}: {key} must be a whole number, got {value!r}")
        value = int(value)
        least = 0 if key == "pad" else 1
        if value < least:
            raise NetSpecError(f"{where}: {key} must be >= {least}, got {value}")
        return value
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise NetSpecError(f"{where}: {key} must be finite, got {value!r}")
    if key == "momentum" and not 0.0 <= value <= 1.0:
        raise NetSpecError(f"{where}: momentum must be in [0, 1], got {value}")
    if key == "eps" and not value > 0:
        raise NetSpecError(f"{where}: eps must be > 0, got {value}")
    if key == "smoothing" and not 0.0 <= value < 1.0:
        raise NetSpecError(f"{where}: smoothing must be in [0, 1), got {value}")
    return value


def make_layer(kind: str, values: dict, where: str) -> Layer:
    """A :class:`Layer` of ``kind`` from its settings by name (checked)."""
    kind = _ALIASES.get(kind, kind)
    if kind not in _KINDS:
        raise NetSpecError(f"{where}: unknown layer {kind!r} (known: {', '.join(_KINDS)})")
    pos, keys = _KINDS[kind]
    allowed = (*pos, *keys)
    for key in values:
        if key not in allowed:
            raise NetSpecError(
                f"{where}: {kind} has no setting {key!r}"
                + (f" (it has {', '.join(allowed)})" if allowed else " (it takes none)")
            )
    if kind in _REQUIRED and _REQUIRED[kind] not in values:
        raise NetSpecError(f"{where}: {kind} needs its {_REQUIRED[kind]}")
    checked = {k: _check_value(where, k, v) for k, v in values.items()}
    base = _default(kind, Layer(kind, size=checked.get("size", 0)) if "size" in checked else None)
    return dataclasses.replace(base, **checked)


def parse_layer(text: str, where: str) -> Layer:
    """One layer from its text: ``kind positional... key=value...``."""
    words = text.split()
    if not words:
        raise NetSpecError(f"{where}: empty layer (two commas in a row?)")
    kind = _ALIASES.get(words[0].lower(), words[0].lower())
    if kind not in _KINDS:
        raise NetSpecError(f"{where}: unknown layer {words[0]!r} (known: {', '.join(_KINDS)})")
    positional, values = _KINDS[kind][0], {}
    for i, word in enumerate(words[1:]):
        key, eq, raw = word.partition("=")
        if not eq:
            if values and any(k not in positional for k in values):
                raise NetSpecError(f"{where}: positional value {word!r} after a key=value")
            if i >= len(positional):
                raise NetSpecError(
                    f"{where}: {kind} takes "
                    + (
                        f"at most {len(positional)} positional value(s) ({', '.join(positional)})"
                        if positional
                        else "no positional value"
                    )
                    + f", got {word!r}"
                )
            key, raw = positional[i], word
        if key in values:
            raise NetSpecError(f"{where}: {key} is given twice")
        values[key] = _literal(raw)
    return make_layer(kind, values, where)


@dataclass(frozen=True)
class NetSpec:
    """A network: its layers in order (the loss, softmax, last; added when the text omits it)."""

    layers: tuple[Layer, ...]

    # ---- conversions ---------------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, where: str = "model") -> NetSpec:
        lines = [line.strip().rstrip(",") for line in str(text).splitlines()]
        parts = [p.strip() for p in ", ".join(line for line in lines if line).split(",")]
        while parts and not parts[-1]:
            parts.pop()
        if not parts or parts == [""]:
            raise NetSpecError(f"{where}: no layers")
        return cls._of(
            [parse_layer(p, f"{where} layer {i + 1} {p!r}") for i, p in enumerate(parts)], where
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> NetSpec:
        """From ``{"layers": [...]}``, each layer a text or a table
        ``{"kind": ..., key: value}``."""
        unknown = sorted(set(d) - {"layers"}) if isinstance(d, dict) else []
        if unknown:
            raise NetSpecError(f"{where}: unknown key {unknown[0]!r} (the model has 'layers')")
        layers = d.get("layers") if isinstance(d, dict) else None
        if not isinstance(layers, (list, tuple)) or not layers:
            raise NetSpecError(f"{where}: expected a table with a list 'layers', got {d!r}")
        out = []
        for i, item in enumerate(layers):
            at = f"{where} layer {i + 1}"
            if isinstance(item, str):
                out.append(parse_layer(item, f"{at} {item!r}"))
            elif isinstance(item, dict) and isinstance(item.get("kind"), str):
                values = {k: v for k, v in item.items() if k != "kind"}
                out.append(make_layer(item["kind"].lower(), values, at))
            else:
                raise NetSpecError(f"{at}: expected a text or a table with a 'kind', got {item!r}")
        return cls._of(out, where)

    @classmethod
    def _of(cls, layers: list[Layer], where: str) -> NetSpec:
        for i, layer in enumerate(layers[:-1]):
            if layer.kind == "softmax":
                raise NetSpecError(f"{where} layer {i + 1}: softmax is the loss; it comes last")
        if layers[-1].kind != "softmax":
            layers = [*layers, Layer("softmax")]
        return cls(tuple(layers))

    def to_text(self) -> str:
        layers = self.layers
        if layers[-1] == Layer("softmax"):
            layers = layers[:-1]
        return ", ".join(layer.to_text() for layer in layers)

    def to_dict(self) -> dict:
        return {"layers": [layer.to_dict() for layer in self.layers]}

    # ---- what it computes ----------------------------------------------------------------------
    @property
    def body(self) -> tuple[Layer, ...]:
        """The layers before the loss."""
        return self.layers[:-1]

    @property
    def smoothing(self) -> float:
        return self.layers[-1].smoothing

    def shapes(self, input_dim, num_classes: int) -> list[tuple[int, ...]]:
        """The output shape of each body layer for one image of ``input_dim`` (C, H, W);
        raises :class:`NetSpecError` naming the first layer that does not fit."""
        shape = tuple(int(d) for d in input_dim)
        out = []
        for i, layer in enumerate(self.body):
            if layer.init == "whiten":
                _check_whiten(
                    i, layer, self.body, shape, f"model layer {i + 1} '{layer.to_text()}'"
                )
            shape = _out_shape(
                layer, shape, num_classes, f"model layer {i + 1} '{layer.to_text()}'"
            )
            out.append(shape)
        if out and out[-1] != (num_classes,) or not out:
            got = "the input" if not out else f"{_shape_text(out[-1])}"
            raise NetSpecError(
                f"model: the network ends with {got}, expected one score per class "
                f"({num_classes},): end it with 'affine' (no units: one per class) or "
                f"'affine {num_classes}'"
            )
        return out

    def param_shapes(self, input_dim, num_classes: int) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every parameter, in the order of the layers."""
        shapes, names = {}, self.names()
        inputs = [tuple(input_dim), *self.shapes(input_dim, num_classes)]
        for layer, x, own in zip(self.body, inputs, names):
            if layer.kind == "conv":
                shapes[own["w"]] = (layer.filters, x[0], layer.size, layer.size)
                shapes[own["b"]] = (layer.filters,)
            elif layer.kind == "affine":
                units = layer.units or num_classes
                shapes[own["w"]] = (_size(x), units)
                shapes[own["b"]] = (units,)
            elif layer.is_norm:
                if "gamma" in own:
                    shapes[own["gamma"]] = (x[0],)
                shapes[own["beta"]] = (x[0],)
        return shapes

    def names(self) -> list[dict[str, str]]:
        """For each body layer, its parameters' names by role (w, b, gamma, beta)."""
        weights = norms = 0
        out = []
        for layer in self.body:
            if layer.has_weights:
                weights += 1
                out.append({"w": f"W{weights}", "b": f"b{weights}"})
            elif layer.is_norm:
                norms += 1
                own = {"beta": f"beta{norms}"}
                if layer.kind == "gn" or layer.scale:
                    own["gamma"] = f"gamma{norms}"
                out.append(own)
            else:
                out.append({})
        return out

    def bn_channels(self, input_dim, num_classes: int) -> list[int]:
        """Channels of each bn layer, in order (their running statistics, concatenated, are the
        model's state)."""
        inputs = [tuple(input_dim), *self.shapes(input_dim, num_classes)]
        return [x[0] for layer, x in zip(self.body, inputs) if layer.kind == "bn"]


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _tiles(where: str, what: str, H: int, W: int, k: int, s: int, padded: str) -> None:
    """Raise unless windows of ``k`` at stride ``s`` tile H and W exactly (cs231n's rule)."""
    for side in (H, W):
        if (side - k) % s:
            raise NetSpecError(
                f"{where}: a {what} does not tile the input{padded} ({side} - {k} is not a "
                f"multiple of {s})"
            )


def _check_whiten(i: int, layer: Layer, body, x: tuple[int, ...], where: str) -> None:
    """A whitening conv sees the images (scaled at most) and has two filters per patch value."""
    if any(before.kind != "scale" for before in body[:i]):
        raise NetSpecError(
            f"{where}: init=whiten is for a first conv on the images (a scale before it at most)"
        )
    want = 2 * x[0] * layer.size * layer.size
    if layer.filters != want:
        raise NetSpecError(
            f"{where}: init=whiten needs 2 x {x[0]} x {layer.size} x {layer.size} = {want} "
            f"filters (each patch direction and its negative), got {layer.filters}"
        )


def _out_shape(layer: Layer, x: tuple[int, ...], num_classes: int, where: str) -> tuple[int, ...]:
    kind = layer.kind
    if kind in ("conv", "bn", "gn", "pool", "gap", "gmp") and len(x) != 3:
        raise NetSpecError(
            f"{where}: needs images (C, H, W), got {_shape_text(x)} (after a global pool or "
            "an affine layer)"
        )
    if kind == "conv":
        C, H, W = x
        k, s, p = layer.size, layer.stride, layer.pad
        if H + 2 * p < k or W + 2 * p < k:
            raise NetSpecError(
                f"{where}: a {k}x{k} filter does not fit a {H}x{W} input padded by {p}"
            )
        _tiles(
            where, f"{k}x{k} filter at stride {s}", H + 2 * p, W + 2 * p, k, s, f" padded by {p}"
        )
        return (layer.filters, (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1)
    if kind == "gn" and x[0] % layer.groups:
        raise NetSpecError(f"{where}: {layer.groups} groups do not divide {x[0]} channels")
    if kind == "pool":
        C, H, W = x
        if H < layer.size or W < layer.size:
            raise NetSpecError(
                f"{where}: a {layer.size}x{layer.size} pool leaves no pixels of a {H}x{W} input"
            )
        # windows that would overhang the last rows and columns are left out (as PyTorch)
        return (C, (H - layer.size) // layer.stride + 1, (W - layer.size) // layer.stride + 1)
    if kind in ("gap", "gmp"):
        return (x[0],)
    if kind == "affine":
        return (layer.units or num_classes,)
    return x
