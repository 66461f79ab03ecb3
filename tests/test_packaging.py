"""What ``pip install`` puts on a machine: the package with its CUDA sources and the drawing
page's files."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from lenet_xp.kernels import SOURCES

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_every_kernel_source(tmp_path):
    """Built from a clean copy (as in a Docker build: no egg-info, no git), the wheel holds
    every ``.cu`` file and their common header, which the GPU path compiles at run time."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "lenet_xp", src / "lenet_xp", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]  # as pip install builds
    proc = subprocess.run(cmd + ["-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("lenet_xp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in [*SOURCES, "common.cuh"]:
        assert f"lenet_xp/kernels/{file}" in names, file
    for file in ("index.html", "app.js", "style.css"):  # the page lenet_xp.serve serves
        assert f"lenet_xp/web/static/{file}" in names, file
