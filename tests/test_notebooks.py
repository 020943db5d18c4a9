"""The notebooks in notebooks/ run top to bottom (on small samples)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


# the facility notebook starts a dask cluster and compiles every shape again in its workers:
# over a minute and a half on 2 cores, so it runs with the slow tests
@pytest.mark.parametrize("name", [pytest.param(p.name, marks=[pytest.mark.slow] if p.name == "facility.ipynb" else [])
                                  for p in sorted(NOTEBOOKS.glob("*.ipynb"))])
def test_notebook_executes(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("JACANA_NOTEBOOK_EVENTS", "20000")
    monkeypatch.setenv("JACANA_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("JACANA_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("JACANA_NOTEBOOK_WORKERS", "1")
    # no impact plot: its refits took about 40 % of the quickstart's time; run_optimize's impact plot
    # is checked by test_optimize.py::test_outputs (the same make_plots)
    monkeypatch.setenv("JACANA_NOTEBOOK_IMPACTS", "0")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "jacana.evaluate" in sources or "jacana.optimize" in sources  # the notebooks show the Python API
    if name == "facility.ipynb":  # the dask dashboard's link is printed for the reader to open
        text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
        assert "dashboard" in text.lower() and "http" in text
