"""What must not change across versions: a checkpoint written by mnist_lab 0.2.0 or 0.3.0 loads and gives
the figures that version recorded, in every command and in ``load_from_checkpoint``;
the package installs from a wheel with its configs."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli, write_synthetic_mnist
from PIL import Image

import mnist_lab
from mnist_lab import Classifier, MNISTDataModule, evaluate_model
from mnist_lab.evaluate import predict

# depthwise_3k, 2 epochs on write_synthetic_mnist's data, by mnist_lab 0.2.0 and by 0.3.0 (a433b90)
VERSIONS = sorted((REPO / "tests" / "data").glob("v*"))


@pytest.fixture(scope="module", params=VERSIONS, ids=[v.name for v in VERSIONS])
def old(request, tmp_path_factory):
    """An older version's checkpoint, the metrics.json its run wrote, and the synthetic data it was trained on."""
    root = write_synthetic_mnist(tmp_path_factory.mktemp("data"))
    return request.param / "depthwise_3k.ckpt", json.loads((request.param / "metrics.json").read_text()), root


def test_an_older_checkpoint_gives_the_figures_its_version_recorded(old):
    ckpt, recorded, root = old
    model = Classifier.load_from_checkpoint(ckpt)
    dm = MNISTDataModule.load_from_checkpoint(ckpt, root=str(root))
    result = evaluate_model(model, dm)  # Trainer.test with the evaluation suite, seed 0 as in the old run
    assert 0.15 < recorded["test/acc"] < 0.95  # undertrained: another model would not match by chance
    for key in ("test/acc", "test/loss", "test/f1_macro", "test/ece", "test/nll_scaled"):
        assert result[key] == pytest.approx(recorded[key], abs=1e-5), key
    assert result["robustness/mean"] == pytest.approx(recorded["robustness/mean"], abs=1e-6)
    assert result["n_test"] == recorded["n_test"] == 100


def test_an_older_checkpoint_works_in_every_command(old, tmp_path):
    ckpt, recorded, root = old
    def run(*args):  # the console script's function (mnist-lab COMMAND ...), in this process
        proc = cli("mnist_lab.cli", *args, data_root=root, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    out = run("evaluate", f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'eval'}", f"data_root={root}")
    assert f"test/acc: {recorded['test/acc']:.4f}" in out
    image = (torch.rand(28, 28) * 40).to(torch.uint8)
    image[8:20, 12:16] = 255
    Image.fromarray(image.numpy()).save(tmp_path / "digit.png")
    out = run("predict", f"ckpt_path={ckpt}", f"inputs={tmp_path / 'digit.png'}")
    assert "digit.png" in out and "error" not in out
    out = run("export", f"ckpt_path={ckpt}", "format=pt2", f"output={tmp_path / 'model.pt2'}")
    assert float(out.split("max |logits - PyTorch| = ")[1].split()[0]) < 1e-4


def test_the_replacements_of_the_names_removed_in_0_4_load_an_older_checkpoint_with_its_accuracy(old):
    """0.3 deprecated load_checkpoint, predict_logits and evaluate_robustness, to be removed in 0.4 (CHANGELOG)."""
    ckpt, recorded, root = old
    for name in ("load_checkpoint", "predict_logits", "evaluate_robustness"):
        assert not hasattr(mnist_lab, name)
    model = Classifier.load_from_checkpoint(ckpt, map_location="cpu")
    dm = MNISTDataModule.load_from_checkpoint(ckpt, root=str(root))
    dm.setup()
    x, y = dm.splits["test"]
    logits = predict(model, x)
    assert float((logits.argmax(1) == y).float().mean()) == pytest.approx(recorded["test/acc"], abs=1e-6)


def test_the_wheel_ships_the_configs_and_they_load_from_the_installed_package(tmp_path):
    """pip builds the wheel (offline, with the hatchling of the dev extras) and installs it into a folder
    of its own; an isolated Python (-I: no PYTHONPATH, no current dir) finds the configs in it."""
    pytest.importorskip("hatchling")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("mnist_lab-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); import runpy, mnist_lab.config as c; "
            "print(c.CONF_DIR); print(c.load_config(['+experiment=tiny']).model.name); "
            "sys.argv = ['mnist-lab train', '--cfg', 'job', 'model=resnet_20k']; "
            "runpy.run_module('mnist_lab.train', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    conf_dir, preset, *job = proc.stdout.splitlines()
    assert conf_dir == str(target / "mnist_lab" / "conf") and preset == "depthwise_5k"
    assert "name: resnet_20k" in "\n".join(job)  # the train command composed its config from the wheel
    shipped = {p.relative_to(target / "mnist_lab" / "conf") for p in (target / "mnist_lab" / "conf").rglob("*.yaml")}
    assert shipped == {p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml")}
