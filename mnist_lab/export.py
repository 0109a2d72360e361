"""``python -m mnist_lab.export ckpt_path=PATH [format=onnx|torchscript|pt2] [output=FILE]``: a trained
model for use without mnist_lab, checked against PyTorch with its own runtime after writing.

ONNX needs ``pip install -e ".[export]"`` (onnx, onnxscript, onnxruntime). TorchScript is deprecated in
PyTorch; ``pt2`` (``torch.export.save``) is its successor for Python consumers.
"""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from mnist_lab.console import command
from mnist_lab.errors import ConfigError, check_choice
from mnist_lab.module import Classifier
from mnist_lab.rundir import given_checkpoints

#: format -> file suffix
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
#: format -> the packages it needs beyond torch
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "torchscript": (), "pt2": ()}


def _batch_dim() -> dict:
    return {"x": {0: torch.export.Dim("batch", min=1, max=65536)}}


def export_model(model: Classifier, path: str | Path, format: str = "onnx") -> Path:
    """Write ``model`` (moved to the CPU, eval mode) to ``path`` in ``format``; returns the path. The file
    maps float32 images in [0, 1] ``(B, 1, 28, 28)``, any ``B``, to float32 logits ``(B, num_classes)``
    (normalisation inside).

    Raises:
        ConfigError: an unknown format, or a package the format needs is not installed.
    """
    check_choice("format", format, FORMATS)
    missing = [p for p in NEEDS[format] if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"format={format} needs {', '.join(missing)}: pip install -e \".[export]\"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    sample = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        if format == "onnx":
            torch.onnx.export(model, (sample,), str(path), input_names=["images"], output_names=["logits"],
                              dynamic_shapes=_batch_dim(), dynamo=True, external_data=False, verbose=False)
        elif format == "torchscript":  # Lightning's tracer keeps LightningModule's trainer properties out
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*(TorchScript|torch.jit|to_torchscript).*deprecated.*")
                warnings.filterwarnings("ignore", message=".*deprecated.*(TorchScript|torch.jit|to_torchscript).*")
                model.to_torchscript(str(path), method="trace", example_inputs=sample)
        else:
            torch.export.save(torch.export.export(model, (sample,), dynamic_shapes=_batch_dim()), str(path))
    return path


def run_exported(path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Run an exported file on float32 images ``(B, 1, 28, 28)`` in [0, 1] with its own runtime; returns
    the logits ``(B, num_classes)`` as a CPU tensor. The format is read from the file's suffix.

    Meant for files this command wrote (its check, notebooks), not for untrusted ones: a TorchScript
    file carries its own program (``torch.jit.load`` is no safe loader) and a torch.export file its own
    graph, both run as they are."""
    path, images = Path(path), images.detach().cpu().float()
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(np.asarray(session.run(["logits"], {"images": images.numpy()})[0]))
    with torch.no_grad():
        if path.name.endswith(".torchscript.pt"):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
                return torch.jit.load(str(path))(images)
        return torch.export.load(str(path)).module()(images)


@command("export")
def main(cfg: DictConfig) -> None:
    """``python -m mnist_lab.export ckpt_path=PATH | run_dir=PATH [format=onnx] [output=FILE]``."""
    ckpts = given_checkpoints(cfg.ckpt_path, cfg.run_dir)
    if len(ckpts) > 1:
        raise ConfigError("export writes one model: give one ckpt_path or run_dir, not a list")
    model = Classifier.load_from_checkpoint(ckpts[0], map_location="cpu")
    path = export_model(model, cfg.output or ckpts[0].with_suffix(FORMATS.get(cfg.format, "")), cfg.format)
    images = torch.rand(cfg.check_images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (run_exported(path, images) - model(images)).abs().max().item()
    print(f"exported: {path} ({cfg.format}, {path.stat().st_size / 1e3:.0f} kB): float32 images (B, 1, 28, 28) "
          f"in [0, 1] -> logits (B, {model.hparams.num_classes})")
    print(f"check: max |logits - PyTorch| = {diff:.1e} on {cfg.check_images} random images")


if __name__ == "__main__":
    main()
