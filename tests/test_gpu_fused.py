"""Our CUDA kernels on a real GPU: the fused step against the array-op layers, graph replay
against eager steps, no hidden synchronisation, and the training CLI with the kernels on.

Every test here needs a GPU (``scripts/gpu_check.sh`` runs them with
``LENET_XP_REQUIRE_CUDA=1``, so they cannot pass by skipping). The same comparisons run on
the CPU through the kernel emulator in ``test_fused_emulated.py``.
"""

import json

import numpy as np
import pytest
from conftest import DATA, ON_STAND_IN, needs_cuda, needs_mnist
from fused_check import assert_same_training, fused_epoch, make_split, reference_epoch

from lenet_xp.backend import asnumpy

pytestmark = needs_cuda
TOL = {"float32": (1e-4, 1e-5), "float64": (1e-10, 1e-12)}


@pytest.mark.parametrize("gemm", ["cublas", "ours"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_epoch_matches_the_layers(dtype, gemm):
    split = make_split("cuda", dtype)
    ref = reference_epoch(split, dtype, batch=128, shift=2)
    fused = fused_epoch(split, dtype, batch=128, shift=2, gemm=gemm)
    assert_same_training(ref, fused, *TOL[dtype])


def test_adamw_in_the_fused_step():
    split = make_split("cuda", "float64")
    ref = reference_epoch(split, "float64", batch=64, shift=0, adamw=True)
    fused = fused_epoch(split, "float64", batch=64, shift=0, gemm="ours", adamw=True)
    assert_same_training(ref, fused, *TOL["float64"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_graph_replay_equals_eager_steps_bit_for_bit(dtype):
    """Replays and eager steps run the same kernels: identical numbers over an epoch with a
    short last batch (300 = 2 x 128 + 44)."""
    split = make_split("cuda", dtype)
    eager = fused_epoch(split, dtype, batch=128, shift=2, gemm="ours")
    graph = fused_epoch(split, dtype, batch=128, shift=2, gemm="ours", graph=True)
    assert graph[2].graph is not None
    for (name, a), (_, b) in zip(
        eager[0].named_parameters(), graph[0].named_parameters(), strict=True
    ):
        np.testing.assert_array_equal(asnumpy(b.data), asnumpy(a.data), err_msg=name)
    assert graph[1] == eager[1]


@pytest.mark.parametrize("graph", [False, True])
def test_an_epoch_never_synchronises(graph):
    from lenet_xp.testing import cupyx as cupyx_module

    cupyx = cupyx_module()

    from lenet_xp.backend import host_rng
    from lenet_xp.data.device_split import permutation, random_shifts

    n = 300 if ON_STAND_IN else 1000  # 2 full batches and a short one at least
    split = make_split("cuda", "float32", n=n)
    _, _, fused = fused_epoch(
        split, "float32", 128, 2, "ours" if graph else "cublas", graph=graph, epochs=2
    )
    rng = host_rng(5)
    fused.begin_epoch(permutation(n, rng, split.device), random_shifts(n, 2, rng, split.device))
    with cupyx.allow_synchronize(False):
        fused.run_epoch()
    if ON_STAND_IN:  # the stand-in counts every host read: the epoch's end is one
        from lenet_xp.testing import count_synchronizations

        with count_synchronizations() as syncs:
            loss_sum, correct = fused.end_epoch()
        assert syncs.count == 1
    else:
        loss_sum, correct = fused.end_epoch()
    assert np.isfinite(loss_sum) and 0 <= correct <= 1000


@pytest.mark.parametrize("gemm", ["cublas", "ours"])
def test_launches_per_step_within_the_target(gemm):
    split = make_split("cuda", "float32")
    _, _, fused = fused_epoch(split, "float32", 128, 2, gemm)
    assert fused.launches_per_step() <= 40


@needs_mnist
@pytest.mark.parametrize("flag", ["--cuda-kernels", "--cuda-graph"])
def test_training_cli_with_our_kernels(tmp_path, flag):
    """Two same-seed runs: accuracy within a point of the CPU's and identical metrics
    (timings aside)."""
    from lenet_xp import train

    # On the stand-in every kernel is emulated on the CPU (our tiled GEMM slowly): less data.
    size = ["--limit-train", "600", "--limit-test", "1000"] if ON_STAND_IN else []
    runs = []
    for name, device in (("a", ["cuda", flag]), ("b", ["cuda", flag]), ("cpu", ["cpu"])):
        args = ["--device", *device, "--epochs", "2", "--limit-train", "10000", "--quiet", *size]
        args += ["--data-dir", str(DATA), "--out", str(tmp_path / name)]
        assert train.main(args) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        drop = {"train_seconds", "images_per_second"}
        runs.append([{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines])
    assert abs(runs[0][-1]["test_acc"] - runs[2][-1]["test_acc"]) < 0.01
    assert runs[0][-1]["test_acc"] > (0.3 if ON_STAND_IN else 0.9)  # 550 images there
    assert runs[0] == runs[1]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_layers_with_our_im2col_and_col2im_match_the_reference(dtype):
    """``Conv2d`` dispatches to our im2col/col2im kernels when they are on (stride 2, pad 1)."""
    from lenet_xp.backend import to_device
    from lenet_xp.layers import Conv2d

    x = np.random.default_rng(0).standard_normal((5, 3, 11, 9)).astype(dtype)
    g = np.random.default_rng(1).standard_normal((5, 4, 6, 5)).astype(dtype)
    results = []
    for on in (False, True):
        layer = Conv2d(3, 4, 3, 2, 1, rng=np.random.default_rng(2), dtype=dtype).to("cuda")
        layer.use_cuda_kernels(on)
        y = layer.forward(to_device(x, "cuda"))
        grad_x = layer.backward(to_device(g, "cuda"))
        results.append([asnumpy(a) for a in (y, grad_x, layer.weight.grad, layer.bias.grad)])
    rtol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    for ours, ref in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))


@needs_mnist
@pytest.mark.parametrize("flag", ["--no-cuda-kernels", "--cuda-graph"])
def test_evaluate_predict_and_resume_on_cuda(tmp_path, capsys, flag):
    """Resuming on CUDA from the epoch-1 checkpoint gives the uninterrupted run's metrics;
    evaluate and predict read the checkpoint on CUDA."""
    from lenet_xp import evaluate, predict, train

    common = ["--device", "cuda", flag, "--quiet", "--data-dir", str(DATA)]
    limit = "600" if ON_STAND_IN else "4000"  # the stand-in emulates every kernel: less data
    straight = common + ["--limit-train", limit, "--limit-test", "1000", "--epochs", "2"]
    straight += ["--keep-every-epoch", "--out", str(tmp_path / "s")]
    assert train.main(straight + ["--metrics", str(tmp_path / "s.jsonl")]) == 0
    (tmp_path / "r.jsonl").write_text((tmp_path / "s.jsonl").read_text().splitlines()[0] + "\n")
    resume = common + ["--resume", str(tmp_path / "s" / "epoch_001.npz")]
    assert (
        train.main(resume + ["--out", str(tmp_path / "r"), "--metrics", str(tmp_path / "r.jsonl")])
        == 0
    )
    drop = {"train_seconds", "images_per_second"}

    def metrics(name):
        lines = (tmp_path / name).read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]

    assert metrics("r.jsonl") == metrics("s.jsonl") and len(metrics("s.jsonl")) == 2
    capsys.readouterr()
    last = tmp_path / "s" / "last.npz"
    assert (
        evaluate.main(["--checkpoint", str(last), "--device", "cuda", "--data-dir", str(DATA)]) == 0
    )
    out = capsys.readouterr().out
    assert "on cuda:0" in out and "test_acc" in out

    image = pytest.importorskip("PIL.Image")
    from lenet_xp.data.mnist import load_mnist

    digit = load_mnist(DATA, download=False).test_images[0]
    path = tmp_path / "digit.png"
    image.fromarray(digit).save(path)
    assert predict.main([str(path), "--checkpoint", str(last), "--device", "cuda"]) == 0
    assert str(path) in capsys.readouterr().out
