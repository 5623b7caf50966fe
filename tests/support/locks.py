"""One holder at a time across the test runs that tools/test.sh starts side by side (0.3.75's and 0.33.0's).

For a test that needs most of the machine (the model-management series holds about 10 GB: two 1.1e9-parameter
Chroma Radiance models on one server, which must not meet their twin from the other run on a 24 GB machine), and
for one-time installs both runs may reach for at once (the newest frontend, the browser).
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
