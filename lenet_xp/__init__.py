"""lenet_xp: LeNet-5 on MNIST from scratch, one code path for NumPy (CPU) and CuPy (CUDA)."""

from lenet_xp.backend import Device, DeviceError, asnumpy, get_device, synchronize, to_device
from lenet_xp.functional.loss import softmax_cross_entropy
from lenet_xp.models.lenet5 import LeNet5, loss_and_grads

__all__ = [
    "Device",
    "DeviceError",
    "LeNet5",
    "asnumpy",
    "get_device",
    "loss_and_grads",
    "softmax_cross_entropy",
    "synchronize",
    "to_device",
]
__version__ = "0.1.0"
