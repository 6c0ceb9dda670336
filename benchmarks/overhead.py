"""What recording costs a LangChain call, measured side by side in the same processes.

Three sections (all by default, or pick with ``--only``):

* ``calls`` (issue #2): per-call time of ``invoke``, ``ainvoke`` (sequential, and 1,000 at once
  through ``asyncio.gather``), and a 20-chunk ``stream``/``astream`` of an in-process chat model
  that reports usage, with no callbacks, with langchain-core's ``UsageMetadataCallbackHandler``,
  and with ``TokenLedgerHandler`` writing to a SQLite file. Configurations are interleaved
  (round-robin, rotating the order), and a handler's *added* cost is the median over rounds of
  (its block's time per call - the bare block's of the same round): pairing blocks of one round
  cancels the machine's drift, which is larger than the differences measured. The added costs
  are compared as a ratio.

  The rounds run in several fresh processes, one after the other (``--processes``, each with
  its own hash seed, printed), and the medians are taken over the rounds of all of them. A
  process's hash seed (through its dicts' layouts and where its objects land in memory) moves a
  handler's added cost by several microseconds from one process to the next, both handlers'
  and not by the same amount: one process alone gave a ``stream`` ratio anywhere from x0.7 to
  x1.5, however many rounds it ran (docs/benchmarks.md, eighth pass). The ratio of each
  process is printed beside the pooled one. ``invoke`` and ``stream`` run three times the
  rounds of the others: their blocks are the cheapest, and their ratios sit nearest the target.

  The ledger's writer process runs during the measurement (on the other core: its activity
  slows the application's core too, and that counts); each block lasts several writer
  ``linger`` periods, and the rows left over at its end are flushed outside the timed region
  (the "incl. flush" column times that flush too, as an upper bound).
* ``context`` (issue #3): per-call time inside ``track_usage`` and inside langchain-core's
  ``get_usage_metadata_callback``, after 0 and after 10,000 prior uses of each context manager.
  ``get_usage_metadata_callback`` registers a new configure hook on every use and never removes
  it, so each measurement runs in a fresh subprocess (one per configuration, alternated, median
  over repeats) and never pollutes another.
* ``rate``: the store's sustained write rate; see ``write_rate.py``.

Run::

    python benchmarks/overhead.py            # everything, about 10 minutes on 2 cores
    python benchmarks/overhead.py --quick    # fewer rounds, for a smoke test
    python benchmarks/overhead.py --only calls
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _bench import median, ratio, table, us
from langchain_core.callbacks import (
    BaseCallbackHandler,
    UsageMetadataCallbackHandler,
    get_usage_metadata_callback,
)
from langchain_core.runnables import RunnableConfig

from langchain_tokenledger import Ledger, TokenLedgerHandler
from langchain_tokenledger.testing import FakeUsageChatModel

TARGET = 1.25
"""Most the handler may add per call, relative to what ``UsageMetadataCallbackHandler`` adds."""

CONFIGS = ("bare", "noop", "usage_callback", "tokenledger")
MAX_WEIGHT = 3
"""``invoke`` and ``stream`` run this many rounds per base round (see :attr:`Mode.weight`)."""
PROCESSES = 8
"""Fresh processes the per-call section runs in, one after the other (see the module's doc)."""


class NoOpHandler(BaseCallbackHandler):
    """A handler that does nothing: what LangChain's dispatch alone costs (the floor)."""

    run_inline = True

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        """Accept the event (the base class would raise and re-dispatch it to on_llm_start)."""


# -- the per-call section (issue #2) -------------------------------------------------------------


@dataclass
class Mode:
    """One way of calling the model: ``calls`` calls per timed block, sync or async."""

    name: str
    calls: int
    sync: Callable[[RunnableConfig | None, int], None] | None = None
    run_async: Callable[[RunnableConfig | None, int], Awaitable[None]] | None = None
    weight: int = 1
    """Rounds per base round (at most :data:`MAX_WEIGHT`): more where the ratio sits near the
    target, so its median settles; it is the cheapest blocks that need it."""


def modes(model: FakeUsageChatModel, scale: float) -> list[Mode]:
    """The call patterns of issue #2 (block sizes scaled by ``scale``)."""

    def invoke(config: RunnableConfig | None, n: int) -> None:
        for _ in range(n):
            model.invoke("hi", config=config)

    async def ainvoke(config: RunnableConfig | None, n: int) -> None:
        for _ in range(n):
            await model.ainvoke("hi", config=config)

    async def gather(config: RunnableConfig | None, n: int) -> None:
        await asyncio.gather(*(model.ainvoke("hi", config=config) for _ in range(n)))

    def stream(config: RunnableConfig | None, n: int) -> None:
        for _ in range(n):
            for _chunk in model.stream("hi", config=config):
                pass

    async def astream(config: RunnableConfig | None, n: int) -> None:
        for _ in range(n):
            async for _chunk in model.astream("hi", config=config):
                pass

    def size(n: int) -> int:
        return max(10, int(n * scale))

    return [
        Mode("`invoke`", size(2000), sync=invoke, weight=MAX_WEIGHT),
        Mode("`ainvoke`, sequential", size(800), run_async=ainvoke),
        Mode("`ainvoke`, 1,000 via `asyncio.gather`", 1000, run_async=gather),
        Mode("`stream`, 20 chunks", size(500), sync=stream, weight=MAX_WEIGHT),
        Mode("`astream`, 20 chunks", size(200), run_async=astream),
    ]


@dataclass
class Samples:
    """Seconds per call of each configuration, one value per round."""

    per_call: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CONFIGS})
    with_flush: list[float] = field(default_factory=list)
    backlog: list[int] = field(default_factory=list)


