"""The writer process: rows priced and written outside the application, and nothing lost with it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import hide_table, restore_table, rows_by_run_id

from langchain_tokenledger import Ledger, LedgerError, TokenLedgerHandler, UsageRecord, ring, store
from langchain_tokenledger.packing import pack_record, unpack_record
from langchain_tokenledger.schema import llm_calls
from langchain_tokenledger.testing import FakeUsageChatModel
from langchain_tokenledger.writer_process import WriterProcess

T0 = datetime(2026, 11, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)


class Opaque:
    """A value only this process knows (the writer process could not unpickle it)."""

    def __str__(self) -> str:
        return "opaque!"


def records() -> list[UsageRecord]:
    """Records covering every kind of value a row can hold, odd ones included."""
    return [
        UsageRecord(
            run_id="r-plain",
            model="gpt-4o-mini",
            provider="openai",
            input_tokens=1200,
            output_tokens=300,
            total_tokens=1500,
            usage_details={"input_tokens": 1200, "output_tokens": 300, "total_tokens": 1500},
            started_at=T0,
            ended_at=T0 + timedelta(seconds=1, microseconds=1),
            latency_ms=1000.001,
            tags=["a", "b"],
            metadata={"user_id": "u1", "nested": {"k": [1, 2.5, None, True]}},
            notes=["x"],
        ),
        UsageRecord(
            run_id="r-priced",
            model="my-model",
            cost_usd=Decimal("0.000123456789"),
            price_source="override",
            started_at=datetime(2026, 11, 1, 13, 30, tzinfo=timezone(timedelta(hours=1))),
        ),
        UsageRecord(run_id="r-naive", started_at=datetime(2026, 11, 1, 12, 0, 0, 999999)),
        UsageRecord(run_id="r-opaque", metadata={"who": Opaque(), "n": 3}, tags=["t"]),
        UsageRecord(run_id="r-unknown-usage", model="gpt-4o-mini", usage_source="none"),
    ]


def test_records_travel_to_the_writer_process_unchanged() -> None:
    plain = [r for r in records() if r.run_id != "r-opaque"]
    assert [unpack_record(pack_record(r)) for r in plain] == plain


def test_a_value_the_process_cannot_hold_travels_as_its_json_text() -> None:
    [opaque] = [r for r in records() if r.run_id == "r-opaque"]
    received = unpack_record(pack_record(opaque))
    assert received.metadata == {"who": "opaque!", "n": 3}
    assert received.replace(metadata=opaque.metadata) == opaque


def test_the_default_ledger_writes_through_the_writer_process(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    process = WriterProcess.shared()
    assert process is not None
    assert ledger.writer == "process"
    assert process.process_id != os.getpid()
    ledger.record(
        UsageRecord(
            run_id="r1",
            model="gpt-4o-mini",
            provider="openai",
            input_tokens=1_000_000,
            output_tokens=0,
            total_tokens=1_000_000,
        )
    )
    ledger.flush()
    assert ledger.query("SELECT cost_usd, price_source FROM llm_calls") == [
        {"cost_usd": pytest.approx(0.15), "price_source": ledger.pricer.version}
    ]
    ledger.close()


def test_both_writers_write_the_same_rows(backend_url: str, tmp_path: Path) -> None:
    rows = {}
    for mode in ("process", "thread"):
        ledger = Ledger(backend_url, writer=mode, fallback_dir=tmp_path)
        assert ledger.writer == mode
        with ledger.engine.begin() as conn:
            conn.execute(llm_calls.delete())
        ledger.record_many(records())
        ledger.flush()
        rows[mode] = rows_by_run_id(ledger)
        ledger.close()
    assert len(rows["process"]) == len(records())
    assert rows["process"] == rows["thread"]


def test_price_overrides_apply_in_the_writer_process(tmp_path: Path) -> None:
    prices = {"my-model": {"input": "2", "output": "8"}}
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", prices=prices)
    assert ledger.writer == "process"
    ledger.record(UsageRecord(run_id="r1", model="my-model", input_tokens=1000, output_tokens=500))
    ledger.flush()
    assert ledger.query("SELECT price_source FROM llm_calls") == [{"price_source": "override"}]
    assert ledger.summary()[0].cost_usd == Decimal("0.006")
    ledger.close()


def test_engine_kwargs_keep_the_writer_in_this_process(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", engine_kwargs={"echo": False})
    assert ledger.writer == "thread"
    ledger.close()


def test_the_writer_is_chosen_by_argument_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENLEDGER_WRITER", "thread")
    ledger = Ledger(f"sqlite:///{tmp_path / 'a.db'}")
    assert ledger.writer == "thread"
    ledger.close()
    ledger = Ledger(f"sqlite:///{tmp_path / 'b.db'}", writer="process")
    assert ledger.writer == "process"
    ledger.close()
    monkeypatch.setenv("TOKENLEDGER_WRITER", "fork")
    with pytest.raises(ValueError, match="writer must be 'process' or 'thread', not 'fork'"):
        Ledger(f"sqlite:///{tmp_path / 'c.db'}")


@pytest.fixture(params=["ring", "pipe"])
def channel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How records reach the writer process: its shared-memory ring, or the pipe alone."""
    if request.param == "ring" and not ring.available():
        pytest.skip("rings need Linux on x86-64")
    if request.param == "pipe":
        monkeypatch.setattr(store, "_new_ring", lambda: None)
    return str(request.param)


