"""Layers that own parameters and caches; each is a few lines over :mod:`lenet_xp.functional`."""

from lenet_xp.layers.activation import Flatten, LeCunTanh, ReLU, Sigmoid, Tanh
from lenet_xp.layers.batchnorm import BatchNorm1d, BatchNorm2d
from lenet_xp.layers.conv import Conv2d
from lenet_xp.layers.dropout import Dropout
from lenet_xp.layers.linear import Linear
from lenet_xp.layers.module import Module, Parameter, Sequential
from lenet_xp.layers.pool import AvgPool2d, MaxPool2d

__all__ = [
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "Flatten",
    "LeCunTanh",
    "Linear",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
]
