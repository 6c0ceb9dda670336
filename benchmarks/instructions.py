"""What recording a call costs, counted in instructions instead of time (needs valgrind).

Timings on a shared machine move by a few microseconds from block to block, which is the size
of the differences that decide issue #2's sync ratios. Valgrind's cachegrind counts the
instructions a process executes, and simulates its branch predictor and caches, the same way
every run: the figures below are exact for the code measured, and say where a gap in the timed
benchmark (``overhead.py``) comes from, the work itself or how the machine runs it.

Each configuration of ``overhead.py`` (no callbacks, a no-op handler,
``UsageMetadataCallbackHandler``, ``TokenLedgerHandler`` writing to SQLite) runs in a fresh
process under cachegrind twice, after the same warm-up: once making no calls, once making
``--calls`` calls; the difference, divided by the calls, is the cost per call. The ledger's
writer process is not counted (it runs on another core; ``overhead.py`` times its effect).

Run::

    python benchmarks/instructions.py                 # stream and invoke, about 3 minutes
    python benchmarks/instructions.py --mode stream --calls 100
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from _bench import ratio, table
from overhead import CONFIGS, configurations, modes

from langchain_tokenledger import Ledger
from langchain_tokenledger.testing import FakeUsageChatModel

EVENTS = {"instructions": r"I\s+refs", "mispredicts": r"Mispredicts", "d1_misses": r"D1\s+misses"}
"""The events counted, and the pattern of each one's line in cachegrind's summary."""
WARM_UP = 20


def _worker(config: str, mode: str, calls: int) -> None:
    """Make ``WARM_UP`` then ``calls`` calls in ``config`` (run under cachegrind), as
    ``overhead.py`` makes them."""
    # The writer process is not counted; pulling rarely, it leaves this process's reader thread
    # asleep, which would otherwise wake more often the slower valgrind runs us.
    ledger = Ledger(f"sqlite:///{tempfile.mkdtemp()}/instructions.db", linger=60)
    config_value = configurations(ledger)[config]
    [call] = [m for m in modes(FakeUsageChatModel(), 1.0) if m.name.split(",")[0] == f"`{mode}`"]
    assert call.sync is not None
    gc.disable()  # a collection would land in one run and not the other
    call.sync(config_value, WARM_UP)
    if config == "tokenledger":
        ledger.flush()  # the writer process up and idle before the counted calls
    call.sync(config_value, calls)
    sys.stdout.flush()
    os._exit(0)  # no teardown: it would differ with what was recorded


def _counts(config: str, mode: str, calls: int) -> dict[str, int]:
    """Cachegrind's totals for one process making ``calls`` calls."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        "--branch-sim=yes",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--worker",
        config,
        mode,
        str(calls),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    counts = {}
    for label, pattern in EVENTS.items():
        found = re.search(rf"{pattern}:\s+([\d,]+)", done.stderr)
        if found is None:
            raise RuntimeError(f"no {label!r} in cachegrind's output:\n{done.stderr[-2000:]}")
        counts[label] = int(found.group(1).replace(",", ""))
    return counts


def per_call(mode: str, calls: int) -> dict[str, dict[str, float]]:
    """Each configuration's events per call, from a run with no calls and one with ``calls``."""
    jobs = [(config, n) for config in CONFIGS for n in (0, calls)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(
            zip(jobs, pool.map(lambda job: _counts(job[0], mode, job[1]), jobs), strict=True)
        )
    return {
        config: {
            label: (results[config, calls][label] - results[config, 0][label]) / calls
            for label in EVENTS
        }
        for config in CONFIGS
    }


def rows_for(mode: str, counts: dict[str, dict[str, float]]) -> list[list[str]]:
    """One table row per configuration: events per call, and what a handler adds to bare."""
    bare = counts["bare"]
    theirs = counts["usage_callback"]["instructions"] - bare["instructions"]
    rows = []
    for config in CONFIGS:
        c = counts[config]
        added = {label: c[label] - bare[label] for label in EVENTS}
        rows.append(
            [
                f"`{mode}`",
                config,
                f"{c['instructions']:,.0f}",
                f"+{added['instructions']:,.0f}" if config != "bare" else "",
                ratio(added["instructions"] / theirs) if config != "bare" else "",
                f"{added['mispredicts']:+,.0f}" if config != "bare" else "",
                f"{added['d1_misses']:+,.0f}" if config != "bare" else "",
            ]
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Count every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("stream", "invoke"), action="append")
    parser.add_argument("--calls", type=int, default=200, help="calls per counted process")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        config, mode, calls = args.worker
        _worker(config, mode, int(calls))
        return
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count (e.g. apt-get install valgrind)")
        return
    rows = []
    for mode in args.mode or ["stream", "invoke"]:
        rows += rows_for(mode, per_call(mode, args.calls))
    print(
        f"Per call, counted by cachegrind ({args.calls} calls after {WARM_UP} of warm-up, "
        "minus a process making none; branch predictor and caches simulated):\n\n"
        + table(
            [
                "call",
                "configuration",
                "instructions",
                "added instructions",
                "ratio to `UsageMetadataCallbackHandler`'s",
                "added mispredicted branches",
                "added L1 data misses",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
