"""``Parameter`` and ``Module``: the bookkeeping every layer shares (names, devices, modes).

A layer computes ``forward(x)`` and, from the upstream gradient, ``backward(grad_out)``:
it writes the gradients of its own parameters into ``param.grad`` (overwriting, not
accumulating) and returns the gradient with respect to its input.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lenet_xp.backend import Device, device_of, get_array_module, get_device, to_device
from lenet_xp.kernels.ops import Kernels, gpu_kernels
from lenet_xp.native.blocks import cpu_kernels


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (same shape, set by ``backward``)."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.grad: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype})"


def flat_views(params: list[Parameter], flat: Any) -> list[Any]:
    """Views of the 1-D array ``flat`` (at least as long as the parameters together) shaped
    like each of ``params``, in order: how the CPU worker processes share their parameters
    and gradients and how the fused CUDA step keeps parameters and optimizer state."""
    views, offset = [], 0
    for param in params:
        views.append(flat[offset : offset + param.data.size].reshape(param.data.shape))
        offset += param.data.size
    return views


def flat_copy(params: list[Parameter], arrays: list[Any], flat: Any) -> list[Any]:
    """Copy ``arrays`` (shaped like ``params``, in order) into the 1-D ``flat``: the views of
    ``flat`` (:func:`flat_views`) that now hold them."""
    views = flat_views(params, flat)
    for view, array in zip(views, arrays, strict=True):
        view[...] = array
    return views


class Module:
    """Base class: children and parameters are found from attributes, in definition order."""

    #: Whether GPU work uses our CUDA kernels (:meth:`use_cuda_kernels`).
    cuda_kernels = False

    training: bool = True

    def forward(self, x: Any) -> Any:
        raise NotImplementedError

    def backward(self, grad_out: Any) -> Any:
        raise NotImplementedError

    def __call__(self, x: Any) -> Any:
        return self.forward(x)

    # -- traversal -------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def modules(self) -> Iterator[Module]:
        """This module and every module inside it, depth first (as PyTorch's)."""
        yield self
        for _, child in self.named_children():
            yield from child.modules()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [param for _, param in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """Non-trainable state saved with the model (e.g. batch-norm running statistics)."""
        for name in getattr(self, "_buffers", ()):
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(prefix + name + ".")

    # -- modes and devices ------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        self.training = mode
        for _, child in self.named_children():
            child.train(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, device: Device | str) -> Module:
        """Move every parameter and buffer to ``device`` in place; returns ``self``."""
        device = get_device(device)
        for param in self.parameters():
            param.data = to_device(param.data, device)
            param.grad = None if param.grad is None else to_device(param.grad, device)
        self._apply_to_buffers(lambda array: to_device(array, device))
        return self

    def astype(self, dtype: str) -> Module:
        """Cast floating parameters and buffers to ``dtype`` (``"float32"`` or ``"float64"``)."""
        for param in self.parameters():
            param.data = param.data.astype(dtype)
            param.grad = None
        self._apply_to_buffers(lambda a: a.astype(dtype) if a.dtype.kind == "f" else a)
        return self

    def _apply_to_buffers(self, fn: Any) -> None:
        for name in getattr(self, "_buffers", ()):
            setattr(self, name, fn(getattr(self, name)))
        for _, child in self.named_children():
            child._apply_to_buffers(fn)

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Parameters and buffers by PyTorch-style dotted name (``conv1.weight``, ...)."""
        state = {name: param.data for name, param in self.named_parameters()}
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays into this model, checking names and shapes; keeps device and dtype."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"state_dict mismatch: missing {missing}, unexpected {unexpected}")
        for name, target in own.items():
            source = state[name]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(
                    f"state_dict[{name!r}] has shape {tuple(source.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            target[...] = to_device(source, device_of(target))

    def num_parameters(self) -> int:
        return sum(int(param.data.size) for param in self.parameters())

    def macs(self, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
        """Multiply-accumulates per image of one forward pass from ``x_shape`` to ``y_shape``
        (``(N, ...)``); 0 unless the layer multiplies by weights (see ``summary``)."""
        return 0

    def use_cuda_kernels(self, on: bool = True) -> Module:
        """On a GPU, run this module's and its children's convolutions with our CUDA kernels
        (im2col, col2im) if ``on``, else with array ops (the default); no effect on the CPU."""
        self.cuda_kernels = on
        for _, child in self.named_children():
            child.use_cuda_kernels(on)
        return self

    def _kernels(self, x: Any) -> Kernels | None:
        """Our CUDA kernels for ``x``'s device if this layer uses them, else ``None``."""
        return gpu_kernels(get_array_module(x)) if self.cuda_kernels else None

    def summary(self, batch: int = 128) -> str:
        """A table of the layers: output shapes, parameters and MACs per image, with totals
        (see :mod:`lenet_xp.layers.summary`)."""
        from lenet_xp.layers.summary import summarize

        return summarize(self, batch)


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``Sequential(a, b, c)`` or ``Sequential([a, b, c])`` names them ``0``, ``1``, ``2`` (as
    PyTorch); ``Sequential(conv1=a, relu1=b)`` by keyword. ``input_shape`` ``(C, H, W)``,
    if given, is checked on every forward pass (one clear error instead of one from deep
    inside a layer).
    """

    input_shape: tuple[int, ...] | None = None
    #: ``fuse(layers, kernels) -> steps``: :func:`lenet_xp.layers.fusion.plan`, set by the
    #: package (its blocks are made of layers defined after this class).
    fuse: Any = None

    def __init__(
        self, *layers: Module | list[Module], input_shape: tuple[int, ...] | None = None,
        **named: Module,
    ) -> None:  # fmt: skip
        if len(layers) == 1 and isinstance(layers[0], list | tuple):
            layers = tuple(layers[0])
        named = {str(index): layer for index, layer in enumerate(layers)} | named
        for name, layer in named.items():
            if not isinstance(layer, Module):  # it would not be a child: silently skipped
                raise TypeError(f"Sequential: {name} is a {type(layer).__name__}, not a layer")
            setattr(self, name, layer)
        if input_shape is not None:
            self.input_shape = tuple(input_shape)

    @property
    def input_size(self) -> int:
        """The side of the square images to feed this model: its ``input_shape``'s (28, or 32
        for MNIST padded as LeCun did), else MNIST's own 28 (a model built without
        ``input_shape`` gets the images as MNIST stores them)."""
        return self.input_shape[-1] if self.input_shape else 28

    def layers(self) -> list[Module]:
        return [child for _, child in self.named_children()]

    def forward(self, x: Any) -> Any:
        expected = self.input_shape
        if expected is not None and (x.ndim != 4 or tuple(x.shape[1:]) != expected):
            shape = ", ".join(map(str, expected))
            raise ValueError(
                f"{type(self).__name__} expects images of shape (N, {shape}), got {tuple(x.shape)}"
            )
        self._steps = self.plan(x)
        for step in self._steps:
            x = step.forward(x)
        return x

    def backward(self, grad_out: Any) -> Any:
        for step in reversed(getattr(self, "_steps", None) or self.layers()):
            grad_out = step.backward(grad_out)
        return grad_out

    def plan(self, x: Any) -> list[Any]:
        """What a forward on ``x`` runs, in order: the layers, with adjacent ones fused into
        one block where our kernels run on ``x``'s device (:mod:`lenet_xp.layers.fusion`):
        our CUDA kernels if this model uses them, on the CPU the compiled kernels where they
        run (:mod:`lenet_xp.native.blocks`). Each has ``forward`` and ``backward``."""
        kernels = self._kernels(x) or cpu_kernels(x)
        if kernels is None or Sequential.fuse is None:
            return self.layers()
        return Sequential.fuse(self.layers(), kernels)
