"""cs231n's ``classifiers`` package, so that a notebook's ``from cs231n.classifiers.cnn import *``
runs as ``from pipeline.classifiers.cnn import *``."""
