"""A real ``lenet_xp.serve`` server for tests, shared by test_serve.py and
test_serve_browser.py."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from lenet_xp import serve


@contextlib.contextmanager
def running_server(checkpoint: Path, **options) -> Iterator[serve.Server]:
    """A server for ``checkpoint`` on 127.0.0.1, a free port, serving in a thread (``options``:
    :func:`lenet_xp.serve.make_server`'s); shut down and closed on leaving."""
    srv = serve.make_server(str(checkpoint), port=0, quiet=True, **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)
