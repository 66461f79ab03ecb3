"""lenet_xp: LeNet-5 on MNIST from scratch, one code path for NumPy (CPU) and CuPy (CUDA).

The package root holds the commands (``python -m lenet_xp.train``, ``evaluate``, ``predict``,
``bench``, ``report``, ``plots``, ``serve``, ``export``, ``sweep``) and :mod:`.backend`; the
rest lives in wings named for what they hold (``data``, ``models``, ``layers``, ``functional``,
``kernels``, ``optim``, ``training``, ``reporting``, ``storage``, ``web``).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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

#: Modules moved into wings in 0.2 (issue 20): the old name still imports the new module, with a
#: DeprecationWarning, for one release.
MOVED = {
    "mnist": "data.mnist", "augment": "data.augment", "images": "data.images",
    "init": "layers.init", "model": "models.lenet5", "presets": "models.presets",
    "summary": "layers.summary", "inspect": "models.feature_maps", "export_onnx": "models.onnx",
    "schedules": "optim.schedules", "averaging": "optim.averaging",
    "resume": "training.resume", "runlock": "training.runlock", "interrupt": "training.interrupt",
    "parallel": "training.parallel", "graph": "training.graph", "stats": "training.stats",
    "tblog": "training.logs", "train_args": "training.config",
    "checkpoint": "storage.checkpoint", "fsync": "storage.fsync", "serve_api": "web.api",
    "bench_torch": "benchmarks.torch_reference",
}  # fmt: skip


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``lenet_xp.OLD`` (a key of :data:`MOVED`) as the module it became."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        package, _, old = name.rpartition(".")
        if package != __name__ or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> object:
        new = f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(
            f"{spec.name} moved to {new}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: object) -> None:
        """The module is the new one, already run."""


sys.meta_path.append(_MovedModules())
