"""Local ports and child processes that end with the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ends_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child process get SIGTERM when this process dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``), and only from the main thread: the
    kernel sends the signal when the *thread* that forked the child exits, so a
    child spawned from a worker thread would be stopped when that thread ends.
    Elsewhere this returns None and the caller needs another way (the dev stack's
    Python children also watch their parent's pid; the Rust broker has only this).
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not after fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec
