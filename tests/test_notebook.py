"""The Colab notebook runs top to bottom on CPU, with a tiny step count."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from coe_jax import run_dir
from tests.tiny import REPO

# End to end and minutes long: `make test-all` runs them, `make test` does not.
pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(REPO, "notebooks", "coe_colab.ipynb")
FIGURES = (run_dir.ACCURACY_VS_FLOPS_PLOT, run_dir.CURVE_PLOT, run_dir.EXPERT_LOAD_PLOT,
           run_dir.ROUTING_GRID_PLOT, run_dir.CLASS_BY_EXPERT_PLOT)


def _text(cell) -> str:
  return "".join(out.get("text", "") for out in cell.get("outputs", []))


def test_notebook_runs_on_cpu_with_few_steps(tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  parameters = [
      i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
  ]
  assert len(parameters) == 1
  workdir = str(tmp_path / "run")
  # Injected after the parameter cell, as papermill does.
  notebook.cells.insert(
      parameters[0] + 1,
      nbformat.v4.new_code_cell(f"NUM_STEPS = 6\nNUM_EXPERTS = 2\nWORKDIR = {workdir!r}"))
  # The kernel inherits this environment: one CPU device (not the suite's 8 fake
  # ones), and quick compilation for programs that run a few steps.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  NotebookClient(notebook,
                 timeout=600,
                 kernel_name="python3",
                 resources={
                     "metadata": {
                         "path": str(tmp_path)
                     }
                 }).execute()

  for name in FIGURES:
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  outputs = "\n".join(_text(cell) for cell in notebook.cells)
  assert "CoE results" in outputs
  assert "a training batch: (64, 16, 16, 3) uint8" in outputs
  shown = sum(
      out.get("output_type") == "display_data"
      for cell in notebook.cells
      for out in cell.get("outputs", []))
  assert shown >= len(FIGURES) + 2  # The figures, the loss curve and the predictions.
