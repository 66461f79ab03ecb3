"""LeNet-5's training step as a few dozen launches of our own kernels, optionally replayed as
one CUDA graph (``train --cuda-kernels`` / ``--cuda-graph``).

The layers' array code (``lenet_xp.layers``) issues about 175 small launches per step; here
the same step is written out for the :class:`~lenet_xp.models.lenet5.LeNet5` structure, every array
batch-innermost and preallocated:

- batch: ``gather_shift`` (one gather from the device-resident set, permutation and shifts);
- conv block (x2): ``im2col`` -> GEMM -> ``max_pool_bias_relu`` (conv bias, pool, ReLU);
- fc layers: GEMM with bias and ReLU (cuBLAS + ``bias_act``, or our GEMM's epilogue);
- loss: ``softmax_cross_entropy`` (forward, backward, correct count, running sums, counters);
- backward: GEMMs into one flat gradient buffer, ``max_pool_relu_backward``, ``col2im``;
- optimizer: ``adam`` over the flat parameter buffer the model's parameters are views of.

Step number and learning rate live on the device (``counters``, ``lr_of_step``), so a step
needs no host value and can be captured once and replayed (:meth:`FusedStep.capture`). CuPy
refuses cuBLAS calls during stream capture, so a captured step uses our GEMM (``gemm="ours"``);
eager steps may use either. The array-op layers stay the reference these are tested against.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from lenet_xp.backend import asnumpy
from lenet_xp.data.device_split import DeviceSplit
from lenet_xp.data.mnist import BACKGROUND
from lenet_xp.kernels.ops import Kernels
from lenet_xp.layers.module import flat_views
from lenet_xp.models.lenet5 import LeNet5
from lenet_xp.optim.optimizers import Adam

_SPLIT_K = 2048  # K per chunk of our GEMM when K is long (the weight and bias gradients)


def supports(model: Any, optimizer: Any) -> str | None:
    """Why the fused step cannot train ``model`` with ``optimizer`` (``None``: it can)."""
    if type(model) is not LeNet5:
        return f"the fused step is written for LeNet5, not {type(model).__name__}"
    if not isinstance(optimizer, Adam):
        return f"the fused step updates with Adam/AdamW, not {type(optimizer).__name__}"
    if optimizer.average is not None:
        return "the fused step does not average weights (--ema)"
    return None


class _Workspace:
    """Every array one step of ``batch`` images touches, allocated once."""

    def __init__(self, xp: Any, batch: int, size: int, dtype: Any) -> None:
        b, e = batch, xp.empty
        oh1 = 28  # conv1's output side: 28 (padded 28x28 input or unpadded 32x32)
        self.batch = b
        self.x = e((b, 1, size, size), dtype)
        self.y = e((b,), xp.int64)
        self.cols1, self.y1 = e((25, oh1 * oh1 * b), dtype), e((6, oh1 * oh1 * b), dtype)
        self.p1, self.arg1 = e((6, 14, 14, b), dtype), e((6, 14, 14, b), xp.uint8)
        self.cols2, self.y2 = e((150, 100 * b), dtype), e((16, 100 * b), dtype)
        self.p2, self.arg2 = e((16, 5, 5, b), dtype), e((16, 5, 5, b), xp.uint8)
        self.h1, self.h2, self.logits = e((120, b), dtype), e((84, b), dtype), e((10, b), dtype)
        self.g_logits, self.g_h2, self.g_h1 = (
            e((10, b), dtype),
            e((84, b), dtype),
            e((120, b), dtype),
        )
        self.g_p2, self.g_y2 = e((400, b), dtype), e((16, 100 * b), dtype)
        self.g_cols2, self.g_p1 = e((150, 100 * b), dtype), e((6, 14, 14, b), dtype)
        self.g_y1 = e((6, oh1 * oh1 * b), dtype)
        self.batch_loss = e((1,), dtype)
        longest = oh1 * oh1 * b
        self.ones = xp.ones((longest, 1), dtype)
        # split-K partial sums of our GEMM: the largest (splits, M, N) of the weight gradients
        splits = [(longest, 6 * 25), (100 * b, 16 * 150), (b, 120 * 400)]
        self.partial = e(max(math.ceil(k / _SPLIT_K) * mn for k, mn in splits), dtype)


class FusedStep:
    """Trains ``model`` (a :class:`LeNet5` on ``split.device``) with ``optimizer`` (Adam or
    AdamW) through our kernels. ``lr_of_step[s]`` is the learning rate of global step ``s``
    (0-based); ``gemm`` is ``"cublas"`` (eager only) or ``"ours"`` (needed for a graph).
    ``kernels`` defaults to CuPy's compiled kernels; tests pass an emulation on the CPU.

    The model's parameters become views of one flat buffer, their gradients views of
    another, and the optimizer's moments views of two more, so checkpoints, evaluation and
    the array-op layers see the same numbers.
    """

    def __init__(
        self, model: LeNet5, optimizer: Adam, split: DeviceSplit, batch_size: int,
        lr_of_step: Any, max_shift: int = 0, gemm: str = "cublas", kernels: Kernels | None = None,
    ) -> None:  # fmt: skip
        reason = supports(model, optimizer)
        if reason:
            raise ValueError(reason)
        if gemm not in ("cublas", "ours"):
            raise ValueError(f"gemm must be 'cublas' or 'ours', got {gemm!r}")
        self.xp = xp = split.device.xp
        self.model, self.optimizer, self.split = model, optimizer, split
        self.batch_size, self.max_shift, self.gemm = batch_size, max_shift, gemm
        self.kernels = kernels if kernels is not None else Kernels(xp)
        self.array_launches = 0  # cuBLAS GEMMs and reductions issued here
        params = model.parameters()
        self.dtype = params[0].data.dtype
        size = sum(int(p.data.size) for p in params)
        self.flat = {name: xp.zeros(size, self.dtype) for name in ("param", "grad", "m", "v")}
        views = {name: flat_views(params, flat) for name, flat in self.flat.items()}
        steps = optimizer.steps
        for index, param in enumerate(params):
            views["param"][index][...] = param.data
            param.data, param.grad = views["param"][index], views["grad"][index]
            state = optimizer.state[index]
            for key, name in (("exp_avg", "m"), ("exp_avg_sq", "v")):
                if key in state:
                    views[name][index][...] = state[key]
                state[key] = views[name][index]
            state["step"] = steps
        self.grads = dict(zip((n for n, _ in model.named_parameters()), views["grad"], strict=True))
        self.counters = xp.zeros(2, xp.int64)  # [global step, batch of this epoch]
        self.counters[0] = steps
        self.lr_of_step = xp.asarray(lr_of_step, dtype=xp.float64)
        self._host_lr = asnumpy(lr_of_step)  # what end_epoch tells the optimizer, without a sync
        self.steps_done = steps  # host-side twin of counters[0]: no sync to check bounds
        self.loss_sum, self.correct = xp.zeros(1, xp.float64), xp.zeros(1, xp.int64)
        n = len(split)
        self.order = xp.zeros(n, xp.int64)
        self.shifts = xp.zeros((2, n), xp.int64) if max_shift else None
        self._zero = xp.zeros(1, xp.int64)
        self._spaces: dict[int, _Workspace] = {}
        self.graph: Any = None
        self.issued: int | None = None  # launches per step, if counted (build)
        self.kernels.load(self.dtype)  # a kernel that does not compile fails here

    def _space(self, batch: int) -> _Workspace:
        if batch not in self._spaces:
            size = self.model.input_size
            self._spaces[batch] = _Workspace(self.xp, batch, size, self.dtype)
        return self._spaces[batch]

    # -- an epoch ------------------------------------------------------------------------
    def begin_epoch(self, order: Any, shifts: Any = None) -> None:
        """This epoch's permutation ``order (M,)`` and ``shifts (2, M)`` (host or device
        arrays) into the fixed device buffers; running sums and the batch counter to 0."""
        self.order[...] = self.xp.asarray(order)
        if self.shifts is not None:
            self.shifts[...] = self.xp.asarray(shifts)
        self.loss_sum.fill(0)
        self.correct.fill(0)
        self.counters[1:] = 0

    def run_epoch(self, on_batch: Any = None) -> None:
        """Every batch of the epoch: the full ones by graph replay (if captured) or eagerly,
        a short last batch eagerly. ``on_batch(n_images)`` after each (host only)."""
        n, b = len(self.split), self.batch_size
        self._reserve_steps(-(-n // b))
        for start in range(0, n, b):
            rows = min(b, n - start)
            if rows == b and self.graph is not None:
                self.graph.launch()
            elif rows == b:
                self.step(self._space(b), self.counters[1:], self.order)
            else:  # the short last batch: its first position is known on the host
                self.step(self._space(rows), self._zero, self.order[start:])
            if on_batch is not None:
                on_batch(rows)

    def _reserve_steps(self, count: int) -> None:
        """Count ``count`` more steps on the host; refuse them if ``lr_of_step`` has no
        learning rate for them (the device would read past its end)."""
        if self.steps_done + count > self.lr_of_step.shape[0]:
            raise ValueError(
                f"lr_of_step has {self.lr_of_step.shape[0]} steps; this would reach step "
                f"{self.steps_done + count}"
            )
        self.steps_done += count

    def step_once(self) -> None:
        """One more full batch of the current epoch (a graph replay if captured)."""
        self._reserve_steps(1)
        if self.graph is not None:
            self.graph.launch()
        else:
            self.step(self._space(self.batch_size), self.counters[1:], self.order)

    def end_epoch(self) -> tuple[float, int]:
        """``(loss sum, correct count)`` of the epoch (one host sync); the optimizer's step
        counts are brought up to date for checkpoints."""
        steps = self.steps_done
        self.optimizer.steps = steps
        for state in self.optimizer.state:
            state["step"] = steps
        self.optimizer.lr = float(self._host_lr[max(steps - 1, 0)])
        sums = asnumpy(self.xp.concatenate([self.loss_sum, self.correct.astype(self.xp.float64)]))
        return float(sums[0]), int(sums[1])

    # -- one step --------------------------------------------------------------------------
    def step(self, ws: _Workspace, batch_index: Any, order: Any) -> None:
        """Forward, loss, backward and Adam on batch ``batch_index[0]`` of ``order``."""
        k, m = self.kernels, self.model
        k.gather_shift(
            self.split.images, self.split.labels, order, self.shifts, batch_index, ws.x, ws.y,
            BACKGROUND,
        )  # fmt: skip
        b = ws.batch
        pad = m.conv1.padding
        # -- forward
        k.im2col(ws.x, 5, 5, 1, pad, 28, 28, out=ws.cols1)
        self._mm(m.conv1.weight.data.reshape(6, 25), ws.cols1, ws.y1)
        k.max_pool_bias_relu(ws.y1.reshape(6, 28, 28, b), m.conv1.bias.data, 2, ws.p1, ws.arg1)
        k.im2col(ws.p1.transpose(3, 0, 1, 2), 5, 5, 1, 0, 10, 10, out=ws.cols2)
        self._mm(m.conv2.weight.data.reshape(16, 150), ws.cols2, ws.y2)
        k.max_pool_bias_relu(ws.y2.reshape(16, 10, 10, b), m.conv2.bias.data, 2, ws.p2, ws.arg2)
        p2 = ws.p2.reshape(400, b)
        self._dense(m.fc1, p2, ws.h1, relu=True)
        self._dense(m.fc2, ws.h1, ws.h2, relu=True)
        self._dense(m.fc3, ws.h2, ws.logits, relu=False)
        k.softmax_cross_entropy(
            ws.logits, ws.y, ws.g_logits, ws.batch_loss, self.loss_sum, self.correct,
            self.counters,
        )  # fmt: skip
        # -- backward
        g = self.grads
        self._dense_backward(m.fc3, "fc3", ws.g_logits, ws.h2, ws.g_h2, ws.h2, ws)
        self._dense_backward(m.fc2, "fc2", ws.g_h2, ws.h1, ws.g_h1, ws.h1, ws)
        self._dense_backward(m.fc1, "fc1", ws.g_h1, p2, ws.g_p2, None, ws)
        g_p2 = ws.g_p2.reshape(16, 5, 5, b)
        k.max_pool_relu_backward(
            g_p2, ws.p2, ws.arg2, (16, 10, 10, b), 2, ws.g_y2.reshape(16, 10, 10, b)
        )
        g_y2 = ws.g_y2
        self._weight_grads(g_y2, ws.cols2, g["conv2.weight"].reshape(16, 150), g["conv2.bias"], ws)
        self._mm(m.conv2.weight.data.reshape(16, 150).T, g_y2, ws.g_cols2)
        k.col2im(ws.g_cols2, (b, 6, 14, 14), 5, 5, 1, 0, 10, 10, out=ws.g_p1)
        k.max_pool_relu_backward(
            ws.g_p1, ws.p1, ws.arg1, (6, 28, 28, b), 2, ws.g_y1.reshape(6, 28, 28, b)
        )
        g_y1 = ws.g_y1
        self._weight_grads(g_y1, ws.cols1, g["conv1.weight"].reshape(6, 25), g["conv1.bias"], ws)
        # -- update
        opt = self.optimizer
        k.adam(
            self.flat["param"], self.flat["grad"], self.flat["m"], self.flat["v"],
            self.lr_of_step, self.counters, opt.betas, opt.eps, opt.weight_decay,
            opt._decoupled,
        )  # fmt: skip

    # -- GEMM flavours -----------------------------------------------------------------------
    def _mm(self, a: Any, b: Any, out: Any, **epilogue: Any) -> None:
        """``out = a @ b`` (+ epilogue, ours only) by cuBLAS or by our GEMM."""
        if self.gemm == "ours":
            self.kernels.gemm(a, b, out, **epilogue)
        else:
            self.xp.matmul(a, b, out=out)
            self.array_launches += 1

    def _dense(self, layer: Any, x_fn: Any, out: Any, relu: bool) -> None:
        """Feature-major ``out (F_out, N) = act(W @ x_fn + bias)``."""
        w, bias = layer.weight.data, layer.bias.data
        if self.gemm == "ours":
            self.kernels.gemm(w, x_fn, out, bias=bias, relu=relu)
        else:
            self._mm(w, x_fn, out)
            self.kernels.bias_act(out, bias, relu)

    def _dense_backward(
        self, layer: Any, name: str, grad_out: Any, x_fn: Any, grad_x: Any, mask: Any, ws: Any
    ) -> None:
        """Weight and bias gradients of a dense layer, and ``grad_x (F_in, N)`` (zeroed where
        ``mask <= 0``: the ReLU that produced ``x_fn``)."""
        g = self.grads
        self._weight_grads(grad_out, x_fn, g[f"{name}.weight"], g[f"{name}.bias"], ws)
        w_t = layer.weight.data.T
        if self.gemm == "ours":
            self.kernels.gemm(w_t, grad_out, grad_x, mask=mask)
        else:
            self._mm(w_t, grad_out, grad_x)
            if mask is not None:
                self.kernels.relu_mask(grad_x, mask)

    def _weight_grads(
        self, grad_y: Any, x_cols: Any, grad_w: Any, grad_b: Any, ws: _Workspace
    ) -> None:
        """``grad_w = grad_y @ x_cols.T`` and ``grad_b = grad_y.sum(1)`` for ``grad_y (M, L)``."""
        if self.gemm == "ours":
            length = grad_y.shape[1]
            splits = math.ceil(length / _SPLIT_K)
            m, n = grad_w.shape
            partial_w = partial_b = None
            if splits > 1:
                partial_w = ws.partial[: splits * m * n].reshape(splits, m, n)
                partial_b = ws.partial[: splits * m].reshape(splits, m, 1)
            self.kernels.gemm(grad_y, x_cols.T, grad_w, partial=partial_w)
            ones = ws.ones[:length]
            self.kernels.gemm(grad_y, ones, grad_b.reshape(m, 1), partial=partial_b)
        else:
            self.xp.matmul(grad_y, x_cols.T, out=grad_w)
            self.xp.sum(grad_y, axis=1, out=grad_b)
            self.array_launches += 2

    # -- launches and graphs -------------------------------------------------------------------
    def launches_per_step(self) -> int:
        """Launches one full-batch step issues (kernels of ours + cuBLAS/reduction calls),
        counted by running one step. Changes the model like any step."""
        if self.graph is not None:
            raise ValueError("count the launches before capture: a replay issues one")
        self.begin_epoch(self.xp.arange(len(self.split)), self.shifts)
        before = self.kernels.launches + self.array_launches
        self.step_once()
        return self.kernels.launches + self.array_launches - before

    def capture(self) -> None:
        """Capture one full-batch step as a CUDA graph; :meth:`run_epoch` then replays it.
        Needs ``gemm="ours"``. Every buffer it touches is allocated before and kept by
        ``self`` (a graph owns no memory)."""
        if self.gemm != "ours":
            raise ValueError("a captured step needs gemm='ours' (CuPy cannot capture cuBLAS)")
        cuda = self.xp.cuda
        ws = self._space(self.batch_size)
        stream = cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                self.step(ws, self.counters[1:], self.order)
            except BaseException:
                # Leave capture mode, but report the step's error: CUDA's end_capture then
                # only says the capture was invalidated.
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            graph = stream.end_capture()
        self.graph, self._capture_stream = graph, stream


def build(
    model: Any, optimizer: Any, split: DeviceSplit, batch_size: int, lr_of_step: Any,
    max_shift: int, graph: bool, count_launches: bool = False,
) -> tuple[FusedStep | None, str]:  # fmt: skip
    """The fused step for a training run (captured as a graph if ``graph``), or ``None`` and
    the one-line reason why the array-op layers train instead (a kernel that does not compile
    or capture is recorded as a fallback). ``count_launches``: first count one step's
    launches into ``issued`` (:meth:`FusedStep.launches_per_step`; that step trains)."""
    from lenet_xp.kernels import record_fallback

    reason = supports(model, optimizer)
    if reason:
        return None, reason
    try:
        fused = FusedStep(
            model,
            optimizer,
            split,
            batch_size,
            lr_of_step,
            max_shift,
            "ours" if graph else "cublas",
        )
        if count_launches:
            fused.issued = fused.launches_per_step()
        if graph:
            fused.capture()
    except Exception as exc:  # compile, load or capture failed: the layers take over
        record_fallback("fused step", " ".join(str(exc).split())[:300])
        return None, f"our kernels failed here ({type(exc).__name__}); see the line above"
    return fused, "graph" if graph else "kernels"


def train_epoch_fused(fused: FusedStep, rng: Any, bar: Any) -> tuple[float, float, int]:
    """One epoch as :func:`lenet_xp.train.train_epoch` (the same random order and shifts from
    ``rng``): ``(mean loss, accuracy, global step)``; one host sync, at the end."""
    from lenet_xp.data.device_split import permutation, random_shifts

    n, device = len(fused.split), fused.split.device
    order = permutation(n, rng, device)
    shifts = random_shifts(n, fused.max_shift, rng, device) if fused.max_shift else None
    fused.begin_epoch(order, shifts)
    fused.run_epoch(None if bar is None else bar.update)
    loss_sum, correct = fused.end_epoch()
    return loss_sum / n, correct / n, fused.steps_done
