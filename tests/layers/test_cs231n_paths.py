"""A cs231n notebook runs by replacing ``cs231n.`` with ``pipeline.``: every module path and name
assignment 2's ConvolutionalNetworks notebook imports exists under ``pipeline``."""

from __future__ import annotations

import subprocess
import sys

# the notebook's imports, as it writes them
NOTEBOOK = """
from cs231n.classifiers.cnn import *
from cs231n.data_utils import get_CIFAR10_data
from cs231n.gradient_check import eval_numerical_gradient_array, eval_numerical_gradient
from cs231n.layers import *
from cs231n.fast_layers import *
from cs231n.solver import Solver
from cs231n.layer_utils import *
from cs231n.vis_utils import visualize_grid
from cs231n.optim import adam, sgd_momentum
model = ThreeLayerConvNet(num_filters=3, filter_size=3, hidden_dim=7, input_dim=(3, 8, 8))
for name in ("conv_forward_naive", "conv_forward_fast", "max_pool_forward_fast",
             "spatial_batchnorm_forward", "spatial_groupnorm_forward", "conv_relu_pool_forward"):
    assert callable(globals()[name]), name
print(type(model).__module__, type(model).__name__)
"""


def test_the_notebooks_imports_run_with_pipeline_in_place_of_cs231n():
    code = NOTEBOOK.replace("cs231n.", "pipeline.")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["pipeline.cnn", "ThreeLayerConvNet"]


def test_the_classifiers_module_exports_the_network_only():
    from pipeline.classifiers import cnn

    assert cnn.__all__ == ["ThreeLayerConvNet"]
