"""The seven teaching notebooks: paired, in sync, and executed as notebooks.

Each notebook's source is a jupytext percent script ``notebooks/NN_*.py``, paired with a committed
``NN_*.ipynb`` (outputs stripped) that opens directly in Jupyter. The tests check that

- every pair agrees cell for cell (type, source, tags) — ``jupytext.read(py)`` against the .ipynb —
  and the .ipynb holds no outputs (``python notebooks/build.py`` rewrites the pairs);
- every .ipynb runs top to bottom in ONE kernel session (nbclient, as Jupyter would run it) with
  ``TPG_FAST=1`` within 60 s, draws at least one figure, and reaches its last assert. The notebooks'
  asserts tie the prose to tpg's exact numbers, so running them is the test: a contradicted
  statement raises AssertionError inside the kernel and fails here with the cell and traceback.

They run in a temporary working directory so that nothing they might write lands in the repository.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_trajectory_policy_gradient", "02_what_grpo_really_estimates", "03_baselines_and_variance",
         "04_ppo_gae_and_critics", "05_trepo_and_the_sampling_budget", "06_bring_your_own_estimator",
         "07_from_tables_to_a_transformer"]
FAST_LIMIT_S = 60.0


def _build():
    spec = importlib.util.spec_from_file_location("tpg_notebooks_build", ROOT / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


build = _build()


def test_seven_notebooks_exist_in_course_order():
    assert [p.stem for p in build.sources()] == NAMES
    assert sorted(p.stem for p in ROOT.glob("[0-9][0-9]_*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync(name):
    why = build.out_of_sync(ROOT / f"{name}.py")
    assert why is None, f"{why} — run: python notebooks/build.py"


def test_sync_check_detects_a_stale_pair(tmp_path):
    """The check is not vacuous: an edited source, or a pair with outputs, is reported."""
    import nbformat
    src = (ROOT / f"{NAMES[0]}.py").read_text()
    py = tmp_path / "01_x.py"
    py.write_text(src)
    build.write_pair(py)
    assert build.out_of_sync(py) is None
    py.write_text(src.replace("# %% [markdown]\n# ## 1.2", "# %% [markdown]\n# ## 1.2 (edited)", 1))
    assert "differs" in build.out_of_sync(py)
    py.write_text(src)
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="x")]
    nbformat.write(nb, py.with_suffix(".ipynb"))
    assert "outputs" in build.out_of_sync(py)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path):
    nb, took = build.execute(ROOT / f"{name}.ipynb", fast=True, cwd=tmp_path, timeout=300)
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.get("output_type") == "stream")
    assert "TPG_FAST=True" in text                                  # the notebook honoured the fast setting
    assert text.rstrip().endswith("passed.")                        # and reached its last assert
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no figure drawn"
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    thumb = [c for c in code if "thumbnail" in c.get("metadata", {}).get("tags", ())]
    assert len(thumb) == 1 and any("image/png" in o.get("data", {}) for o in thumb[0].outputs)
    assert took <= FAST_LIMIT_S, f"{name} took {took:.1f} s with TPG_FAST=1 (limit {FAST_LIMIT_S:.0f} s)"
