"""The notebooks run top to bottom on this CPU with the tiny model, and are stored without outputs."""

import pathlib

import pytest

import nbformat
import nbclient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_shipped_notebooks_are_here():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "sharding_strategies.ipynb", "flowedit.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu_with_the_tiny_model(path, monkeypatch, tmp_path):
    # The kernel inherits this environment: tiny sizes, CPU, no hub access, no persistent cache.
    for key, value in {"FLUXJAX_NOTEBOOK_TINY": "1", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
                       "FLUXJAX_COMPILATION_CACHE": "off", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    # An error in any cell raises CellExecutionError and fails the test.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
