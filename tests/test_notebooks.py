"""Every notebook in examples/ executes from top to bottom, and is committed without outputs.

Each notebook runs in a fresh ``python3`` kernel (the ipykernel of the interpreter running the
tests) with a temporary working directory, so whatever it writes stays out of the repository, and
with the non-interactive ``Agg`` matplotlib backend. A cell that raises fails the test with the
cell's traceback.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
# Per cell; every notebook is meant to finish in well under a minute on two CPU cores.
CELL_TIMEOUT_S = 300


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # The kernel inherits this process's environment.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One torch thread per kernel: `make test` runs two xdist workers on two cores (as conftest.py
    # does for the test processes themselves).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n{path.name}: executed in {elapsed:.1f} s", end="")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} carry outputs; clear them before committing "
        "(your editor's 'Clear All Outputs')"
    )
