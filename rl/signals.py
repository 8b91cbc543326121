"""Graceful stop on SIGTERM (Slurm / Kubernetes preemption) and SIGINT (Ctrl-C): the first signal only sets a flag,
which the training loop reads at its step boundaries, then finishes or abandons the step, saves and exits; a second
signal exits at once.

Signals arriving within `same_request_s` of the first count as the same request: a launcher (torchrun / accelerate
launch) forwards the SIGTERM or SIGINT it got to the trainers, which often got it themselves from the process group.
"""

from __future__ import annotations

import os
import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers on enter and puts the previous ones back on exit. `signal_name` is the first signal
    received (None while none has been); only the main thread of the main interpreter can install handlers."""

    def __init__(self, same_request_s: float = 2.0):
        self.same_request_s = same_request_s
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, time.monotonic()
            os.write(2, f"\n{self.signal_name} received: finishing this step, saving a checkpoint, then exiting "
                        "(send it again to exit at once)\n".encode())
        elif time.monotonic() - self._first_at > self.same_request_s:
            signal.signal(signum, signal.SIG_DFL)  # die of the signal itself, as if we had never caught it
            os.kill(os.getpid(), signum)
