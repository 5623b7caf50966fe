"""What every benchmark writes into BENCHMARKS.md: its own ``## ...`` section, and the machine it ran on.

Standard library only, so that a benchmark can run where neither ComfyUI nor the test packages are.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(heading: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace the section ``heading`` (up to the next ``## `` heading) with ``body``, or append it;
    the rest of the file stays as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def publish(heading: str, body: str, write: bool = True) -> None:
    """Print a benchmark's section and, with ``write``, put it into BENCHMARKS.md."""
    print(f"{heading}\n\n{body}")
    if write:
        write_section(heading, body)


def run_facts(script: str, argv: list[str] | None, samples: str, started: float, threads: int,
              torch_version: str) -> list[str]:
    """The command, samples, machine and date lines of a benchmark section (``started``: time.time()
    at its start; ``threads``: torch threads per run)."""
    command = f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return [f"- command: `{command.strip()}`",
            f"- samples: {samples}",
            f"- machine: {cpu_name()} ({os.cpu_count()} cores, shared), {threads} torch thread(s), torch "
            f"{torch_version}, {platform.python_implementation()} {platform.python_version()}",
            f"- date: {datetime.date.today().isoformat()}, total {(time.time() - started) / 60:.1f} min"]


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
