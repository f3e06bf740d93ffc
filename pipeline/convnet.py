"""ConvNet: any network a :class:`~pipeline.netspec.NetSpec` describes, on the fast layers.

The cs231n model contract (``params``, ``loss(X, y)``, ``reg``, ``bn_param``) that the Solver,
the data-parallel workers and ``load_model`` use, as :class:`~pipeline.cnn.ThreeLayerConvNet`
has it. Neighbouring layers run fused where a fused pass exists, as the sandwich layers do:
relu then pool is one pass (``relu_max_pool_forward_fast``), conv then relu writes the ReLU with
the bias (``conv_relu_forward_fast``), affine then relu is ``layer_utils.affine_relu_*``. So the
spec ``conv 32 7, relu, pool 2, affine 500, relu, affine`` computes ThreeLayerConvNet's bits.
"""

from __future__ import annotations

import numpy as np

from pipeline import fast_layers as fl
from pipeline.fast_layers import sum_of_squares
from pipeline.layer_utils import affine_relu_backward, affine_relu_forward
from pipeline.layers import (
    affine_backward,
    affine_forward,
    relu_backward,
    relu_forward,
    softmax_loss,
)
from pipeline.netspec import NetSpec
from pipeline.optim import add_scaled
from pipeline.shapes import running_average


def add_l2(grad, w, reg):
    """grad += reg * w, in place, without NumPy's temporary for a large w (the same rounding as
    NumPy's in the dtype)."""
    if grad.flags.c_contiguous and w.flags.c_contiguous and grad.dtype == w.dtype:
        add_scaled(grad, w, reg)
    else:
        grad += reg * w


