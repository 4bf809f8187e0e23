"""The launcher's SIGINT and SIGTERM before it serves (uvicorn takes them over then), and for the
whole life of a node that only hosts ranks (`--node-rank > 0`), which never serves.

The first one raises StopSignal in the main thread, so the start-up unwinds through its cleanups
and stops whatever it had started; later ones are ignored, so as not to cut that cleanup short.
While a child is being spawned (`signals_deferred`) a SIGTERM's raise waits until the spawn is
done: a spawn cut in half leaves a child that fails to unpickle its arguments, with a traceback.
SIGINT is ignored then instead, so that children start with Ctrl-C ignored: a terminal's Ctrl-C
reaches the whole process group, and the parent owns it (the launcher drains, an Engine's caller
gets its KeyboardInterrupt; either stops the children). An ignored signal is the one disposition
a spawned child keeps through exec (a blocked one is not: the spawn unblocks it); set in the child
instead, it would come only after the child's start-up (re-importing `__main__`, then torch),
which a Ctrl-C would end with a traceback of its own. A Ctrl-C within a spawn's few milliseconds
is lost.

A raise from a handler lands wherever the main thread is, also in a `__del__` or a weakref
callback of a garbage collection, where Python prints the exception and goes on: the stop is
kept (`stop_requested`), and the server, taking the signals over, acts on it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class StopSignal(BaseException):
    """SIGINT or SIGTERM while the launcher starts; its argument is the signal's name."""


class _State:
    deferring = 0
    pending: str | None = None
    # the stop, kept: raised inside a `__del__` or a weakref callback (a garbage collection runs
    # them at any moment), the StopSignal is only printed, and the start-up would go on
    raised: str | None = None


def stop_on_signals() -> None:
    """Installs the start-up handlers (main thread only, as every handler)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _raise_stop)
    sys.unraisablehook = _unraisable


def _raise_stop(sig: int, _: Any) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    name = signal.Signals(sig).name
    _State.raised = name
    if _State.deferring:
        _State.pending = name
    else:
        raise StopSignal(name)


def ignore_stop_signals() -> None:
    """A start-up's cleanup under way (after an error, say) runs to its end: the start-up's
    handlers give way to ignoring, as after a first stop. Handlers installed since (the server's
    own: a second signal hurries its stop) stay."""
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is _raise_stop:
            signal.signal(s, signal.SIG_IGN)


def stop_requested() -> str | None:
    """The name of the start-up's stop signal, if one came: where the server takes the signals
    over, a stop whose raise was swallowed (only printed) is acted on still."""
    return _State.raised


def _unraisable(info: Any) -> None:
    """sys.unraisablehook: a swallowed StopSignal is not an error to print (`stop_requested`)."""
    if not isinstance(info.exc_value, StopSignal):
        sys.__unraisablehook__(info)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Around a spawn: a StopSignal that arrives inside waits for the end of the block (where the
    handlers are installed: an offline Engine leaves them alone), and SIGINT is ignored inside,
    so that the child starts with it ignored."""
    # from the main thread only (as every handler), and not over a handler installed from C,
    # which could not be put back
    own = threading.current_thread() is threading.main_thread()
    own = own and signal.getsignal(signal.SIGINT) is not None
    before = signal.signal(signal.SIGINT, signal.SIG_IGN) if own else None
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
        if own and _State.pending is None:  # a stop left both ignored: kept so
            signal.signal(signal.SIGINT, before)
    if not _State.deferring and _State.pending is not None:
        name, _State.pending = _State.pending, None
        raise StopSignal(name)
