"""``python -m lenet_xp.serve --checkpoint PATH``: draw a digit, watch the network read it.

Serves one page (``lenet_xp/web/static/``: no CDN, no build step, nothing fetched from elsewhere)
and the JSON API behind it, with the standard library's threading HTTP server:

* ``GET /``: the page: draw with a mouse, pen or finger, or open / drop a photo; it shows the
  ten probabilities, the 28x28 picture the network sees and the feature maps of every layer.
* ``POST /predict`` (``?maps=0``: without feature maps): a picture (PNG, JPEG, ...) or JSON
  ``{"image": 28x28 array}`` -> ``{"digit", "probability", "probabilities", "input",
  "feature_maps"}``; see :mod:`lenet_xp.web.api`. Bad requests get a 4xx and
  ``{"error": "one line"}``.
* ``GET /info``: the model (``arch``, ``epoch``, ``parameters``, ``input_size``, ``device``).

It listens on 127.0.0.1 (this machine only) unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys

from lenet_xp.backend import DeviceError, get_device, use_device
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.web.api import Classifier
from lenet_xp.web.budget import unmap_freed_blocks
from lenet_xp.web.server import (  # noqa: F401  (STATIC, static_files: re-exported)
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_PIXELS,
    PROG,
    STATIC,
    Server,
    static_files,
)

#: What ``--host 0.0.0.0`` means, printed when the server listens beyond this machine.
EXPOSED_WARNING = (
    "warning: listening on {host} exposes the page and its API to every machine that can reach "
    "this one on port {port} (your local network, or more if a firewall lets it through); "
    "anyone there can send it pictures. There is no password. Use it on a network you trust, "
    "e.g. to draw on your phone, and stop it (Ctrl+C) afterwards."
)


def make_server(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    arch: str | None = None,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    verbose: bool = False,
    quiet: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Server:
    """A server for the model in ``checkpoint``, bound (``port=0``: a free port) but not yet
    serving: call ``serve_forever()`` (in a thread, for tests) and ``shutdown()``.

    Raises :class:`CheckpointError`, :class:`DeviceError` or ``OSError`` (address in use ...).
    """
    from lenet_xp.training.evaluation import load_model

    dev = get_device(device)
    with use_device(dev):
        model, meta = load_model(checkpoint, dev, arch)
    classifier = Classifier(model, dev, meta)
    return Server((host, port), classifier, int(max_body_mb * 2**20), verbose, quiet, max_pixels)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), not {text}")
    return port


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < 2**20:  # NaN and infinity fail too
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB, not {text}")
    return value


def _pixels(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 1 <= value <= 2**40:  # NaN and infinity fail too
        raise argparse.ArgumentTypeError(f"must be a number of pixels, e.g. 40e6, not {text}")
    return int(value)


def _bind_error(exc: OSError, host: str, port: int) -> str:
    """One line for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is in use: pick another with --port (--port 0: any free)"
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on port {port} (below 1024 needs root): use --port 8000"
    return f"cannot listen on {host} port {port}: {exc.strerror or exc}"


def build_parser() -> argparse.ArgumentParser:
    """``python -m lenet_xp.serve``'s flags."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a .npz written by lenet_xp.train")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every "
        "network interface, so any machine that can reach this one can use it, e.g. your phone)",
    )
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: a free one)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--arch", default=None, help="refuse a checkpoint of another --arch")
    p.add_argument(
        "--max-body-mb",
        type=_positive,
        default=DEFAULT_MAX_BODY_MB,
        help=f"largest upload accepted, in MiB (default {DEFAULT_MAX_BODY_MB:g})",
    )
    p.add_argument(
        "--max-pixels",
        type=_pixels,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest picture accepted, in pixels once decoded (default "
        f"{DEFAULT_MAX_PIXELS // 10**6}e6 = {DEFAULT_MAX_PIXELS // 10**6} megapixels; a large "
        "JPEG decodes at 1/2 to 1/8 scale): bigger ones get a 413, read from their header "
        "before decoding",
    )
    p.add_argument("--verbose", action="store_true", help="log every request, not only failures")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import PIL  # noqa: F401 (the page sends pictures: decoding them needs Pillow)
    except ImportError:
        print(
            f'{PROG}: error: serving needs Pillow: pip install "lenet_xp[images]"', file=sys.stderr
        )
        return 1
    try:
        server = make_server(
            args.checkpoint, args.host, args.port, args.device, args.arch, args.max_body_mb,
            args.verbose, max_pixels=args.max_pixels,
        )  # fmt: skip
    except (CheckpointError, DeviceError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {_bind_error(exc, args.host, args.port)}", file=sys.stderr)
        return 1
    unmap_freed_blocks()  # a decoded picture's memory goes back to the system when freed
    _announce(server, args.checkpoint, args.host)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"{PROG}: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _announce(server: Server, checkpoint: str, host: str) -> None:
    """What is served, where to open it, and the warning when ``host`` is not this machine."""
    info = server.classifier.info()
    port = server.server_address[1]
    print(
        f"{info['arch']} from {checkpoint} (epoch {info['epoch']}) on {info['device']}",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(EXPOSED_WARNING.format(host=host, port=port), flush=True)
    shown = server.url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
    print(f"open {shown} in a browser; Ctrl+C stops the server", flush=True)


if __name__ == "__main__":
    sys.exit(main())