def test_records_the_writer_process_had_are_written_here_when_it_dies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, channel: str
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url, fallback_dir=tmp_path)
    process = WriterProcess.shared()
    assert process is not None and ledger.writer == "process"
    hide_table(url)  # the writer process receives the records but cannot write them
    ledger.record_many([UsageRecord(run_id=f"r{i}", total_tokens=i) for i in range(300)])
    deadline = time.monotonic() + 30
    while ledger._ring_put + len(ledger._unacked) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (ledger._ring_put, len(ledger._unacked)) == ((300, 0) if channel == "ring" else (0, 300))

    os.kill(process.process_id, signal.SIGKILL)
    restore_table(url)
    with caplog.at_level(logging.WARNING, logger="langchain_tokenledger"):
        ledger.flush(timeout=60)

    assert ledger.writer == "thread"
    assert ledger.query("SELECT COUNT(*) AS n, SUM(total_tokens) AS s FROM llm_calls") == [
        {"n": 300, "s": sum(range(300))}
    ]
    assert any("300 records taken back" in r.getMessage() for r in caplog.records)
    ledger.close()
    assert not list(tmp_path.glob("tokenledger-unwritten-*"))
    # The next ledger gets a new writer process.
    after = Ledger(f"sqlite:///{tmp_path / 'after.db'}")
    assert after.writer == "process"
    assert WriterProcess.shared() is not process
    after.close()


def test_records_the_ring_has_no_room_for_go_through_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not ring.available():
        pytest.skip("rings need Linux on x86-64")
    monkeypatch.setattr(ring, "DEFAULT_SIZE", 4096)  # room for about 16 calls
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    handler = TokenLedgerHandler(ledger)
    model = FakeUsageChatModel()
    model.invoke("warm-up", config={"callbacks": [handler]})
    ledger.flush()
    assert ledger._ring is not None
    for i in range(500):
        # every tenth call is bigger than the whole ring
        metadata = {"user_id": f"u{i % 7}", "blob": "x" * (5000 if i % 10 == 0 else 10)}
        model.invoke("hi", config={"callbacks": [handler], "metadata": metadata})
    ledger.flush()

    assert ledger.pending == 0
    # Both ways were taken, and every call was confirmed once.
    assert ledger._ring_acked >= 10 and ledger._pipe_acked >= 50
    assert ledger._ring_acked + ledger._pipe_acked == 501
    assert ledger.query(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT run_id) AS runs, SUM(total_tokens) AS tokens,"
        " SUM(LENGTH(metadata) > 5000) AS big FROM llm_calls"
    ) == [{"n": 501, "runs": 501, "tokens": 501 * 30, "big": 50}]
    ledger.close()


