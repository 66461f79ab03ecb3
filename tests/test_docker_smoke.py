"""``scripts/docker_smoke.sh`` where Docker's daemon cannot run: the real script, run with a
PATH of stubs (a ``docker`` client that reaches no daemon) or of links to basic tools only (no
Docker at all), says what to do in one line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "docker_smoke.sh"


def stub(folder: Path, name: str, body: str) -> None:
    """An executable ``folder/name`` running the shell commands ``body``."""
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run_smoke(tmp_path: Path, uid: int, with_dockerd: bool) -> subprocess.CompletedProcess:
    """The script with PATH = stubs only: ``docker`` (every command fails: no daemon), ``id``
    (``-u`` says ``uid``), ``dockerd`` (never started) if ``with_dockerd``, the real
    ``dirname``."""
    bash, dirname = shutil.which("bash"), shutil.which("dirname")
    if bash is None or dirname is None:
        pytest.skip("needs bash and dirname")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    stub(stubs, "docker", 'echo "Cannot connect to the Docker daemon" >&2; exit 1')
    stub(stubs, "id", f"echo {uid}")
    if with_dockerd:
        stub(stubs, "dockerd", "echo started >> '{}'; exit 1".format(tmp_path / "dockerd.ran"))
    (stubs / "dirname").symlink_to(dirname)
    env = {"PATH": str(stubs), "HOME": str(tmp_path), "LENET_XP_DATA": str(tmp_path)}
    return subprocess.run(
        [bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_without_dockerd_it_says_what_to_install(tmp_path):
    """As root with no ``dockerd`` on the PATH: not "start it with: dockerd" (there is none)
    but what to install: docker.io or Docker's own packages, and debootstrap."""
    done = run_smoke(tmp_path, uid=0, with_dockerd=False)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for words in ("dockerd", "not installed", "apt-get install -y docker.io", "docker-ce"):
        assert words in lines[0], (words, lines[0])
    assert "debootstrap" in lines[0] and "start it" not in lines[0]


def test_with_dockerd_but_not_root_it_says_how_to_start_it(tmp_path):
    done = run_smoke(tmp_path, uid=1000, with_dockerd=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "docker daemon not reachable; start it (as root) with: dockerd --storage-driver=vfs "
        "--bridge=none --iptables=false > /tmp/dockerd.log 2>&1 &"
    ]
    assert not (tmp_path / "dockerd.ran").exists()


def test_without_docker_at_all_it_says_what_to_install(tmp_path):
    """A new user's machine: neither ``docker`` nor ``dockerd`` on the PATH (a folder of links
    to the basic tools the script uses, and nothing else): one line saying what to install,
    Docker's engine and debootstrap included, exit status 1."""
    bash = shutil.which("bash")
    tools = {name: shutil.which(name) for name in ("dirname", "id", "cat", "grep", "sed", "mkdir")}
    if bash is None or None in tools.values():
        pytest.skip(f"needs bash and {', '.join(tools)}")
    links = tmp_path / "bin"
    links.mkdir()
    for name, path in tools.items():
        (links / name).symlink_to(path)
    env = {"PATH": str(links), "HOME": str(tmp_path), "LENET_XP_DATA": str(tmp_path)}
    done = subprocess.run(
        [bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    said = ("docker not found", "not installed", "apt-get install -y docker.io", "docker-ce")
    for words in (*said, "apt-get install -y debootstrap"):
        assert words in lines[0], (words, lines[0])
    assert "start it" not in lines[0]
