"""Ctrl-C that never lands inside compiled code.

Python raises KeyboardInterrupt in whatever Python frame runs next, and a Numba kernel calls back into
Python now and then (to unpickle a constant, say): raised there, the kernel returns with the
exception pending and the caller sees `SystemError: CPUDispatcher(...) returned a result with an
exception set`. So while the model generates, Ctrl-C only records the request, and generation asks
between kernel calls (between prompt chunks and between tokens) whether to stop.
"""

from __future__ import annotations

import signal
import threading


class CtrlC:
    """`with CtrlC() as ctrl_c:` Ctrl-C sets `ctrl_c.pressed` instead of raising; `ctrl_c` itself is
    the `cancelled()` callable that generation asks. The previous handler comes back on exit. Where
    SIGINT was ignored (a background job started by a shell), it stays ignored."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = None

    def __enter__(self) -> "CtrlC":
        self.event.clear()
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = signal.getsignal(signal.SIGINT)
            if self.previous is not signal.SIG_IGN:
                signal.signal(signal.SIGINT, lambda signum, frame: self.event.set())
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    @property
    def pressed(self) -> bool:
        return self.event.is_set()

    def __call__(self) -> bool:
        return self.event.is_set()


def caused_by_ctrl_c(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt raised inside a kernel's call back into Python is behind this error
    (the SystemError above, which can only happen outside CtrlC: while loading and compiling)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
