"""The notebooks run top to bottom on a fresh clone (a few batches of synthetic data, MNIST_LAB_QUICK=1),
through scripts/run_notebooks.py, and show what each promises."""

import sys

import pytest
from conftest import QUIET, REPO, cli

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
sys.path.insert(0, str(REPO / "scripts"))
from run_notebooks import NOTEBOOKS, execute  # noqa: E402


def outputs(nb, mime: str) -> list[str]:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if mime in o.get("data", {})]


@pytest.fixture
def quick(monkeypatch, synthetic_root, tmp_path):
    monkeypatch.setenv("MNIST_LAB_QUICK", "1")
    monkeypatch.setenv("MNIST_LAB_DATA", str(synthetic_root))
    monkeypatch.setenv("MNIST_LAB_OUTPUTS", str(tmp_path / "outputs"))
    return tmp_path


def test_the_three_notebooks_are_committed_without_outputs():
    import nbformat

    assert [p.stem for p in NOTEBOOKS] == ["01_baseline", "02_improved", "03_results_analysis"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")


def test_baseline_notebook_lists_the_presets_trains_and_shows_curves_and_mistakes(quick):
    nb = execute(REPO / "notebooks" / "01_baseline.ipynb", quick / "01.ipynb")
    presets, pairs = outputs(nb, "text/markdown")
    assert "| depthwise_5k | DepthwiseNet | 4,514 |" in presets and "| conv2 | ConvNet | 225,034 |" in presets
    assert "| convnet |" not in presets  # the family defaults are not presets
    assert pairs.startswith("| true | predicted as |")
    assert len(outputs(nb, "image/png")) == 3  # curves, errors, confusion matrix
    assert len(list((quick / "outputs" / "notebooks" / "01_baseline").glob("*/metrics.json"))) == 1


def test_improved_notebook_compares_four_runs_and_their_robustness(quick):
    nb = execute(REPO / "notebooks" / "02_improved.ipynb", quick / "02.ipynb")
    (table,) = outputs(nb, "text/markdown")
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    assert rows == ["conv2", "conv2_bn", "conv2 +aug", "conv2_bn +aug"]
    assert "| conv2_bn | 225,482 |" in table
    assert len(outputs(nb, "image/png")) == 4  # robustness side by side, val curves, two runs' dynamics.png
    assert len(list((quick / "outputs" / "notebooks" / "02_improved").glob("*/dynamics.png"))) == 4


def test_results_notebook_reads_the_committed_frontier_and_a_sweep(quick, synthetic_root, monkeypatch):
    sweep = quick / "sweep"
    args = ["-m", "model.depth=1,2", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "eval.full=false",
            "plots=false", *QUIET, f"hydra.sweep.dir={sweep}"]
    proc = cli("mnist_lab.train", *args, data_root=synthetic_root, cwd=quick)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.setenv("MNIST_LAB_SWEEP", str(sweep))
    nb = execute(REPO / "notebooks" / "03_results_analysis.ipynb", quick / "03.ipynb")
    frontier, jobs, configurations = outputs(nb, "text/markdown")
    # docs/frontier_summary.csv, 3 seeds of resnet_270k: 0.9960 ± 0.0008 (docs/sweeps.md), on the front
    assert "| resnet_270k | ResNet | 271,994 | 3 | 0.9960 ± 0.0008 | 0.40 % | yes |" in frontier
    assert "| vit_300k | ViT | 306,826 | 3 | 0.9794 ± 0.0021 | 2.06 % |  |" in frontier
    assert jobs.count("| 00") == 2 and configurations.count("| depth=") == 2  # job dirs 000_depth=1..., 001_...
    assert len(outputs(nb, "image/png")) == 2  # error vs params, val curves
