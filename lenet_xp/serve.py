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
import contextlib
import errno
import json
import math
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lenet_xp.backend import DeviceError, get_device, use_device
from lenet_xp.storage.checkpoint import CheckpointError
from lenet_xp.web.api import ApiError, Classifier, body_of, parse_body
from lenet_xp.web.budget import DecodeBudget, unmap_freed_blocks

PROG = "python -m lenet_xp.serve"
#: The largest request body accepted by default (a phone photo is a few MB).
DEFAULT_MAX_BODY_MB = 20.0
#: The most pixels a picture may decode to by default (a JPEG of a phone photo, 12 to 50
#: megapixels, decodes at 1/2 to 1/8 scale, so to a few megapixels at most). Decoding costs
#: about 1.5 bytes a pixel (greyscale) to 6 (colour with transparency).
DEFAULT_MAX_PIXELS = 40_000_000
#: Requests parsed at once (a picture being decoded, within a memory budget, or JSON read).
PARSED_AT_ONCE = 4
#: Static files of the page, by URL path: ``(file in lenet_xp/web/static, Content-Type)``.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
#: Sent with every answer: the page loads nothing from elsewhere and runs no inline script.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: What ``--host 0.0.0.0`` means, printed when the server listens beyond this machine.
EXPOSED_WARNING = (
    "warning: listening on {host} exposes the page and its API to every machine that can reach "
    "this one on port {port} (your local network, or more if a firewall lets it through); "
    "anyone there can send it pictures. There is no password. Use it on a network you trust, "
    "e.g. to draw on your phone, and stop it (Ctrl+C) afterwards."
)


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the installed package: URL path -> (bytes, type)."""
    folder = resources.files("lenet_xp.web") / "static"
    return {url: (folder.joinpath(name).read_bytes(), kind) for url, (name, kind) in STATIC.items()}


class Handler(BaseHTTPRequestHandler):
    """One request: the page's files, ``POST /predict``, ``GET /info``; errors as JSON."""

    server: Server
    server_version = "lenet_xp.serve"
    #: Seconds a client may stay silent mid-request before its connection is dropped.
    timeout = 30

    # -- answers ------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, answer: Any) -> None:
        self._send(status, json.dumps(answer, separators=(",", ":")).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._why = " ".join(message.split())
        self._json(status, {"error": self._why})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The server's own errors (a malformed request line, an unknown method, ...) as JSON."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED:
            message = f"{message or 'unsupported method'}: use GET / or POST /predict"
        with contextlib.suppress(OSError):  # the client went away
            self._error(code, message or HTTPStatus(code).phrase)

    # -- methods ------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path in self.server.files:
            body, kind = self.server.files[path]
            self._send(HTTPStatus.OK, body, kind)
        elif path == "/info":
            self._json(
                HTTPStatus.OK,
                self.server.classifier.info()
                | {"max_body_bytes": self.server.max_body, "max_pixels": self.server.max_pixels},
            )
        elif path == "/predict":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "POST a picture or JSON to /predict")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path} (the page is /)")

    do_HEAD = do_GET  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != "/predict":
            self._drain(self._content_length(quiet=True))
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path} (use /predict)")
            return
        try:
            maps = parse_qs(url.query).get("maps", ["1"])[-1] not in ("0", "false", "no")
            body = self._read_body()
            with self.server.slots:
                x = parse_body(
                    body_of(self.headers.get("Content-Type"), body),
                    self.server.max_pixels,
                    self.server.decoding.reserve,  # bounds the memory of decodes under way
                )
                answer = self.server.classifier.classify(x, maps)
        except ApiError as exc:
            self._error(exc.status, exc.message)
            return
        except TimeoutError:
            self.close_connection = True
            return
        except Exception as exc:  # a bug of ours: one line in the log and for the client
            self.log_message("internal error on %s: %s: %s", self.path, type(exc).__name__, exc)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(exc).__name__}")
            return
        self._json(HTTPStatus.OK, answer)

    # -- the request body -------------------------------------------------------------------
    def _content_length(self, quiet: bool = False) -> int:
        """The declared body length; :class:`ApiError` (411, 400) when absent or malformed."""
        text = self.headers.get("Content-Length")
        if text is None:
            if quiet:
                return 0
            self.close_connection = True
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            how = " (chunked bodies are not accepted)" if chunked else ""
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, f"send a Content-Length header{how}")
        try:
            length = int(text)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            if quiet:
                return 0
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bad Content-Length: {text!r}") from None
        return length

    def _read_body(self) -> bytes:
        """The whole body, at most ``server.max_body`` bytes (else 413, after reading it)."""
        length = self._content_length()
        limit = self.server.max_body
        if length > limit:
            self._drain(length)
            raise ApiError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {length:,} bytes, over the limit of {limit:,} "
                f"(--max-body-mb {limit / 2**20:g}): send a smaller picture",
            )
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body is shorter than its Content-Length")
        return data

    def _drain(self, length: int) -> None:
        """Read and drop a body we will not use, so the client sees our answer rather than
        a reset connection; past 4x the limit, close the connection instead."""
        if length > 4 * self.server.max_body:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    # -- logging ------------------------------------------------------------------------
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One line per failed request (per request with ``--verbose``)."""
        if self.server.verbose or (isinstance(code, int) and code >= 400):
            why = getattr(self, "_why", "")
            code = int(code) if isinstance(code, int) else code
            self.log_message('"%s" %s%s', self.requestline, code, f": {why}" if why else "")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        if not self.server.quiet:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` holding the :class:`Classifier` and the page's files."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        classifier: Classifier,
        max_body: int = int(DEFAULT_MAX_BODY_MB * 2**20),
        verbose: bool = False,
        quiet: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.classifier = classifier
        self.max_body = max_body
        self.max_pixels = max_pixels
        self.verbose = verbose
        self.quiet = quiet
        self.files = static_files()
        self.slots = threading.BoundedSemaphore(PARSED_AT_ONCE)
        self.decoding = DecodeBudget.for_limit(max_pixels)  # lenet_xp.web.budget
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        """The page's address (``http://host:port/``)."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that broke (the client went away, ...): one line, never a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError) or self.quiet:
            return
        print(f"{PROG}: connection from {client_address[0]} failed: {exc!r}", file=sys.stderr)


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