def test_a_ring_the_writer_process_cannot_open_leaves_the_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not ring.available():
        pytest.skip("rings need Linux on x86-64")

    class Unreachable(ring.Ring):
        path = str(tmp_path / "no-such-ring")  # as in a sandbox without /proc/<pid>/fd

    monkeypatch.setattr(store, "_new_ring", Unreachable.create)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    with caplog.at_level(logging.INFO, logger="langchain_tokenledger"):
        ledger.record_many([UsageRecord(run_id=f"r{i}", total_tokens=i) for i in range(50)])
        ledger.flush()  # the first batch opens the ledger in the writer process
        for i in range(50, 100):
            ledger.record(UsageRecord(run_id=f"r{i}", total_tokens=i))
        ledger.flush()

    assert ledger.writer == "process" and ledger._ring is None
    assert (ledger._ring_acked, ledger._pipe_acked) == (0, 100)
    assert ledger.query("SELECT COUNT(*) AS n, SUM(total_tokens) AS s FROM llm_calls") == [
        {"n": 100, "s": sum(range(100))}
    ]
    assert any("no shared-memory ring" in r.getMessage() for r in caplog.records)
    ledger.close()


def test_calls_in_the_ring_are_written_when_the_application_dies(tmp_path: Path) -> None:
    if not ring.available():
        pytest.skip("rings need Linux on x86-64")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    script = (
        "import os\n"
        "from langchain_tokenledger import Ledger, TokenLedgerHandler\n"
        "from langchain_tokenledger.testing import FakeUsageChatModel\n"
        f"ledger = Ledger({url!r})\n"
        "handler = TokenLedgerHandler(ledger)\n"
        "model = FakeUsageChatModel()\n"
        "model.invoke('first', config={'callbacks': [handler]})\n"
        "ledger.flush()\n"
        "assert ledger._ring is not None\n"
        "for _ in range(200):\n"
        "    model.invoke('hi', config={'callbacks': [handler]})\n"
        "os._exit(0)  # no flush, no close, no atexit: the calls are only in the ring\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)

    reader = Ledger(url, writer="thread")
    deadline = time.monotonic() + 30
    query = "SELECT COUNT(*) AS n, SUM(total_tokens) AS tokens FROM llm_calls"
    while reader.query(query)[0]["n"] < 201 and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphaned writer process drains the ring, then exits
    assert reader.query(query) == [{"n": 201, "tokens": 201 * 30}]
    reader.close()


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # a multi-threaded process
def test_a_forked_child_does_not_write_into_its_parents_ring(tmp_path: Path) -> None:
    if not ring.available():
        pytest.skip("rings need Linux on x86-64")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.record(UsageRecord(run_id="r0"))
    ledger.flush()
    assert ledger._ring is not None
    child = os.fork()
    if child == 0:  # the child's calls go to its own queue, never into the parent's ring
        os._exit(0 if ledger._ring is None else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ledger._ring is not None
    ledger.close()


def test_the_writer_process_logs_through_this_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url, fallback_dir=tmp_path)
    hide_table(url)
    ledger.record(UsageRecord(run_id="r1"))
    failed = f"{ledger!r}: writing 1 rows failed (attempt 1), retrying: OperationalError"
    with caplog.at_level(logging.WARNING, logger="langchain_tokenledger"):
        deadline = time.monotonic() + 30
        while not any(r.getMessage().startswith(failed) for r in caplog.records):
            assert time.monotonic() < deadline, "the writer process's warning never arrived"
            time.sleep(0.01)
        with pytest.raises(LedgerError, match=r"1 records not written after 0\.1s.*no such table"):
            ledger.flush(timeout=0.1)
        restore_table(url)
        ledger.flush()
    assert any("recovered" in r.getMessage() for r in caplog.records)
    assert ledger.query("SELECT run_id FROM llm_calls") == [{"run_id": "r1"}]
    ledger.close()