def added(with_handler: Sequence[float], bare: Sequence[float]) -> float:
    """The median over rounds of (time with a handler - time without it in the same round).

    Pairing each block with the bare block of its own round cancels the machine's slow drift,
    which medians taken over each configuration separately keep.
    """
    return median([w - b for w, b in zip(with_handler, bare, strict=True)])


def _calls_worker(rounds: int, scale: float) -> dict[str, Any]:
    """Runs in a fresh process: interleaved per-call timings of every mode (seconds per call,
    one value per round), as ``{mode name: Samples as a dict}``."""
    with tempfile.TemporaryDirectory(prefix="tokenledger-bench-") as tmp:
        samples = _time_calls(rounds, scale, Path(tmp))
    return {name: asdict(s) for name, s in samples.items()}


def configurations(ledger: Ledger) -> dict[str, RunnableConfig | None]:
    """The run config of each of :data:`CONFIGS` (the ledger's handler writes to ``ledger``)."""
    return {
        "bare": None,
        "noop": {"callbacks": [NoOpHandler()]},
        "usage_callback": {"callbacks": [UsageMetadataCallbackHandler()]},
        "tokenledger": {"callbacks": [TokenLedgerHandler(ledger)]},
    }


def _time_calls(rounds: int, scale: float, workdir: Path) -> dict[str, Samples]:
    model = FakeUsageChatModel()  # 20 chunks when streamed; native async
    ledger = Ledger(f"sqlite:///{workdir / 'overhead.db'}")
    configs = configurations(ledger)
    loop = asyncio.new_event_loop()
    all_modes = modes(model, scale)
    samples = {m.name: Samples() for m in all_modes}

    def run_block(mode: Mode, config: RunnableConfig | None, n: int) -> float:
        gc.collect()
        start = time.perf_counter()
        if mode.sync is not None:
            mode.sync(config, n)
        else:
            assert mode.run_async is not None
            loop.run_until_complete(mode.run_async(config, n))
        return time.perf_counter() - start

    for mode in all_modes:  # warm-up: imports, caches, the writer's first batches
        for name in CONFIGS:
            run_block(mode, configs[name], max(10, mode.calls // 10))
    ledger.flush()

    for r in range(rounds * MAX_WEIGHT):
        for mode in all_modes:
            if r % MAX_WEIGHT >= mode.weight:
                continue  # a mode of weight 1 runs every MAX_WEIGHT-th round, spread over the run
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            s = samples[mode.name]
            for name in order:
                elapsed = run_block(mode, configs[name], mode.calls)
                s.per_call[name].append(elapsed / mode.calls)
                if name == "tokenledger":
                    s.backlog.append(ledger.pending)
                    start = time.perf_counter()
                    ledger.flush()
                    s.with_flush.append((elapsed + time.perf_counter() - start) / mode.calls)
    loop.close()
    ledger.close()
    return samples


def measure_calls(processes: int, rounds: int, scale: float) -> tuple[list[list[str]], list[int]]:
    """Per-call timings of every mode from ``processes`` fresh processes, one after the other,
    each with its own hash seed; one table row per mode, and the seeds."""
    seeds = [random.randrange(2**32) for _ in range(processes)]
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        argv = [
            sys.executable,
            __file__,
            "--calls-worker",
            json.dumps({"rounds": rounds, "scale": scale}),
        ]
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        runs.append(json.loads(_worker_output(argv, env)))

    out = []
    for mode in modes(FakeUsageChatModel(), scale):
        per_process = [Samples(**run[mode.name]) for run in runs]
        s = Samples(
            per_call={c: [v for p in per_process for v in p.per_call[c]] for c in CONFIGS},
            with_flush=[v for p in per_process for v in p.with_flush],
            backlog=[v for p in per_process for v in p.backlog],
        )
        bare = median(s.per_call["bare"])
        noop = added(s.per_call["noop"], s.per_call["bare"])
        theirs = added(s.per_call["usage_callback"], s.per_call["bare"])
        ours = added(s.per_call["tokenledger"], s.per_call["bare"])
        ours_flushed = added(s.with_flush, s.per_call["bare"])
        verdict = "met" if ours <= TARGET * theirs else "NOT met"
        out.append(
            [
                mode.name,
                us(bare),
                plus_us(noop),
                plus_us(theirs),
                plus_us(ours),
                plus_us(ours_flushed),
                f"**{ratio(ours / theirs)}** ({verdict})",
                " ".join(ratio(process_ratio(p)) for p in per_process),
                str(len(s.per_call["bare"])),
                f"{median([float(b) for b in s.backlog]):.0f} / {mode.calls}",
            ]
        )
    return out, seeds


def _worker_output(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A worker subprocess's stdout; if it fails, an error that carries its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def plus_us(seconds: float) -> str:
    """An added time, signed, e.g. ``"+37 us"`` (a noisy run can measure less than nothing).

    Example:
        >>> plus_us(0.000037), plus_us(-0.000002)
        ('+37 us', '-2 us')
    """
    return f"{seconds * 1e6:+.0f} us"


def process_ratio(s: Samples) -> float:
    """One process's ratio: what ``TokenLedgerHandler`` adds over what
    ``UsageMetadataCallbackHandler`` adds.

    Example:
        >>> process_ratio(Samples(per_call={"bare": [1.0, 1.5], "noop": [1.5, 2.0],
        ...     "usage_callback": [3.0, 3.5], "tokenledger": [3.5, 4.0]}))
        1.25
    """
    theirs = added(s.per_call["usage_callback"], s.per_call["bare"])
    return added(s.per_call["tokenledger"], s.per_call["bare"]) / theirs


# -- the context-manager section (issue #3) ------------------------------------------------------


def _context_worker(kind: str, prior: int, rounds: int, calls: int) -> dict[str, float]:
    """Runs in a fresh process: ``prior`` uses of the context manager, then interleaved blocks
    of calls outside any block ("bare") and inside one ("inside"); seconds per call."""
    from langchain_tokenledger import track_usage

    model = FakeUsageChatModel()
    with tempfile.TemporaryDirectory(prefix="tokenledger-bench-") as tmp:
        ledger = Ledger(f"sqlite:///{Path(tmp) / 'cm.db'}")

        def block() -> Any:
            if kind == "ours":
                return track_usage(ledger)
            return get_usage_metadata_callback()

        for _ in range(prior):
            with block():
                pass
        for _ in range(50):  # warm-up
            model.invoke("hi")
            with block():
                model.invoke("hi")
        ledger.flush()  # the writer process is up before the first timed block
        bare: list[float] = []
        inside: list[float] = []
        for r in range(rounds):
            for which in ("bare", "inside") if r % 2 == 0 else ("inside", "bare"):
                gc.collect()
                if which == "bare":
                    start = time.perf_counter()
                    for _ in range(calls):
                        model.invoke("hi")
                    bare.append((time.perf_counter() - start) / calls)
                else:
                    with block() as usage:
                        start = time.perf_counter()
                        for _ in range(calls):
                            model.invoke("hi")
                        inside.append((time.perf_counter() - start) / calls)
                    _check_counted(kind, usage, calls)
        ledger.close()
    return {"bare": median(bare), "inside": median(inside)}


def _check_counted(kind: str, usage: Any, calls: int) -> None:
    """Both context managers must have seen every call of the block (else the timing lies)."""
    if kind == "ours":
        seen = usage.successful_requests
    else:
        seen = sum(u.get("total_tokens", 0) for u in usage.usage_metadata.values()) // 30
    assert seen == calls, f"{kind}: counted {seen} of {calls} calls"


def measure_context(repeats: int, rounds: int, calls: int, prior_uses: int) -> list[list[str]]:
    """Per-call cost inside each context manager, each figure from fresh subprocesses."""
    try:
        import langchain_tokenledger.context  # noqa: F401
    except ImportError:
        return []
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(repeats):
        for prior in (0, prior_uses):
            for kind in ("theirs", "ours"):
                argv = [
                    sys.executable,
                    __file__,
                    "--context-worker",
                    json.dumps({"kind": kind, "prior": prior, "rounds": rounds, "calls": calls}),
                ]
                results.setdefault((kind, prior), []).append(json.loads(_worker_output(argv)))

    def per_call(kind: str, prior: int, key: str) -> float:
        return median([r[key] for r in results[(kind, prior)]])

    def added(kind: str, prior: int) -> float:
        return median([r["inside"] - r["bare"] for r in results[(kind, prior)]])

    out = []
    base_ours = per_call("ours", 0, "inside")
    for prior in (0, prior_uses):
        theirs, ours = added("theirs", prior), added("ours", prior)
        drift = per_call("ours", prior, "inside") / base_ours
        out.append(
            [
                f"{prior:,}",
                us(per_call("theirs", prior, "bare")),
                us(per_call("theirs", prior, "inside")),
                us(per_call("ours", prior, "bare")),
                us(per_call("ours", prior, "inside")),
                f"{plus_us(theirs)} / {plus_us(ours)}",
                f"**{ratio(ours / theirs)}**" if prior == 0 else ratio(ours / theirs),
                ratio(drift),
            ]
        )
    return out


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Run the selected sections and print their markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("calls", "context", "rate"), action="append")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    parser.add_argument(
        "--processes", type=int, default=PROCESSES, help="processes of the per-call section"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per process of the per-call section"
    )
    parser.add_argument("--calls-worker", help=argparse.SUPPRESS)
    parser.add_argument("--context-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls_worker:
        print(json.dumps(_calls_worker(**json.loads(args.calls_worker))))
        return
    if args.context_worker:
        spec = json.loads(args.context_worker)
        print(json.dumps(_context_worker(**spec)))
        return

    sections = args.only or ["calls", "context", "rate"]
    rounds = 1 if args.quick else args.rounds
    processes = 2 if args.quick else args.processes
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
    if "calls" in sections:
        rows, seeds = measure_calls(processes, rounds, 0.25 if args.quick else 1.0)
        print(
            f"Per-call time ({processes} processes, hash seeds {', '.join(map(str, seeds))}; "
            f"{rounds} interleaved rounds in each, {rounds * MAX_WEIGHT} for `invoke` and "
            "`stream`; added = median over all rounds of (with handler - without, same "
            "round)):\n\n"
            + table(
                [
                    "call",
                    "no callbacks",
                    "a no-op handler adds",
                    "`UsageMetadataCallbackHandler` adds",
                    "`TokenLedgerHandler` adds",
                    "… incl. flush",
                    f"ratio (target <= x{TARGET})",
                    "ratio in each process",
                    "rounds",
                    "rows pending at block end",
                ],
                rows,
            )
            + "\n",
            flush=True,
        )
    if "context" in sections:
        rows = measure_context(
            repeats=1 if args.quick else 3,
            rounds=4 if args.quick else 10,
            calls=100 if args.quick else 300,
            prior_uses=10_000,
        )
        if rows:
            print(
                "Per-call time inside a context manager, after N prior uses of it (fresh "
                "process per figure; added = inside - outside the block, same process):\n\n"
                + table(
                    [
                        "prior uses",
                        "outside (theirs' process)",
                        "inside `get_usage_metadata_callback`",
                        "outside (ours' process)",
                        "inside `track_usage`",
                        "added: theirs / ours",
                        f"ratio (target <= x{TARGET} at 0)",
                        "ours vs ours at 0 (target: flat)",
                    ],
                    rows,
                )
                + "\n",
                flush=True,
            )
        else:
            print("(context section skipped: langchain_tokenledger.context not found)\n")
    if "rate" in sections:
        import write_rate

        write_rate.main(["--rounds", "1", "--records", "50000"] if args.quick else [])


if __name__ == "__main__":
    main()
