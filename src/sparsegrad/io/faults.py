"""Fault injection for the crash tests: with ``SPARSEGRAD_TEST_KILL_AT=<point>[:<n>]`` the process SIGKILLs itself
at the n-th (default first) pass through `fault_point(<point>)`. No effect when the variable is unset."""

from __future__ import annotations

import os
import signal

KILL_ENV = "SPARSEGRAD_TEST_KILL_AT"

_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``$SPARSEGRAD_TEST_KILL_AT`` names this point (tests of crash safety)."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    point, _, nth = want.rpartition(":")
    if not nth.isdigit():
        point, nth = want, "1"
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
