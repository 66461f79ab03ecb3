"""The CuPy stand-in refuses what CuPy on a GPU refuses, and replays graphs as CUDA does.

These tests run on every machine (the stand-in needs no GPU): each misuse the stand-in exists
to catch is provoked here once and must fail the way it fails on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import DATA, needs_mnist

from lenet_xp.backend.cuda import _cuda_probe_steps, probe_steps
from lenet_xp.testing import count_synchronizations, cupy_names
from lenet_xp.testing.fake_cupy import cupy, cupyx, launches, runtime
from lenet_xp.testing.fake_cupy.names import VERSION


@pytest.fixture(autouse=True)
def two_devices(monkeypatch):
    """The stand-in on, with two devices, whatever the environment says."""
    monkeypatch.setenv("LENET_XP_FAKE_CUDA", "2")
    monkeypatch.delenv("LENET_XP_FAKE_CUDA_BROKEN", raising=False)


def device_array(values, dtype=np.float64):
    return cupy.asarray(np.asarray(values, dtype=dtype))


# -- names and signatures ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["errstate", "insert", "block", "geomspace"])
def test_numpy_names_cupy_lacks_are_attribute_errors(name):
    assert hasattr(np, name)
    with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
        getattr(cupy, name)


def test_keywords_are_checked_against_cupys_signatures():
    x = device_array([1.0, 2.0])
    with pytest.raises(TypeError, match="unexpected keyword argument 'initial'"):
        cupy.sum(x, initial=1.0)  # NumPy takes it; CuPy 14 does not
    with pytest.raises(TypeError, match="unexpected keyword argument 'where'"):
        cupy.add(x, x, where=True)
    assert float(cupy.sum(x, axis=0, keepdims=False)) == 3.0


def test_a_name_cupy_has_but_the_stand_in_lacks_fails_loudly():
    with pytest.raises(NotImplementedError, match="does not implement"):
        cupy.cuda.alloc_pinned_memory(16)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed")
def test_the_stored_snapshot_matches_the_installed_cupy():
    """``python -m lenet_xp.testing.cupy_names`` regenerates it when CuPy changes."""
    stored = json.loads(cupy_names.SNAPSHOT.read_text())
    assert cupy_names.render(cupy_names.snapshot()) == cupy_names.render(stored), (
        "CuPy's names changed: run python -m lenet_xp.testing.cupy_names"
    )
    assert stored["version"] == VERSION


# -- device arrays are not host arrays -----------------------------------------------------------
def test_no_implicit_conversion_to_numpy():
    x = device_array([1.0, 2.0])
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Unsupported type"):
        x + np.ones(2)
    with pytest.raises(TypeError, match="Unsupported type"):
        np.ones(2) + x
    with pytest.raises(TypeError, match="Unsupported type"):
        cupy.concatenate([x, np.ones(2)])
    with pytest.raises(TypeError, match="Unsupported type"):
        np.concatenate([x, np.ones(2)])  # dispatched to CuPy, which refuses the host array
    # What CuPy allows: NumPy's functions and ufuncs on device arrays give device arrays.
    assert isinstance(np.exp(x), cupy.ndarray) and isinstance(np.sum(x), cupy.ndarray)
    assert isinstance(x * np.float32(2), cupy.ndarray)


def test_reductions_stay_on_the_device():
    x = device_array([[1.0, 2.0], [3.0, 4.0]])
    total = x.sum()
    assert isinstance(total, cupy.ndarray) and total.shape == ()


def test_arrays_carry_their_device_and_refuse_another():
    with cupy.cuda.Device(1):
        far = device_array([1.0, 2.0])
    near = device_array([1.0, 2.0])
    assert far.device.id == 1 and near.device.id == 0
    with pytest.raises(ValueError, match="device"):
        near + far
    with cupy.cuda.Device(1):
        assert float((far * 2).sum()) == 6.0
    assert far.T.device.id == 1  # a view launches nothing, so any device may take it


def test_host_reads_count_as_synchronisations():
    x = device_array([1.5, 2.5])
    with count_synchronizations() as syncs:
        x.get()
        float(x[0])
        x.sum().item()
        bool(x[1] > 0)
        cupy.asnumpy(x)
    assert syncs.count == 5
    before = launches()
    with count_synchronizations() as syncs:
        y = cupy.exp(x) * 2 + x.sum()
        cupy.maximum(y, 0, out=y)
    assert syncs.count == 0 and launches() == before + 5  # exp, *, sum, +, maximum


def test_allow_synchronize_false_refuses_each_host_read():
    x = device_array([1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cupyx.allow_synchronize(False):
            for read in (x.get, lambda: float(x), x.item, cupy.cuda.Device().synchronize):
                with pytest.raises(cupyx.DeviceSynchronized):
                    read()


# -- runtime ------------------------------------------------------------------------------------
def test_devices_streams_events_and_the_memory_pool():
    assert cupy.cuda.runtime.getDeviceCount() == 2
    props = cupy.cuda.runtime.getDeviceProperties(1)
    assert props["name"].decode() == runtime.DEVICE_NAME
    with cupy.cuda.Device(1):
        assert cupy.cuda.runtime.getDevice() == 1
    cupy.cuda.Device(0).use()
    with pytest.raises(runtime.CUDARuntimeError, match="invalid device ordinal"):
        cupy.cuda.Device(2).use()
    pool = cupy.get_default_memory_pool()
    used = pool.used_bytes()
    x = cupy.zeros(1000, dtype=np.float32)
    assert pool.used_bytes() == used + 4096  # rounded up to 512-byte blocks, as CuPy's pool
    del x
    assert pool.used_bytes() == used and pool.total_bytes() >= used + 4096
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        assert cupy.cuda.get_current_stream() is stream
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    end.record()
    assert cupy.cuda.get_elapsed_time(start, end) >= 0


@pytest.mark.parametrize(
    "broken,step,words",
    [
        ("driver", "finding cuda:0", "no NVIDIA driver"),
        ("alloc", "allocating on cuda:0", "out of memory"),
        ("cublas", "a 2x2 matmul (cuBLAS)", "libcublas"),
        ("nvrtc", "compiling an elementwise kernel (NVRTC)", "libnvrtc"),
    ],
)
def test_the_start_up_probe_fails_as_configured(monkeypatch, broken, step, words):
    assert probe_steps(_cuda_probe_steps(cupy, 0)) is None
    monkeypatch.setenv("LENET_XP_FAKE_CUDA_BROKEN", broken)
    reason = probe_steps(_cuda_probe_steps(cupy, 0))
    assert reason.startswith(f"CUDA is not usable: {step} failed") and words in reason


# -- kernels ------------------------------------------------------------------------------------
SCALE = r"""
extern "C" __global__ void scale(const double* x, double* y, double factor, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = factor * x[i];
}
"""


def test_raw_kernels_run_with_cupys_argument_rules():
    kernel = cupy.RawModule(code=SCALE).get_function("scale")
    x, y = device_array([1.0, 2.0, 3.0]), cupy.zeros(3)
    kernel((1,), (32,), (x, y, 2.0, np.int32(3)))  # a Python float is passed as a double
    np.testing.assert_array_equal(y.get(), [2.0, 4.0, 6.0])
    with pytest.raises(TypeError, match="int n"):
        kernel((1,), (32,), (x, y, 2.0, 3))  # CuPy passes a Python int as 64 bits
    with pytest.raises(TypeError, match="Unsupported type"):
        kernel((1,), (32,), (np.ones(3), y, 2.0, np.int32(3)))
    with pytest.raises(TypeError, match="double"):
        kernel((1,), (32,), (x.astype(np.float32), y, 2.0, np.int32(3)))


def test_elementwise_kernels_run_their_source():
    axpy = cupy.ElementwiseKernel("T x, T a", "T y", "y = a * x + 1", "axpy")
    x = device_array([1.0, 2.0])
    np.testing.assert_array_equal(axpy(x, 3.0).get(), [4.0, 7.0])
    out = cupy.zeros(2)
    axpy(x, 2.0, out)
    np.testing.assert_array_equal(out.get(), [3.0, 5.0])
    with pytest.raises(NotImplementedError):
        cupy.ReductionKernel("T x", "T y", "x", "a + b", "y = a", "0", "r")


# -- capture and graphs -------------------------------------------------------------------------
def capture(step):
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            step()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.end_capture()
            raise
        return stream.end_capture()


def test_capture_on_the_legacy_stream_is_refused():
    with pytest.raises(RuntimeError, match="default \\(legacy\\) stream"):
        cupy.cuda.get_current_stream().begin_capture()


def test_cublas_and_host_reads_are_refused_inside_a_capture():
    a = cupy.ones((2, 2))
    with pytest.raises(NotImplementedError, match="cuBLAS"):
        capture(lambda: a @ a)
    with pytest.raises(runtime.CUDARuntimeError, match="StreamCaptureUnsupported"):
        capture(lambda: float(a.sum()))
    ints = cupy.ones((2, 2), dtype=np.int64)
    capture(lambda: ints @ ints)  # CuPy's own kernel for integers: allowed


def test_an_error_during_capture_invalidates_it():
    """As in CUDA: ending such a capture fails too, so an ``end_capture()`` in a ``finally``
    would hide the error that matters."""
    a = cupy.ones((2, 2))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(NotImplementedError, match="cuBLAS"):
            a @ a
        with pytest.raises(runtime.CUDARuntimeError, match="CaptureInvalidated"):
            stream.end_capture()


def test_a_capture_runs_nothing_and_a_replay_uses_the_buffers_now():
    x, y = device_array([1.0, 2.0]), cupy.zeros(2)
    graph = capture(lambda: cupy.multiply(x, 2.0, out=y))
    np.testing.assert_array_equal(y.get(), [0.0, 0.0])  # not run during capture
    graph.launch()
    np.testing.assert_array_equal(y.get(), [2.0, 4.0])
    x[...] = cupy.asarray(np.array([5.0, 6.0]))
    graph.launch()
    np.testing.assert_array_equal(y.get(), [10.0, 12.0])


def test_host_values_are_frozen_into_the_graph():
    """A learning rate passed as a Python float, or copied from the host, during capture is
    the one every replay uses: the bug a real GPU would have."""
    weights, step_size, lr = cupy.ones(2), cupy.empty(1), [0.5]
    table = np.array([0.25])

    def step():  # every buffer allocated before capture (see the next test)
        step_size.set(table)
        cupy.multiply(step_size, lr[0], out=step_size)
        cupy.subtract(weights, step_size, out=weights)

    graph = capture(step)
    graph.launch()
    lr[0], table[0] = 100.0, 100.0  # the host changes: the graph does not see it
    graph.launch()
    np.testing.assert_array_equal(weights.get(), [1 - 2 * 0.125] * 2)


def test_a_graph_needs_every_buffer_it_touches_kept_alive():
    x = device_array([1.0, 2.0])
    out = {"y": None}

    def step():
        out["y"] = cupy.exp(x)  # allocated during capture ...

    graph = capture(step)
    graph.launch()
    np.testing.assert_allclose(out["y"].get(), np.exp([1.0, 2.0]))
    out["y"] = None  # ... and freed: the pool may give the memory to anyone now
    with pytest.raises(runtime.CUDARuntimeError, match="freed after capture"):
        graph.launch()


def test_a_pool_reserved_for_a_graph_keeps_its_temporaries_alive():
    """Temporaries a capture allocates from a pool of its own (``using_allocator``) and then
    drops stay valid while that pool lives (as CuPy's pool keeps freed blocks), so the graph
    replays; from the default pool they are handed on, and the launch fails."""
    x, y = device_array([1.0, 2.0]), cupy.zeros(2)

    def step():
        temporary = cupy.exp(x)  # dropped when step returns
        cupy.multiply(temporary, 2.0, out=y)

    pool = cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc):
        graph = capture(step)
    graph.launch()
    np.testing.assert_allclose(y.get(), 2 * np.exp([1.0, 2.0]))
    pool.free_all_blocks()  # the pool gives its blocks back: the graph's memory is gone
    with pytest.raises(runtime.CUDARuntimeError, match="freed after capture"):
        graph.launch()
    with pytest.raises(runtime.CUDARuntimeError, match="freed after capture"):
        capture(step).launch()  # the default pool


def test_a_captured_gather_reads_its_indices_at_replay():
    """Indices computed inside the capture hold garbage until the graph runs (as on a GPU):
    the capture records the gather all the same, and each replay reads the indices then."""
    order, offset = device_array([3, 1, 0, 2], np.int64), device_array([0], np.int64)
    values, out = device_array([10.0, 11.0, 12.0, 13.0]), cupy.zeros(2)

    def step():
        ids = order.take(offset * 2 + cupy.arange(2))  # garbage while capturing
        out[...] = values.take(ids)

    pool = cupy.cuda.MemoryPool()
    with cupy.cuda.using_allocator(pool.malloc):
        graph = capture(step)
    for start, expected in ((0, [13.0, 11.0]), (1, [10.0, 12.0])):
        offset.fill(start)
        graph.launch()
        np.testing.assert_array_equal(out.get(), expected)


def test_fill_and_empty_are_what_cupy_makes_them():
    """``fill`` writes on the device (no host read); ``empty`` allocates without a launch."""
    a = cupy.zeros(3)
    before = launches()
    with count_synchronizations() as syncs:
        a.fill(2.0)
        cupy.empty(4)
    assert syncs.count == 0 and launches() == before + 1


@needs_mnist
def test_the_training_cli_runs_on_the_stand_in(tmp_path):
    """``LENET_XP_FAKE_CUDA=1 python -m lenet_xp.train --device cuda`` trains in a subprocess
    (the variable reaches it) and records the CUDA device; the CPU's run gives the same
    metrics to rounding (the stand-in computes with NumPy)."""
    env = {**os.environ, "LENET_XP_FAKE_CUDA": "1"}
    flags = ["--data-dir", str(DATA), "--epochs", "1", "--limit-train", "600", "--quiet"]
    records = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        cmd = [
            sys.executable,
            "-m",
            "lenet_xp.train",
            "--device",
            device,
            *flags,
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        records[device] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert records["cuda"]["device"] == "cuda:0" and records["cpu"]["device"] == "cpu"
    assert records["cuda"]["test_acc"] == pytest.approx(records["cpu"]["test_acc"], abs=2e-3)
    assert records["cuda"]["train_loss"] == pytest.approx(records["cpu"]["train_loss"], rel=1e-4)


def test_nccl_all_reduce_sums_device_buffers_and_is_refused_inside_a_capture():
    """The stand-in's ``cupy.cuda.nccl`` (MPI underneath; one process here: a sum over one
    rank): device buffers by pointer, in place; refused in a capture, which it cannot hold."""
    pytest.importorskip("mpi4py")
    from lenet_xp.testing.fake_cupy import nccl

    comm = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)
    buffer = cupy.arange(6, dtype=np.float64)
    pointer, stream = buffer.data.ptr, cupy.cuda.get_current_stream().ptr
    comm.allReduce(pointer, pointer, 6, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, stream)
    assert buffer.get().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(RuntimeError, match="another type"):
        comm.allReduce(pointer, pointer, 6, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream)
    with pytest.raises(runtime.CUDARuntimeError, match="StreamCaptureUnsupported"):
        capture(
            lambda: comm.allReduce(pointer, pointer, 6, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, stream)
        )


def test_gpu_counting_and_nccl_come_from_the_backend(monkeypatch):
    """Code outside the backend counts GPUs and finds NCCL through it, so the stand-in's two
    devices and its NCCL are what a sweep and the GPU ranks see; with the stand-in off and no
    driver, there are no GPUs."""
    from lenet_xp.backend import import_nccl
    from lenet_xp.sweep.places import gpu_count
    from lenet_xp.testing.fake_cupy import nccl

    assert gpu_count() == 2 and import_nccl() is nccl
    monkeypatch.setenv("LENET_XP_FAKE_CUDA", "1")
    assert gpu_count() == 1
    monkeypatch.setenv("LENET_XP_FAKE_CUDA", "0")
    from lenet_xp.backend import cuda_unavailable_reason

    if cuda_unavailable_reason(0) is not None:  # this machine: no driver
        assert gpu_count() == 0
