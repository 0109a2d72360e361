"""The open core: a network from outside the package goes through every command unchanged, and
checkpoints from anyone are loaded safely (nothing in them can run code)."""

import json
import os
import sys
import textwrap

import pytest
import torch
from conftest import QUIET, cli, synthetic_digits
from omegaconf import OmegaConf
from PIL import Image

from mnist_lab import Classifier, load_config, to_unit
from mnist_lab.errors import ConfigError
from mnist_lab.predict import load_image
from mnist_lab.rundir import read_checkpoint

TINYNET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """(B, 1, 28, 28) -> logits (B, 10): 4x4 average pool, then one hidden layer."""

    def __init__(self, hidden: int = 16, num_classes: int = 10):
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.fc1 = nn.Linear(49, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.pool(x).flatten(1))))
'''


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """``tinynet.py`` (on PYTHONPATH) and ``conf/model/tinynet.yaml`` (for hydra.searchpath) in tmp_path."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "tinynet.py").write_text(textwrap.dedent(TINYNET))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tinynet.yaml").write_text("_target_: tinynet.TinyNet\nhidden: 16\n")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    return [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=tinynet"]


def test_a_net_from_outside_the_package_trains_resumes_evaluates_predicts_and_sweeps(outside, synthetic_root,
                                                                                     tmp_path, monkeypatch):
    run = tmp_path / "run"
    kill = [f"+callbacks.kill.{k}={v}" for k, v in
            (("_target_", "probes.SignalAt"), ("epoch", 1), ("batch", 5), ("signal", "SIGTERM"))]
    proc = cli("mnist_lab.train", *outside, *kill, "trainer.max_epochs=3", "optimizer.lr=0.01", f"hydra.run.dir={run}",
               *QUIET, data_root=synthetic_root)
    assert proc.returncode == 143, proc.stderr[-3000:]
    proc = cli("mnist_lab.train", f"resume={run}", data_root=synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3 and metrics["model"] == "TinyNet"
    assert metrics["params_trainable"] == (49 * 16 + 16) + (16 * 10 + 10)  # 970
    assert metrics["test/acc"] > 0.6 and "robustness/mean" in metrics  # it learned; the suite ran

    proc = cli("mnist_lab.evaluate", f"run_dir={run}", f"output_dir={tmp_path / 'eval'}", data_root=synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test/acc: {metrics['test/acc']:.4f}" in proc.stdout

    digits = tmp_path / "digits"
    digits.mkdir()
    for i, image in enumerate(synthetic_digits(5, seed=7)[0]):
        Image.fromarray(image).save(digits / f"{i}.png")
    proc = cli("mnist_lab.predict", f"ckpt_path={run / metrics['test_ckpt']}", f"inputs={digits}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line.split()[0].rsplit("/", 1)[-1]: int(line.split()[1]) for line in proc.stdout.splitlines()
               if ".png" in line}
    model = Classifier.load_from_checkpoint(run / metrics["test_ckpt"]).eval()
    with torch.no_grad():
        expected = model(to_unit(torch.stack([load_image(digits / f"{i}.png") for i in range(5)]))).argmax(1)
    assert printed == {f"{i}.png": int(c) for i, c in enumerate(expected)}

    sweep = tmp_path / "sweep"
    proc = cli("mnist_lab.train", "-m", *outside, "model.hidden=8,16", "trainer.max_epochs=1", "eval.full=false",
               f"hydra.sweep.dir={sweep}", *QUIET, data_root=synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (sweep / "summary.csv").read_text()
    assert ",490," in summary and ",970," in summary  # hidden 8 and 16: 392 + 8 + 80 + 10, and 970


def test_without_the_nets_module_a_checkpoint_says_what_is_missing(outside, synthetic_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    proc = cli("mnist_lab.train", *outside, "trainer.max_epochs=1", "eval.full=false", f"hydra.run.dir={run}", *QUIET,
               data_root=synthetic_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.undo()  # the nets' module leaves the path
    sys.modules.pop("tinynet", None)
    proc = cli("mnist_lab.evaluate", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", data_root=synthetic_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: model._target_=tinynet.TinyNet cannot be imported" in proc.stderr
    assert "put its module on PYTHONPATH" in proc.stderr


# ---------------------------------------------------------------- checkpoints from anyone
class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class SystemPayload:
    """Unpickling this calls ``os.system``: torch blocks its whole module (``posix``), with another message."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_every_refused_pickle_is_called_refused_and_the_code_named(tmp_path):
    for payload, code in ((Payload(tmp_path / "a"), "io.open"), (SystemPayload(tmp_path / "b"), "posix.system")):
        torch.save({"state_dict": {}, "hyper_parameters": payload}, tmp_path / "x.ckpt")
        with pytest.raises(ConfigError, match=rf"refused .*x.ckpt: loading it would call Python code \({code}\), so "
                                              "it was not loaded. It is a PyTorch checkpoint"):
            read_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def fake_run_dir(root, synthetic_root):
    """A run dir an interrupted run would leave, whose last.ckpt is ``checkpoints/last.ckpt``."""
    cfg = load_config(["model=fc", f"data.root={synthetic_root}", *QUIET])
    cfg.run_dir = str(root)
    (root / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, root / "config.yaml", resolve=True)
    (root / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    return root


@pytest.mark.parametrize("command", ["evaluate", "predict", "resume"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_never_runs(command, synthetic_root, tmp_path):
    marker = tmp_path / "payload_ran"
    run = fake_run_dir(tmp_path / "run", synthetic_root)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, ckpt)
    (tmp_path / "digit.png").write_bytes(b"")
    args = {"evaluate": ("mnist_lab.evaluate", [f"ckpt_path={ckpt}"]),
            "predict": ("mnist_lab.predict", [f"ckpt_path={ckpt}", f"inputs={tmp_path / 'digit.png'}"]),
            "resume": ("mnist_lab.train", [f"resume={run}"])}[command]
    proc = cli(args[0], *args[1], data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: refused {ckpt}: loading it would call Python code (io.open)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    # the payload is real: an unsafe load runs it
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_config_naming_other_code_is_refused(synthetic_root, tmp_path):
    """Weights-only loading stops pickles; the configs a checkpoint carries build only nn.Module,
    optimizer and scheduler classes, so a ``_target_`` cannot call anything else either."""
    marker = tmp_path / "popen_ran"
    net = {"_target_": "subprocess.Popen", "args": ["touch", str(marker)]}
    torch.save({"state_dict": {}, "hyper_parameters": {"net": net}, "datamodule_hyper_parameters": {}},
               tmp_path / "config_attack.ckpt")
    proc = cli("mnist_lab.evaluate", f"ckpt_path={tmp_path / 'config_attack.ckpt'}", data_root=synthetic_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: model._target_=subprocess.Popen is not a torch.nn.modules.module.Module class" in proc.stderr
    assert not marker.exists()
