"""The drawing page's HTTP server: the page's files, ``POST /predict`` and ``GET /info`` on the
standard library's threading HTTP server, every error as one line of JSON
(``python -m lenet_xp.serve`` is its command line: :mod:`lenet_xp.serve`)."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from lenet_xp.web.api import ApiError, Classifier, body_of, parse_body
from lenet_xp.web.budget import DecodeBudget

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
