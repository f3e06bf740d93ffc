"""cs231n's ``classifiers/cnn.py``: the three-layer convolutional network (:mod:`pipeline.cnn`)."""

from pipeline.cnn import ThreeLayerConvNet

__all__ = ["ThreeLayerConvNet"]