def default_init(spec: NetSpec, input_dim, num_classes: int, dtype, rng) -> dict[str, np.ndarray]:
    """Parameters of ``spec``: conv and affine weights uniform in +-1 / sqrt(fan_in) (PyTorch's
    default for Conv2d and Linear), drawn in layer order from ``rng`` (a
    ``np.random.RandomState``), a dirac conv's first min(F, C) filters then set to pass their
    channel through (a one at the centre tap); biases and betas zero, gammas one."""
    params = {}
    dirac = {own["w"] for layer, own in zip(spec.body, spec.names()) if layer.init == "dirac"}
    for name, shape in spec.param_shapes(input_dim, num_classes).items():
        if name.startswith("W"):
            fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
            bound = 1.0 / np.sqrt(fan_in)
            w = rng.uniform(-bound, bound, shape)
            if name in dirac:  # torch.nn.init.dirac_(w[:C]): filter i passes channel i through
                F, C, HH, WW = shape
                n = min(F, C)
                w[:n] = 0.0
                w[np.arange(n), np.arange(n), HH // 2, WW // 2] = 1.0
            params[name] = w.astype(dtype)
        elif name.startswith("gamma"):
            params[name] = np.ones(shape, dtype=dtype)
        else:
            params[name] = np.zeros(shape, dtype=dtype)
    return params


def whitening_filters(x: np.ndarray, size: int, eps: float = 5e-4) -> np.ndarray:
    """Patch-whitening filters (2 C size**2, C, size, size) for images x (N, C, H, W): the
    eigenvectors of the (uncentred) covariance of every size x size patch, each divided by
    the square root of its eigenvalue + eps, largest first, then the same negated (airbench's
    ``init_whitening_conv``). Computed in float64; the same images give the same filters."""
    N, C, H, W = np.shape(x)
    k = size
    cov, count = np.zeros((C * k * k, C * k * k)), 0
    for i in range(0, N, 500):  # 500 images at a time: the patches of 5,000 would be ~0.5 GB
        chunk = np.asarray(x[i : i + 500], dtype=np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(chunk, (k, k), axis=(2, 3))
        patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, C * k * k)  # (n*H'*W', Ckk)
        cov += patches.T @ patches
        count += len(patches)
    cov /= count
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    scaled = (vectors[:, order] / np.sqrt(values[order] + eps)).T.reshape(-1, C, k, k)
    return np.concatenate([scaled, -scaled])


BN_STATE = ("running_mean", "running_var")


def copy_bn_state(bn_param: dict) -> dict[str, np.ndarray]:
    """A model's BN running statistics (``get_state``'s dict), copied."""
    return {k: bn_param[k].copy() for k in BN_STATE}


def load_bn_state(bn_param: dict, state: dict, dtype) -> None:
    """Set ``bn_param``'s running statistics from ``state`` (``set_state``), shapes checked."""
    for key in BN_STATE:
        value = np.asarray(state[key], dtype=dtype)
        if value.shape != bn_param[key].shape:
            raise ValueError(f"{key} must have shape {bn_param[key].shape}, got {value.shape}")
        bn_param[key] = value.copy()


def batch_bn_param(channels: int, eps: float, dtype) -> dict:
    """A train-mode bn_param of momentum 0: the layer reports the batch's exact mean and
    variance as its "running" statistics, which the model then folds into its own with its
    momentum (a data-parallel worker reports them instead)."""
    return {
        "mode": "train",
        "momentum": 0.0,
        "eps": eps,
        "running_mean": np.zeros(channels, dtype),
        "running_var": np.zeros(channels, dtype),
    }


def write_into(into: dict, grads: dict, scale, accumulate: bool, written=()) -> dict:
    """Each gradient times ``scale`` written into ``into`` (added with ``accumulate``, the
    product rounded first), except those already ``written`` there; returns ``into``."""
    for name, g in grads.items():
        if name in written:
            continue
        if accumulate:
            add_scaled(into[name], g, scale)
        else:
            np.multiply(g, into[name].dtype.type(scale), out=into[name])
    return into


class ConvNet:
    """A network from a spec (:mod:`pipeline.netspec`), trained with softmax loss.

    Attributes:
    - spec: the :class:`NetSpec`; input_dim (C, H, W); num_classes; dtype; reg.
    - params: ``Wk``, ``bk`` of the k-th conv/affine layer; ``gammak``, ``betak`` of the k-th
      norm (no gamma for a bn with scale=false), all in ``dtype``.
    - bn_param: with bn layers, ``{'mode': 'train'|'test', 'running_mean', 'running_var'}``:
      every bn layer's running statistics concatenated in layer order (their channel counts:
      ``bn_channels``); ``{}`` without bn. Read and set whole with :meth:`get_state` /
      :meth:`set_state`.
    - last_batch_stats: after a training-mode :meth:`loss` with bn, the batch's per-channel
      ``{'mean', 'var'}``, concatenated the same way.
    """

    def __init__(
        self,
        spec: NetSpec | str,
        input_dim=(3, 32, 32),
        num_classes=10,
        reg=0.0,
        dtype=np.float32,
        seed=None,
    ):
        """
        Inputs:
        - spec: a NetSpec or its text (``"conv 32 3, bn, relu, pool 2, affine"``)
        - input_dim: (C, H, W) of one image; num_classes: scores per image
        - reg: L2 strength (loss adds 0.5 * reg * sum(W**2) over every conv and affine weight)
        - dtype: numpy float type of parameters and computation
        - seed: seed of the initialisation: an int or None (``np.random.RandomState(seed)``),
          or a ``np.random.RandomState`` to draw from
        """
        self.spec = spec if isinstance(spec, NetSpec) else NetSpec.from_text(spec)
        self.input_dim = tuple(int(d) for d in input_dim)
        self.num_classes = int(num_classes)
        self.reg = reg
        self.dtype = np.dtype(dtype)
        self._names = self.spec.names()
        self.bn_channels = self.spec.bn_channels(self.input_dim, self.num_classes)
        rng = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)
        self.params = default_init(self.spec, self.input_dim, self.num_classes, self.dtype, rng)
        whiten = [own for layer, own in zip(self.spec.body, self._names) if layer.init == "whiten"]
        #: weights that do not train (a whitening conv's): zero gradient, no L2
        self.frozen = {own["w"] for own in whiten}
        #: the whitening convs' biases, which train (airbench: for the first epochs only)
        self.whiten_biases = tuple(own["b"] for own in whiten)
        self.bn_param = {}
        if self.bn_channels:
            total = sum(self.bn_channels)
            self.bn_param = {
                "mode": "train",
                "running_mean": np.zeros(total, dtype=self.dtype),
                "running_var": np.zeros(total, dtype=self.dtype),
            }
        self.last_batch_stats = None

    def whiten(self, X) -> None:
        """Set each init=whiten conv's weights from images X (N, C, H, W) as the network sees
        them (through the scale layers before it): :func:`whitening_filters`."""
        x = np.asarray(X, dtype=np.float64)
        for layer, own in zip(self.spec.body, self._names):
            if layer.kind == "scale":
                x = x * layer.factor
            elif layer.init == "whiten":
                w = whitening_filters(x, layer.size)
                self.params[own["w"]] = w.astype(self.dtype)
                return
            else:
                return

    # -- BN running statistics --------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """Every bn layer's running statistics, concatenated (empty without bn)."""
        return copy_bn_state(self.bn_param) if self.bn_param else {}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Set the running statistics from :meth:`get_state`'s dict."""
        if self.bn_param:
            load_bn_state(self.bn_param, state, self.dtype)

    def update_running_stats(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Fold one step's batch statistics (concatenated) into the running ones, each bn
        layer with its own momentum (cs231n's rule)."""
        rm, rv = self.bn_param["running_mean"].copy(), self.bn_param["running_var"].copy()
        for momentum, sl in self._bn_slices():
            rm[sl] = running_average(rm[sl], mean[sl], momentum, self.dtype)
            rv[sl] = running_average(rv[sl], var[sl], momentum, self.dtype)
        self.bn_param["running_mean"], self.bn_param["running_var"] = rm, rv

    def _bn_slices(self):
        start = 0
        layers = [layer for layer in self.spec.body if layer.kind == "bn"]
        for layer, channels in zip(layers, self.bn_channels):
            yield layer.momentum, slice(start, start + channels)
            start += channels

    # -- forward and backward ---------------------------------------------------------------------
    def loss(self, X, y=None, *, into=None, scale=1.0, accumulate=False, frozen=()):
        """Scores for X (N, C, H, W) when y is None; else (loss, grads) for labels y (N,).

        ``into``, ``scale`` and ``accumulate``: as :meth:`ThreeLayerConvNet.loss` (each gradient
        times ``scale`` written, or added, into into[k]; an affine layer followed by a relu writes
        its weight gradient there from the pass that computes it). ``frozen``: names of
        parameters that do not train in this call, besides the network's own ``frozen``
        weights: their gradients are zero, and the backward pass stops at the first layer
        (from the input) with a parameter that trains.
        """
        X = np.asarray(X, dtype=self.dtype)
        train = y is not None
        out, caches = self._forward(X, train)
        if not train:
            return out
        data_loss, dout = softmax_loss(out, y, self.spec.smoothing)
        frozen = self.frozen.union(frozen)
        if not frozen <= self.params.keys():
            raise ValueError(f"frozen: no such parameters {sorted(frozen - self.params.keys())}")
        grads, written, sumsq = self._backward(dout, caches, into, scale, accumulate, frozen)
        reg_loss = 0.0
        for name in frozen:
            grads[name][...] = 0
        if self.reg:
            total = 0.0
            for name in self.params:
                if name.startswith("W") and name not in frozen:
                    total += sumsq[name] if name in sumsq else sum_of_squares(self.params[name])
            reg_loss = 0.5 * self.reg * total
            for name, g in grads.items():
                if name.startswith("W") and name not in written and name not in frozen:
                    add_l2(g, self.params[name], self.reg)
        if into is None:
            return data_loss + reg_loss, grads
        return data_loss + reg_loss, write_into(into, grads, scale, accumulate, written)

    def _forward(self, x, train):
        """Run the body; returns (scores, [(op, cache, parameter names, layer)] in forward
        order, one entry per pass: a fused pair of layers is one)."""
        p, body, caches = self.params, self.spec.body, []
        bn_at, batch_means, batch_vars = 0, [], []
        i = 0
        while i < len(body):
            layer, own = body[i], self._names[i]
            nxt = body[i + 1].kind if i + 1 < len(body) else None
            after = body[i + 2].kind if i + 2 < len(body) else None
            kind, op = layer.kind, layer.kind
            if kind == "conv":
                conv = {"stride": layer.stride, "pad": layer.pad}
                if nxt == "relu" and after != "pool":
                    x, cache = fl.conv_relu_forward_fast(x, p[own["w"]], p[own["b"]], conv)
                    op, i = "conv_relu", i + 1
                else:
                    x, cache = fl.conv_forward_fast(x, p[own["w"]], p[own["b"]], conv)
            elif kind == "affine":
                if nxt == "relu":
                    x, cache = affine_relu_forward(x, p[own["w"]], p[own["b"]])
                    op, i = "affine_relu", i + 1
                else:
                    x, cache = affine_forward(x, p[own["w"]], p[own["b"]])
            elif kind == "relu":
                if nxt == "pool":
                    x, cache = _cropped(fl.relu_max_pool_forward_fast, x, body[i + 1])
                    op, i = "relu_pool", i + 1
                else:
                    x, cache = relu_forward(x)
            elif kind == "bn":
                C = x.shape[1]
                gamma = p[own["gamma"]] if "gamma" in own else np.ones(C, dtype=self.dtype)
                sl = slice(bn_at, bn_at + C)
                bn_at += C
                if train:  # the batch's moments, folded in with each layer's momentum below
                    batch = batch_bn_param(C, layer.eps, self.dtype)
                    x, cache = fl.spatial_batchnorm_forward_fast(x, gamma, p[own["beta"]], batch)
                    batch_means.append(batch["running_mean"])
                    batch_vars.append(batch["running_var"])
                else:
                    test = {
                        "mode": "test",
                        "eps": layer.eps,
                        "running_mean": self.bn_param["running_mean"][sl],
                        "running_var": self.bn_param["running_var"][sl],
                    }
                    x, cache = fl.spatial_batchnorm_forward_fast(x, gamma, p[own["beta"]], test)
            elif kind == "gn":
                x, cache = fl.spatial_groupnorm_forward_fast(
                    x, p[own["gamma"]], p[own["beta"]], layer.groups, {"eps": layer.eps}
                )
            elif kind == "gelu":
                x, cache = fl.gelu_forward_fast(x)
            elif kind == "pool":
                x, cache = _cropped(fl.max_pool_forward_fast, x, layer)
            elif kind == "gap":
                x, cache = fl.global_avg_pool_forward_fast(x)
            elif kind == "gmp":
                x, cache = fl.global_max_pool_forward_fast(x)
            elif kind == "scale":
                x, cache = (x * x.dtype.type(layer.factor)).astype(x.dtype, copy=False), None
            else:  # pragma: no cover - NetSpec admits no other kind
                raise AssertionError(kind)
            caches.append((op, cache, own, layer))
            i += 1
        if train and batch_means:
            mean, var = np.concatenate(batch_means), np.concatenate(batch_vars)
            self.last_batch_stats = {"mean": mean, "var": var}
            self.update_running_stats(mean, var)
        return x, caches

    def _backward(self, dout, caches, into, scale, accumulate, frozen=frozenset()):
        """Gradients of every parameter from dout (N, classes), the caches inverted last to
        first, down to the first pass with a parameter not in ``frozen`` (those below it get
        zeros). Returns (grads, names written into ``into`` already, {name: sum(W**2)} that a
        fused pass gave)."""
        grads, written, sumsq = {}, set(), {}
        d = dout
        # below the first layer with parameters that train no gradient is needed (a scale of
        # the input; a whitening conv once its bias is frozen too)
        first = next(
            (j for j, c in enumerate(caches) if any(n not in frozen for n in c[2].values())),
            len(caches),
        )
        for j in range(len(caches) - 1, first - 1, -1):
            op, cache, own, layer = caches[j]
            need_dx = j > first
            if op == "conv_relu" or op == "conv":  # inverts conv_(relu_)forward_fast
                d, grads[own["w"]], grads[own["b"]] = fl.conv_backward_fast(d, cache, need_dx)
            elif op == "affine_relu":  # inverts affine_relu_forward
                w = own["w"]
                back = affine_relu_backward(
                    d,
                    cache,
                    compute_dx=need_dx,
                    reg=self.reg,
                    dw_out=None if into is None else into[w],
                    scale=scale,
                    add=accumulate,
                    sumsq=bool(self.reg) and need_dx,
                )
                d, grads[w], grads[own["b"]] = back[:3]
                if into is not None:
                    written.add(w)
                if self.reg:
                    written.add(w)  # its L2 gradient is added in that pass
                    if len(back) > 3:
                        sumsq[w] = back[3]
            elif op == "affine":
                d, grads[own["w"]], grads[own["b"]] = affine_backward(d, cache)
            elif op == "relu":
                d = relu_backward(d, cache)
            elif op in ("relu_pool", "pool"):  # inverts _cropped: the cut rows get zero
                shape, inner = cache
                dc = fl.max_pool_backward_fast(d, inner)
                if dc.shape != shape:
                    d = np.zeros(shape, dtype=dc.dtype)
                    d[:, :, : dc.shape[2], : dc.shape[3]] = dc
                else:
                    d = dc
            elif op == "bn":
                d, dgamma, grads[own["beta"]] = fl.spatial_batchnorm_backward_fast(d, cache)
                if "gamma" in own:
                    grads[own["gamma"]] = dgamma
            elif op == "gn":
                d, grads[own["gamma"]], grads[own["beta"]] = fl.spatial_groupnorm_backward_fast(
                    d, cache
                )
            elif op == "gelu":
                d = fl.gelu_backward_fast(d, cache)
            elif op == "gap":
                d = fl.global_avg_pool_backward_fast(d, cache)
            elif op == "gmp":
                d = fl.global_max_pool_backward_fast(d, cache)
            elif op == "scale":
                d = (d * d.dtype.type(layer.factor)).astype(d.dtype, copy=False)
        # in the params' order, as the caller's dicts are; zeros below ``first``
        return (
            {k: grads[k] if k in grads else np.zeros_like(v) for k, v in self.params.items()},
            written,
            sumsq,
        )


def _pool(layer) -> dict:
    return {"pool_height": layer.size, "pool_width": layer.size, "stride": layer.stride}


def _cropped(pool_forward, x, layer):
    """A pool layer's forward on x (N, C, H, W) without the last rows and columns no whole
    window covers (PyTorch's floor); cache: (x's shape, the pool's cache)."""
    k, s = layer.size, layer.stride
    H, W = x.shape[2:]
    Hc, Wc = (H - k) // s * s + k, (W - k) // s * s + k
    inner = x if (Hc, Wc) == (H, W) else x[:, :, :Hc, :Wc]
    out, cache = pool_forward(inner, _pool(layer))
    return out, (x.shape, cache)
