"""The Colab notebooks in colabs/: committed clean, and executed headlessly in smoke mode.

Each notebook has one cell tagged `parameters` (papermill's convention) that sets `smoke = False`
for Colab users. Here, as papermill would, a cell setting `smoke = True` is inserted after it, and the
notebook runs in a fresh IPython kernel (nbclient) from colabs/, with matplotlib's Agg backend and one
CPU device. Any exception, including a notebook's own `assert` on its results, fails the test; so
does running past NOTEBOOK_TIMEOUT_S seconds (whole notebook). The executed copies are written to the
test's tmp folder for inspection.
"""

import json
import os
import pathlib
import re
import time

import pytest

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
EXPECTED = {"feature_visualization", "import_and_export_weights", "linear_probe_and_knn", "pretrain_quickstart",
            "dense_prediction_and_dinov3"}
# Whole-notebook limit. Each takes well under a minute on 2 CPU cores; the margin is for loaded machines.
TIMEOUT_S = int(os.environ.get("NOTEBOOK_TIMEOUT_S", "240"))


def _load(path: pathlib.Path) -> dict:
  return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
  src = cell.get("source", "")
  return "".join(src) if isinstance(src, list) else src


def _parameter_cells(nb: dict) -> list[dict]:
  return [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]


def test_every_notebook_is_here():
  assert {p.stem for p in NOTEBOOKS} == EXPECTED
  readme = (COLABS / "README.md").read_text(encoding="utf-8")
  top_readme = (COLABS.parent / "README.md").read_text(encoding="utf-8")
  for name in EXPECTED:
    assert f"]({name}.ipynb)" in readme, f"colabs/README.md does not link {name}.ipynb"
    assert f"](colabs/{name}.ipynb)" in top_readme, f"README.md does not link colabs/{name}.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nbformat = pytest.importorskip("nbformat")
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


PACKAGE_LINE = re.compile(r'^PACKAGE = "[^"]+"$', re.M)
REPOSITORY_URL = "github.com/<org>/dinov2-jax"  # unpublished: it may appear in the PACKAGE line only


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_and_one_parameters_cell(path):
  nb = _load(path)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  install = _source(code[0])
  assert "../pyproject.toml" in install and "pip" in install and "subprocess.check_call(pip + [PACKAGE])" in install, \
      f"{path.name}: the first code cell must be the install cell, installing PACKAGE"
  assert 'find_spec("dinov2_jax") is None' in install, f"{path.name}: pip must only run when the package is missing"
  params = _parameter_cells(nb)
  assert len(params) == 1, f"{path.name}: {len(params)} cells tagged 'parameters', expected exactly one"
  assert params[0]["cell_type"] == "code"
  assert re.search(r"^smoke = False\b", _source(params[0]), re.M), \
      f"{path.name}: the parameters cell must set `smoke = False` (the Colab default)"


def test_package_is_named_in_one_line_and_the_repository_url_nowhere_else():
  lines = {PACKAGE_LINE.search(_source([c for c in _load(p)["cells"] if c["cell_type"] == "code"][0])).group(0)
           for p in NOTEBOOKS}
  assert len(lines) == 1, f"the notebooks install different packages: {lines}"
  repo = COLABS.parent
  texts = list(NOTEBOOKS) + [repo / "README.md", COLABS / "README.md", repo / "pyproject.toml"]
  for path in texts:
    text = path.read_text(encoding="utf-8")
    expected = 1 if path.suffix == ".ipynb" else 0
    assert text.count(REPOSITORY_URL) == expected, f"{path.name} names the unpublished repository URL outside PACKAGE"


def _kernel_env(tmp_dir: pathlib.Path) -> dict:
  # TMPDIR: what a notebook writes in smoke mode (tempfile folders) goes to the test's tmp folder.
  env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", TMPDIR=str(tmp_dir))
  # The kernel imports this checkout's dinov2_jax, whatever else is installed.
  env["PYTHONPATH"] = os.pathsep.join([str(COLABS.parent)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  # conftest.py gives the test process 8 fake CPU devices; the notebooks run faster on one.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")

  nb = nbformat.read(path, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  injected = nbformat.v4.new_code_cell("# Parameters injected by tests/test_notebooks.py\nsmoke = True")
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, injected)

  deadline = time.monotonic() + TIMEOUT_S
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=TIMEOUT_S,
      # Every cell gets what is left of the notebook's budget: a whole-notebook timeout.
      timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
      resources={"metadata": {"path": str(COLABS)}})
  (tmp_path / "tmp").mkdir()
  start = time.monotonic()
  try:
    client.execute(env=_kernel_env(tmp_path / "tmp"))
  finally:
    nbformat.write(nb, tmp_path / path.name)
  elapsed = time.monotonic() - start
  print(f"{path.name}: executed in smoke mode in {elapsed:.1f}s")
  assert elapsed < TIMEOUT_S
