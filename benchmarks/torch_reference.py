"""The seed's three-layer network in PyTorch, the reference the benchmarks measure against.

conv 32x7x7 (pad 3) - relu - 2x2 max pool - affine 500 - relu - affine 10, weights drawn from
N(0, weight_scale^2) and zero biases, as ThreeLayerConvNet initialises them. PyTorch is used by
the benchmarks only; convpipe never imports it.
"""

from __future__ import annotations


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
