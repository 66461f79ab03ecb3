"""SIGINT and SIGTERM for a training run: stop at the next safe point, saved, not mid-write.

``docker stop`` sends SIGTERM (then SIGKILL ten seconds later), a terminal's Ctrl-C sends
SIGINT. While :class:`StopSignals` is active, the first of them only records the request: the
training loop acts on it after the current step (or, still starting, before the first one),
saves and raises :class:`Interrupted` itself (:class:`lenet_xp.training.resume.Keeper`).
Raising from the handler instead would be unsafe: an exception raised at an arbitrary point can
be lost (e.g. inside an extension module's import) and the run would go on. A second signal raises
:class:`Interrupted` at once, for the user who will not wait. Worker processes ignore both
signals (:mod:`lenet_xp.training.parallel`): the main process decides.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on ``signum`` (the run exits with ``128 + signum``: 130 for SIGINT,
    143 for SIGTERM); ``str()`` says what was saved and how to resume (may be empty); ``how``:
    why it stopped at once, not at a step's end (a second signal, or a worker that did not
    answer)."""

    def __init__(self, signum: int, message: str = "", how: str = "(a second signal)") -> None:
        super().__init__(message)
        self.signum, self.how = signum, how


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: SIGINT/SIGTERM handlers for its duration (main thread only; elsewhere
    it does nothing). ``requested``: the first signal received (``None``: none yet)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum  # the training loop stops after the current step
            return
        raise Interrupted(signum)  # a second signal: now


def exit_message(exc: KeyboardInterrupt, resume_hint: str) -> tuple[str, int]:
    """``(one line, exit status)`` for a run ended by ``exc``: its own message if it has one
    (the training loop wrote it), else that it stopped while starting, and ``resume_hint``."""
    signum = getattr(exc, "signum", signal.SIGINT)
    message = str(exc) or f"stopped by {signal_name(signum)} while starting; {resume_hint}"
    return message, 128 + signum
