"""One test at a time across parallel test runs, for the few that need most of the machine.

tools/test.sh runs the 0.3.75 and 0.33.0 tiers side by side; a test that holds about 10 GB (two 1.1e9-parameter
Chroma Radiance models on one server) must not meet its twin from the other run on a 24 GB machine.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

LOCKS = Path(__file__).resolve().parents[2] / ".cache" / "locks"


@contextlib.contextmanager
def exclusive(name: str):
    """Holds the machine-wide lock ``name`` (a file under .cache/locks) for the block; waits for it."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    with open(LOCKS / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
