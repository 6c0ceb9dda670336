"""The notebooks run top to bottom (so they never rot) and are committed without outputs.

Each notebook is executed with nbclient on the ``python3`` kernel in a scratch directory; the
ledger it leaves there is then checked call by call. Their traffic is deterministic (the local
OpenAI-compatible server bills by rule, the synthetic week is seeded and fixed in time).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from langchain_tokenledger import Ledger

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PNG = b"\x89PNG\r\n\x1a\n"

WEEK = {  # the synthetic week both notebooks record (tag "simulated")
    "calls": 143, "errors": 6, "cache_hits": 42, "input_tokens": 65154, "output_tokens": 11072,
    "total_tokens": 76226, "cache_read_tokens": 0, "reasoning_tokens": 1562,
    "cost_usd": Decimal("0.1410298"),
}  # fmt: skip


def execute(name: str, where: Path) -> Any:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": where}}
    )
    client.execute()
    return notebook


def images(notebook: Any) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def totals(ledger: Ledger, tag: str) -> dict[str, Any]:
    (row,) = ledger.summary(by=(), tags=[tag])
    return row.measures()


@pytest.mark.parametrize("name", ["quickstart", "cost_analysis"])
def test_notebooks_are_committed_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [(cell.outputs, cell.execution_count) for cell in code] == [([], None)] * len(code)
    assert notebook.metadata.kernelspec.name == "python3"


def test_quickstart_runs_end_to_end(tmp_path: Path) -> None:
    notebook = execute("quickstart", tmp_path)
    assert images(notebook) == 2
    assert (tmp_path / "cost_by_model.png").read_bytes()[:8] == PNG
    with Ledger(f"sqlite:///{tmp_path / 'quickstart.db'}") as ledger:
        assert totals(ledger, "quickstart") == {
            "calls": 8, "errors": 0, "cache_hits": 0, "input_tokens": 136, "output_tokens": 46,
            "total_tokens": 182, "cache_read_tokens": 0, "reasoning_tokens": 0,
            "cost_usd": Decimal("0.00014435"),
        }  # fmt: skip
        assert totals(ledger, "simulated") == WEEK
        by_user = ledger.summary(by="user_id", tags=["quickstart"])
        assert [(r["user_id"], r.calls) for r in by_user] == [
            ("bob", 3), ("alice", 2), ("dave", 2), ("carol", 1),
        ]  # fmt: skip


def test_cost_analysis_runs_end_to_end(tmp_path: Path) -> None:
    execute("cost_analysis", tmp_path)
    with Ledger(f"sqlite:///{tmp_path / 'cost_analysis.db'}") as ledger:
        assert totals(ledger, "simulated") == WEEK
        assert [(r["status"], r.calls) for r in ledger.summary(by="status")] == [
            ("ok", 137),
            ("error", 6),
        ]
