"""Waiting, in tests, for what a server, an agent or a daemon does in the background.

The bound is a guard against a test hanging when the condition never comes, not a
check of how fast it came: it is generous, and speed is measured in bench/, never
asserted here (the machine is shared and noisy).
"""
from __future__ import annotations

import time

HANG_GUARD_S = 120.0


def wait_for(predicate, what: str = "the condition", timeout_s: float = HANG_GUARD_S, every_s: float = 0.05):
    """Poll `predicate()` until it returns something true, and return that value;
    TimeoutError naming `what` if it never does within `timeout_s`."""
    give_up = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() >= give_up:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:g} s (a hang guard, not a speed check)")
        time.sleep(every_s)
    return value
