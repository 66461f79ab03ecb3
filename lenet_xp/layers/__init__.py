"""Layers that own parameters and caches; each is a few lines over :mod:`lenet_xp.functional`."""

from lenet_xp.layers.activation import Flatten, LeakyReLU, LeCunTanh, ReLU, Sigmoid, Tanh
from lenet_xp.layers.batchnorm import BatchNorm1d, BatchNorm2d
from lenet_xp.layers.conv import Conv2d
from lenet_xp.layers.dropout import Dropout
from lenet_xp.layers.fusion import plan
from lenet_xp.layers.linear import Linear
from lenet_xp.layers.module import Module, Parameter, Sequential
from lenet_xp.layers.partial_conv import LENET5_C3_TABLE, PartialConv2d
from lenet_xp.layers.pool import AvgPool2d, MaxPool2d
from lenet_xp.layers.rbf import DIGIT_BITMAPS, RBFOutput
from lenet_xp.layers.subsample import TrainableSubsampling

Sequential.fuse = staticmethod(plan)  # adjacent layers as one kernel where ours run

__all__ = [
    "DIGIT_BITMAPS",
    "LENET5_C3_TABLE",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "Flatten",
    "LeakyReLU",
    "LeCunTanh",
    "Linear",
    "MaxPool2d",
    "Module",
    "Parameter",
    "PartialConv2d",
    "RBFOutput",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "TrainableSubsampling",
]
