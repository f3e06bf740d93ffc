"""The seed's three-layer network in PyTorch, the reference the benchmarks measure against.

conv 32x7x7 (pad 3) - relu - 2x2 max pool - affine 500 - relu - affine 10, weights drawn from
N(0, weight_scale^2) and zero biases, as ThreeLayerConvNet initialises them. PyTorch is used by
the benchmarks only; convpipe never imports it.
"""

from __future__ import annotations

import math


def three_layer_net(
    torch,
    *,
    num_filters=32,
    filter_size=7,
    hidden_dim=500,
    num_classes=10,
    weight_scale=1e-3,
    seed=0,
):
    """(net, weights): the torch.nn.Sequential model and its W1, W2, W3 (for the L2 term)."""
    nn = torch.nn
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, num_filters, filter_size, padding=(filter_size - 1) // 2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(num_filters * 16 * 16, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, num_classes),
    )
    weights = [m.weight for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, weight_scale)
                m.bias.zero_()
    return net, weights


def spec_net(torch, spec, input_dim=(3, 32, 32), num_classes=10, seed=0):
    """A :class:`pipeline.netspec.NetSpec` as PyTorch modules, layer for layer (PyTorch's
    default initialization, biases at zero and dirac parts as convpipe's; a bn with scale=false
    has its weight frozen at one; momentum converted from cs231n's convention). Returns (net,
    loss_fn, weights, norm_params): the conv and affine weights (convpipe's L2 covers those) and
    the norms' parameters (the group at ``norm_lr_factor``)."""
    nn = torch.nn
    torch.manual_seed(seed)

    class Scale(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    shapes = [tuple(input_dim), *spec.shapes(input_dim, num_classes)]
    modules, weights, norm_params = [], [], []
    for layer, x in zip(spec.body, shapes):
        kind = layer.kind
        if kind == "conv":
            m = nn.Conv2d(x[0], layer.filters, layer.size, stride=layer.stride, padding=layer.pad)
            with torch.no_grad():
                m.bias.zero_()  # as convpipe's
                if layer.init == "dirac":
                    nn.init.dirac_(m.weight[: min(x[0], layer.filters)])
            if layer.init == "whiten":  # set by the caller (pipeline.convnet.whitening_filters)
                m.weight.requires_grad_(False)
            else:
                weights.append(m.weight)
        elif kind == "affine":
            modules.append(nn.Flatten())
            m = nn.Linear(int(math.prod(x)), layer.units or num_classes)
            with torch.no_grad():
                m.bias.zero_()
            weights.append(m.weight)
        elif kind == "bn":
            m = nn.BatchNorm2d(x[0], eps=layer.eps, momentum=1.0 - layer.momentum)
            m.weight.requires_grad_(layer.scale)
            norm_params += [m.bias] + ([m.weight] if layer.scale else [])
        elif kind == "gn":
            m = nn.GroupNorm(layer.groups, x[0], eps=layer.eps)
            norm_params += [m.weight, m.bias]
        elif kind == "relu":
            m = nn.ReLU()
        elif kind == "gelu":
            m = nn.GELU()
        elif kind == "pool":
            m = nn.MaxPool2d(layer.size, layer.stride)
        elif kind in ("gap", "gmp"):
            pool = nn.AdaptiveAvgPool2d(1) if kind == "gap" else nn.AdaptiveMaxPool2d(1)
            m = nn.Sequential(pool, nn.Flatten())
        elif kind == "scale":
            m = Scale(layer.factor)
        else:
            raise ValueError(f"no PyTorch module for layer {kind!r}")
        modules.append(m)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=spec.smoothing)
    return nn.Sequential(*modules), loss_fn, weights, norm_params


def whiten_conv(torch, net):
    """The Conv2d of ``spec_net``'s network that is a whitening conv (its weight frozen there),
    or None."""
    convs = (m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    return next((m for m in convs if not m.weight.requires_grad), None)
