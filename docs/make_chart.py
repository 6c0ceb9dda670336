"""Regenerate docs/cost_by_model.png, the README's chart, from notebooks/quickstart.ipynb.

The chart is the quickstart's own "cost by model per day" figure: the notebook is executed top to
bottom in a scratch directory (offline, a fixed synthetic week, so the same chart every time)
and the PNG it saves is copied here. Run it with ``make chart``.

Example:
    $ python docs/make_chart.py
    wrote docs/cost_by_model.png
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
CHART = ROOT / "docs" / "cost_by_model.png"


def main() -> int:
    """Execute the quickstart and copy its cost chart into docs/."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory() as scratch:
        client = NotebookClient(
            notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": scratch}}
        )
        client.execute()
        shutil.copyfile(Path(scratch) / CHART.name, CHART)
    print(f"wrote {CHART.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
