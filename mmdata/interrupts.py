"""Ctrl-C and SIGTERM that no library can swallow.

Python runs a signal handler between bytecodes, which may be inside a callback that C code made into
Python: soundfile reads and writes in-memory audio through cffi callbacks, and cffi prints an exception
raised there and returns to the C caller as if the read had ended. The KeyboardInterrupt is lost, the
decoder sees a short file, and the run goes on with a truncated sample (and cffi prints the traceback).
So the handler also sets a flag that outlives the exception, and code that calls into such libraries
does so inside :func:`deferred`: there the handler only sets the flag, and leaving it raises.
"""

from __future__ import annotations

import signal
import threading

_requested = False
_deferring = 0   # depth of deferred() blocks in progress (the handler runs in the main thread)


def interrupt(signum, frame) -> None:
    """The handler for SIGINT and SIGTERM in the ``mmdata`` command: remember the stop, then raise, unless
    the main thread is inside a library call that would swallow the exception (``deferred``)."""
    global _requested
    _requested = True
    if not _deferring:
        raise KeyboardInterrupt


class deferred:
    """A block that calls into C code that calls back into Python (soundfile): a stop requested meanwhile
    is raised when the block ends, not inside a callback, where it would be printed and lost."""

    def __enter__(self):
        global _deferring
        if threading.current_thread() is threading.main_thread():
            _deferring += 1
            self.counted = True
        else:
            self.counted = False
        return self

    def __exit__(self, *exc) -> None:
        global _deferring
        if self.counted:
            _deferring -= 1
        check()


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested, even one whose exception a callback swallowed."""
    if _requested:
        raise KeyboardInterrupt


def requested() -> bool:
    return _requested


class handling_interrupts:
    """While active (main thread only), SIGINT and SIGTERM stop the run through :func:`interrupt`; the
    previous handlers and a clear flag are restored afterwards (tests run many commands in one process)."""

    def __enter__(self):
        global _requested
        _requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, interrupt)
        return self

    def __exit__(self, *exc) -> None:
        global _requested
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        _requested = False
