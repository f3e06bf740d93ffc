"""The three-layer convolutional network of cs231n assignment 2, on the fast layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.convnet import (
    ConvNet,
    add_l2,
    batch_bn_param,
    copy_bn_state,
    load_bn_state,
    write_into,
)
from pipeline.fast_layers import sum_in_order, sum_of_squares
from pipeline.layer_utils import (
    affine_relu_backward,
    affine_relu_dw_sum,
    affine_relu_dx_shards,
    affine_relu_forward,
    affine_relu_forward_shards,
    conv_bn_relu_pool_backward,
    conv_bn_relu_pool_forward,
    conv_gn_relu_pool_backward,
    conv_gn_relu_pool_forward,
    conv_relu_pool_backward,
    conv_relu_pool_forward,
)
from pipeline.layers import affine_backward, affine_forward, softmax_loss
from pipeline.netspec import NetSpec
from pipeline.shapes import check_groups, check_momentum, running_average

NORMALIZATIONS = (None, "spatial_batchnorm", "groupnorm")


class ThreeLayerConvNet:
    """conv - [spatial batchnorm | groupnorm] - relu - 2x2 max pool - affine - relu - affine
    - softmax

    Operates on minibatches of N images of shape (C, H, W). The convolution keeps the spatial
    size (stride 1, pad (filter_size - 1) // 2), so the pool halves H and W.

    Attributes:
    - params: W1 (F, C, HH, WW), b1 (F,), [gamma1, beta1 (F,)], W2 (F*H/2*W/2, hidden_dim),
      b2 (hidden_dim,), W3 (hidden_dim, num_classes), b3 (num_classes,), all in ``dtype``.
    - bn_param: with spatial batchnorm, ``{'mode', 'running_mean' (F,), 'running_var' (F,),
      'momentum', 'eps'}``; read and set whole with :meth:`get_state` / :meth:`set_state`.
    - last_batch_stats: after a training-mode :meth:`loss` with spatial batchnorm, the batch's
      per-channel ``{'mean': (F,), 'var': (F,)}`` (what a data-parallel coordinator combines).
    """

    #: weights that do not train (ConvNet's contract: a whitening conv's); none here
    frozen = frozenset()

    def __init__(
        self,
        input_dim=(3, 32, 32),
        num_filters=32,
        filter_size=7,
        hidden_dim=100,
        num_classes=10,
        weight_scale=1e-3,
        reg=0.0,
        dtype=np.float32,
        normalization=None,
        num_groups=4,
        bn_momentum=0.9,
        norm_eps=1e-5,
        seed=None,
    ):
        """
        Inputs:
        - input_dim: (C, H, W) of one image; H and W must be even (2x2 pooling).
        - num_filters, filter_size: F and the odd side HH = WW of the convolution's filters.
        - hidden_dim, num_classes: sizes of the hidden affine layer and of the scores.
        - weight_scale: standard deviation of the Gaussian that initialises W1, W2, W3
          (biases start at zero, gamma1 at one, beta1 at zero).
        - reg: L2 regularisation strength (loss adds 0.5 * reg * sum(W**2) for W1, W2, W3).
        - dtype: numpy float type of parameters and computation (float64 for gradient checks).
        - normalization: None, "spatial_batchnorm" or "groupnorm" after the convolution.
        - num_groups: groups G of group normalisation (a positive divisor of num_filters).
        - bn_momentum: momentum of spatial batchnorm's running averages, in [0, 1].
        - norm_eps: epsilon of the normalisation.
        - seed: seed of the initialisation (``np.random.default_rng(seed)``); None draws from
          ``np.random`` as cs231n does; a ``np.random.RandomState`` draws from it (the numbers
          cs231n's draws give after ``np.random.seed(s)``, without the global state).
        """
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        if len(input_dim) != 3:
            raise ValueError(f"input_dim must be (C, H, W), got {input_dim!r}")
        C, H, W = input_dim
        if H % 2 or W % 2:
            raise ValueError(f"input_dim H and W must be even for the 2x2 pool, got {input_dim!r}")
        if filter_size % 2 == 0 or filter_size < 1:
            raise ValueError(f"filter_size must be a positive odd integer, got {filter_size!r}")
        if normalization == "groupnorm":
            num_groups = check_groups(num_filters, num_groups, "num_groups", "num_filters")
        if normalization == "spatial_batchnorm":
            bn_momentum = check_momentum("bn_momentum", bn_momentum)
        self.reg = reg
        self.dtype = np.dtype(dtype)
        self.normalization = normalization
        self.num_groups = num_groups
        self.conv_param = {"stride": 1, "pad": (filter_size - 1) // 2}
        self.pool_param = {"pool_height": 2, "pool_width": 2, "stride": 2}

        if seed is None:
            randn = np.random.randn
        elif isinstance(seed, np.random.RandomState):
            randn = seed.randn
        else:
            rng = np.random.default_rng(seed)
            randn = lambda *shape: rng.standard_normal(shape)  # noqa: E731
        F, pooled = num_filters, num_filters * (H // 2) * (W // 2)
        shapes = {
            "W1": (F, C, filter_size, filter_size),
            "W2": (pooled, hidden_dim),
            "W3": (hidden_dim, num_classes),
        }
        self.params = {}
        for i, name in enumerate(("W1", "W2", "W3"), start=1):
            self.params[name] = (weight_scale * randn(*shapes[name])).astype(self.dtype)
            self.params[f"b{i}"] = np.zeros(shapes[name][-1] if i > 1 else F, dtype=self.dtype)
        if normalization is not None:
            self.params["gamma1"] = np.ones(F, dtype=self.dtype)
            self.params["beta1"] = np.zeros(F, dtype=self.dtype)
        self.bn_param = {}
        if normalization == "spatial_batchnorm":
            self.bn_param = {
                "mode": "train",
                "momentum": bn_momentum,
                "eps": norm_eps,
                "running_mean": np.zeros(F, dtype=self.dtype),
                "running_var": np.zeros(F, dtype=self.dtype),
            }
        self.gn_param = {"eps": norm_eps}
        self.last_batch_stats = None

    # -- BN running statistics: model state a caller can read and set ------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """The model's non-parameter state: BN running statistics (empty without BN)."""
        if self.normalization != "spatial_batchnorm":
            return {}
        return copy_bn_state(self.bn_param)

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Set BN running statistics from :meth:`get_state`'s dict."""
        if self.normalization == "spatial_batchnorm":
            load_bn_state(self.bn_param, state, self.dtype)

    def update_running_stats(self, mean: np.ndarray, var: np.ndarray) -> None:
        """Fold one step's batch statistics into the running ones (cs231n's momentum rule)."""
        m = self.bn_param["momentum"]
        self.bn_param["running_mean"] = running_average(
            self.bn_param["running_mean"], mean, m, self.dtype
        )
        self.bn_param["running_var"] = running_average(
            self.bn_param["running_var"], var, m, self.dtype
        )

    # -- forward and backward ------------------------------------------------------------------
    def loss(self, X, y=None, *, into=None, scale=1.0, accumulate=False):
        """Scores for X (N, C, H, W) when y is None; else (loss, grads) for labels y (N,).

        grads[k] is the gradient of the loss with respect to params[k].

        With ``into`` (a dict of C-contiguous arrays shaped and typed like params), each
        gradient times ``scale`` is written into into[k] instead, or added into it with
        ``accumulate`` (``into[k] + grad * scale``, the product rounded first), and grads is
        ``into``: a data-parallel worker's shard, its gradient sum (scale = its image count)
        going straight to its tree node. W2's, the largest, goes there from the pass that
        computes it (``fast_layers.affine_dw_l2_fast``); the bits are the same as scaling the
        gradient that this call with ``reg`` computes (for reg = 0: up to W2's product, whose
        kernel sums in another order than NumPy's).
        """
        X = np.asarray(X, dtype=self.dtype)
        p = self.params
        train = y is not None

        out1, cache1 = self._conv_block_forward(X, train)
        out2, cache2 = affine_relu_forward(out1, p["W2"], p["b2"])
        scores, cache3 = affine_forward(out2, p["W3"], p["b3"])
        if not train:
            return scores

        data_loss, dscores = softmax_loss(scores, y)

        grads = {}
        dout2, grads["W3"], grads["b3"] = affine_backward(dscores, cache3)
        # dx (with reg, also sum(W2**2) from its pass), then the conv block, then W2's gradient:
        # its 16 MB are written last, in the caches still when the update reads them
        back = affine_relu_backward(dout2, cache2, sumsq=bool(self.reg), compute_dw=False)
        dout1, _, grads["b2"] = back[:3]
        reg_loss = 0.0
        if self.reg:
            reg_loss = (
                0.5 * self.reg * (sum_of_squares(p["W1"]) + back[3] + sum_of_squares(p["W3"]))
            )
        grads.update(self._conv_block_backward(dout1, cache1))
        if self.reg:
            for name in ("W1", "W3"):
                add_l2(grads[name], p[name], self.reg)
        # dW2 + reg * W2 [, * scale into into["W2"]]
        _, grads["W2"], _ = affine_relu_backward(
            dout2,
            cache2,
            compute_dx=False,
            reg=self.reg,
            dw_out=None if into is None else into["W2"],
            scale=scale,
            add=accumulate,
        )
        if into is None:
            return data_loss + reg_loss, grads
        # W2's is there already
        return data_loss + reg_loss, write_into(into, grads, scale, accumulate, ("W2",))

    def loss_sum(self, batches, into, scales, order):
        """Several shards' gradients, each times its scale, summed in ``order`` into ``into``:
        a data-parallel worker's shards summed into one node of the reduction tree.

        Inputs:
        - batches: a list of (X (N_s, C, H, W), y (N_s,)), one per shard s
        - into: a dict of C-contiguous arrays shaped and typed like params (written)
        - scales: one per shard (its image count: its mean-loss gradient as a sum)
        - order: the sum's order, ``fast_layers.sum_in_order``'s: a shard index, or a pair
          (left, right) of orders

        Returns a list, per shard: (loss, the batch's spatial-BN statistics or None).

        The bits are those of :meth:`loss` shard by shard, ``loss(X_s, y_s, into=...,
        scale=scales[s], accumulate=...)``, along ``order`` (a right part of more than one shard
        summed in a temporary, then added). The hidden layer, whose W2 is the network's 16 MB,
        passes over W2 once for all the shards in its forward, its dx and its gradient, not
        once per shard (layer_utils' ``*_shards``, ``affine_relu_dw_sum``); the rest runs
        shard by shard.
        """
        p = self.params
        Xs = [np.asarray(X, dtype=self.dtype) for X, _ in batches]
        conv, stats = [], []
        for X in Xs:
            conv.append(self._conv_block_forward(X, True))
            stats.append(self.last_batch_stats if self.bn_param else None)
        hidden = affine_relu_forward_shards([out1 for out1, _ in conv], p["W2"], p["b2"])

        losses, grads, douts = [], [], []
        for (out2, _), (_, y) in zip(hidden, batches):
            scores, cache3 = affine_forward(out2, p["W3"], p["b3"])
            data_loss, dscores = softmax_loss(scores, y)
            g = {}
            dout2, g["W3"], g["b3"] = affine_backward(dscores, cache3)
            losses.append(data_loss)
            grads.append(g)
            douts.append(dout2)
        caches2 = [cache2 for _, cache2 in hidden]
        back = affine_relu_dx_shards(douts, caches2, sumsq=bool(self.reg))
        for s, (g, (_, cache1)) in enumerate(zip(grads, conv)):
            g["b2"] = back[1][s]
            g.update(self._conv_block_backward(back[0][s], cache1))
            if self.reg:
                losses[s] += (
                    0.5
                    * self.reg
                    * (sum_of_squares(p["W1"]) + back[2][s] + sum_of_squares(p["W3"]))
                )
                for name in ("W1", "W3"):
                    add_l2(g[name], p[name], self.reg)
        affine_relu_dw_sum(douts, caches2, scales, order, into["W2"], reg=self.reg)
        for name in grads[0]:
            sum_in_order(
                order,
                into[name],
                lambda s, dst, add, name=name: write_into(
                    {name: dst}, {name: grads[s][name]}, scales[s], add
                ),
            )
        return list(zip(losses, stats))

    def _conv_block_forward(self, X, train):
        p, conv, pool = self.params, self.conv_param, self.pool_param
        if self.normalization is None:
            return conv_relu_pool_forward(X, p["W1"], p["b1"], conv, pool)
        if self.normalization == "groupnorm":
            return conv_gn_relu_pool_forward(
                X,
                p["W1"],
                p["b1"],
                p["gamma1"],
                p["beta1"],
                conv,
                self.num_groups,
                self.gn_param,
                pool,
            )
        if not train:
            bn_param = {**self.bn_param, "mode": "test"}
            return conv_bn_relu_pool_forward(
                X, p["W1"], p["b1"], p["gamma1"], p["beta1"], conv, bn_param, pool
            )
        batch = batch_bn_param(p["W1"].shape[0], self.bn_param["eps"], self.dtype)
        out = conv_bn_relu_pool_forward(
            X, p["W1"], p["b1"], p["gamma1"], p["beta1"], conv, batch, pool
        )
        self.last_batch_stats = {"mean": batch["running_mean"], "var": batch["running_var"]}
        self.update_running_stats(batch["running_mean"], batch["running_var"])
        return out

    def _conv_block_backward(self, dout, cache):
        if self.normalization is None:
            _, dW1, db1 = conv_relu_pool_backward(dout, cache, compute_dx=False)
            return {"W1": dW1, "b1": db1}
        backward = (
            conv_bn_relu_pool_backward
            if self.normalization == "spatial_batchnorm"
            else conv_gn_relu_pool_backward
        )
        _, dW1, db1, dgamma, dbeta = backward(dout, cache, compute_dx=False)
        return {"W1": dW1, "b1": db1, "gamma1": dgamma, "beta1": dbeta}


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build the network (the weights come separately)."""

    num_filters: int
    filter_size: int
    hidden_dim: int
    num_classes: int
    norm: str
    num_groups: int
    dtype: str
    input_dim: tuple[int, int, int] = (3, 32, 32)
    layers: str | None = None  # a NetSpec's text: a ConvNet; None: the three-layer net above

    @classmethod
    def of(cls, config, num_classes: int) -> ModelSpec:
        """The network a run's settings describe (any object with the attributes of
        :class:`~pipeline.training.config.TrainConfig` that name the network): ``config.model``'s
        spec when it has one, else ThreeLayerConvNet from its size settings."""
        return cls(
            config.num_filters,
            config.filter_size,
            config.hidden_dim,
            num_classes,
            config.norm,
            config.num_groups,
            config.dtype,
            layers=getattr(config, "model", None),
        )

    @property
    def normalization(self) -> str | None:
        return None if self.norm == "none" else self.norm

    @property
    def net(self) -> NetSpec | None:
        return None if self.layers is None else NetSpec.from_text(self.layers)

    @property
    def bn_channels(self) -> int:
        """Channels of spatial batch norm, all layers together (the BN moments a shard reports)."""
        if self.layers is not None:
            return sum(self.net.bn_channels(self.input_dim, self.num_classes))
        return self.num_filters if self.norm == "spatial_batchnorm" else 0

    def build(self, weight_scale: float = 1e-3, reg: float = 0.0, seed: int | None = 0):
        """The network with weights drawn cs231n's way, as ``np.random.seed(seed)`` then
        ``np.random.randn`` would draw them, from a private ``RandomState``: the global random
        state is neither read nor written, so threads building networks at once (trials of a
        sweep training side by side, an in-process cluster's workers) each get their own draws.
        A spec's ConvNet draws PyTorch's default init (``weight_scale`` is the three-layer
        net's)."""
        if self.layers is not None:
            return ConvNet(
                self.net,
                input_dim=self.input_dim,
                num_classes=self.num_classes,
                reg=reg,
                dtype=np.dtype(self.dtype),
                seed=np.random.RandomState(seed),
            )
        return ThreeLayerConvNet(
            input_dim=self.input_dim,
            num_filters=self.num_filters,
            filter_size=self.filter_size,
            hidden_dim=self.hidden_dim,
            num_classes=self.num_classes,
            weight_scale=weight_scale,
            reg=reg,
            dtype=np.dtype(self.dtype),
            normalization=self.normalization,
            num_groups=self.num_groups,
            seed=np.random.RandomState(seed),
        )
