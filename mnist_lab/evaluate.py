"""Evaluation suite: robustness, calibration and error analysis of a trained classifier.

``python -m mnist_lab.evaluate ckpt_path=PATH`` (or ``run_dir=PATH``) rebuilds the model and the
datamodule from the checkpoint (no model or data config to repeat) and writes into the run dir
(or ``output_dir=``):

- ``evaluation.json``: clean test accuracy and loss, ECE and NLL (before and after temperature
  scaling), per-class precision / recall / F1, the most-confused class pairs, and the robustness
  accuracies;
- ``robustness.json``, ``robustness.png``: accuracy on deterministic perturbed copies of the test
  split (rotation, translation, zoom, Gaussian noise, elastic distortion) vs strength;
- ``calibration.png``: reliability diagram; ``confusion_matrix_normalized.png``;
- ``errors.png``: the most confident mistakes; ``predictions.png``: test digits with their top-3
  probabilities.

The same functions serve a notebook: ``evaluate_robustness(model, datamodule)``, ``calibration``,
``fit_temperature``, ``error_analysis``, ``evaluate_checkpoint``. ``mnist_lab.train`` runs
``evaluate_checkpoint`` at the end of every run unless ``eval.full=false``.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.classification import (
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from mnist_lab.data import MNISTDataModule
from mnist_lab.errors import ConfigError, MnistLabError, exit_with
from mnist_lab.files import write_json
from mnist_lab.models import ConvNet
from mnist_lab.module import Classifier
from mnist_lab.plots import plot_confusion_matrix, plot_gallery, plot_reliability, plot_robustness
from mnist_lab.transforms import EvalPreset, perturb

#: Perturbations and strengths of the robustness suite (units: see ``transforms.perturb``).
ROBUSTNESS = {
    "rotation": [0, 5, 10, 15, 20, 30, 45, 60],        # degrees, random sign per image
    "translation": [0, 1, 2, 3, 4, 5, 6],              # pixels, random direction per image
    "zoom": [0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3],       # scale factor
    "noise": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],           # Gaussian std, [0, 1] pixel units
    "elastic": [0, 10, 20, 30, 40],                    # alpha in pixels, sigma 4 px
}
#: The strength of each perturbation that leaves the image unchanged.
IDENTITY = {"rotation": 0, "translation": 0, "zoom": 1.0, "noise": 0.0, "elastic": 0}
ECE_BINS = 15


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_checkpoint(ckpt_path: str | Path, data_root: str | Path | None = None,
                    device: str | torch.device | None = None) -> tuple[Classifier, MNISTDataModule]:
    """Rebuild ``(model, datamodule)`` from an mnist_lab checkpoint, model in eval mode on ``device``
    (default: CUDA if available, else CPU). The datamodule has the run's dataset, split and
    normalisation; call ``setup()`` on it to read the data (``data_root`` overrides the saved root).

    Raises:
        ConfigError: the file is missing, not a checkpoint, or not an mnist_lab checkpoint.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; give ckpt_path=<run dir>/checkpoints/best.ckpt "
                          "or run_dir=<run dir>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}); give a .ckpt file "
                          "written by mnist_lab.train") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if not hp.get("net_config") or "datamodule_hyper_parameters" not in ckpt:
        raise ConfigError(f"{path} is not an mnist_lab checkpoint (no net_config / datamodule "
                          "hyper-parameters); give a .ckpt file written by mnist_lab.train")
    model = Classifier(ConvNet(**hp["net_config"]), num_classes=hp.get("num_classes", 10))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not fit the architecture its config describes: "
                          f"{str(e).splitlines()[0]}") from None
    dm_hp = dict(ckpt["datamodule_hyper_parameters"])
    if data_root is not None:
        dm_hp["root"] = data_root
    datamodule = MNISTDataModule(**dm_hp)
    datamodule.load_state_dict(ckpt.get("MNISTDataModule", {"mean": None, "std": None}))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), datamodule


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, preset: EvalPreset,
                   batch_size: int = 500) -> torch.Tensor:
    """Logits ``(N, C)`` float32 for float [0, 1] images ``(N, 1, 28, 28)`` (or uint8 ``(N, 28, 28)``),
    normalised with ``preset``; batched, on the model's device, eval mode."""
    model.eval()
    dev = device_of(model)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i: i + batch_size].to(dev)
        x = preset.to_unit(x) if x.dtype == torch.uint8 else x.clone()
        out.append(model(preset.normalize(x)).float())
    return torch.cat(out)


def _split(datamodule: MNISTDataModule, split: str, max_images: int | None):
    if not datamodule.splits:
        datamodule.setup()
    x, y = datamodule.splits[split]
    if max_images:
        x, y = x[:max_images], y[:max_images]
    return x, y


def evaluate_robustness(model: torch.nn.Module, datamodule: MNISTDataModule,
                        perturbations: dict[str, list[float]] | None = None, seed: int = 0,
                        split: str = "test", max_images: int | None = None) -> dict[str, dict[str, float]]:
    """Top-1 accuracy on perturbed copies of a split: ``{kind: {str(strength): accuracy}}``.

    The random parts of each perturbation (rotation sign, shift direction, noise, elastic field) come
    from a generator seeded with ``seed`` and the perturbation's position, so every model evaluated
    with the same seed sees the same perturbed images. Identity settings (:data:`IDENTITY`) reuse
    the clean accuracy.
    """
    x, y = _split(datamodule, split, max_images)
    preset = EvalPreset(datamodule.mean, datamodule.std)
    dev = device_of(model)
    x01, y = preset.to_unit(x.to(dev)), y.to(dev)
    clean = float((predict_logits(model, x01, preset).argmax(1) == y).float().mean())
    results: dict[str, dict[str, float]] = {}
    for i, (kind, strengths) in enumerate((perturbations or ROBUSTNESS).items()):
        results[kind] = {}
        for j, strength in enumerate(strengths):
            if strength == IDENTITY.get(kind):
                results[kind][str(strength)] = clean
                continue
            gen = torch.Generator(device=dev).manual_seed(seed * 10_007 + i * 101 + j)
            logits = predict_logits(model, perturb(x01, kind, strength, gen), preset)
            results[kind][str(strength)] = float((logits.argmax(1) == y).float().mean())
    return results


def robustness_headline(robustness: dict[str, dict[str, float]]) -> dict[str, float]:
    """The robustness figures a run's ``metrics.json`` and a sweep summary carry: accuracy at
    20 degrees rotation and a 4 px shift, and ``robustness/mean``, the mean accuracy over every
    non-identity perturbation setting of the suite."""
    values = [acc for kind, res in robustness.items() for s, acc in res.items() if float(s) != IDENTITY.get(kind)]
    out = {"robustness/mean": sum(values) / len(values)} if values else {}
    for kind, strength in (("rotation", "20"), ("translation", "4")):
        if strength in robustness.get(kind, {}):
            out[f"robustness/{kind}_{strength}"] = robustness[kind][strength]
    return out


def calibration(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict:
    """Expected calibration error (torchmetrics, L1, equal-width confidence bins), negative
    log-likelihood (mean cross-entropy, nats) and the reliability-diagram bins.

    Returns:
        ``{"ece", "nll", "accuracy", "bins": [{"lower", "upper", "count", "confidence", "accuracy"}]}``.
    """
    probs = logits.softmax(1)
    ece = MulticlassCalibrationError(logits.shape[1], n_bins=n_bins, norm="l1").to(logits.device)
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, device=logits.device)
    which = torch.bucketize(conf, edges[1:-1], right=True)  # bins (lower, upper], as torchmetrics
    bins = []
    for b in range(n_bins):
        mask = which == b
        n = int(mask.sum())
        bins.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                     "confidence": float(conf[mask].mean()) if n else None,
                     "accuracy": float(correct[mask].mean()) if n else None})
    return {"ece": float(ece(probs, labels)), "nll": float(F.cross_entropy(logits, labels)),
            "accuracy": float(correct.mean()), "bins": bins}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the ``T > 0`` minimising the NLL of ``logits / T``,
    fitted by L-BFGS on ``log T``. Fit it on the validation split, apply it to the test split."""
    log_t = torch.zeros(1, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def error_analysis(logits: torch.Tensor, labels: torch.Tensor, top_pairs: int = 10) -> dict:
    """Per-class precision / recall / F1 (torchmetrics), the confusion matrix (counts and row-normalised),
    and the ``top_pairs`` most frequent (true, predicted) mistakes."""
    c, dev = logits.shape[1], logits.device
    per_class = {name: metric(c, average=None).to(dev)(logits, labels).tolist()
                 for name, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall),
                                      ("f1", MulticlassF1Score))}
    cm = MulticlassConfusionMatrix(c).to(dev)(logits, labels).cpu()
    support = cm.sum(1)
    off = cm.clone().fill_diagonal_(0)
    order = torch.argsort(off.flatten(), descending=True)[:top_pairs]
    pairs = [{"true": int(k // c), "predicted": int(k % c), "count": int(off.flatten()[k]),
              "rate": float(off.flatten()[k] / max(int(support[k // c]), 1))} for k in order if off.flatten()[k] > 0]
    return {
        "per_class": [{"class": i, "precision": per_class["precision"][i], "recall": per_class["recall"][i],
                       "f1": per_class["f1"][i], "support": int(support[i])} for i in range(c)],
        "confusion": cm.tolist(),
        "confusion_normalized": (cm.double() / support.clamp_min(1)[:, None]).tolist(),
        "confused_pairs": pairs,
    }


def evaluate_checkpoint(ckpt_path: str | Path, output_dir: str | Path, data_root: str | Path | None = None,
                        seed: int = 0, temperature: bool = True, max_images: int | None = None,
                        plots: bool = True) -> dict:
    """Run the whole suite on a checkpoint and write its files into ``output_dir``; returns the
    contents of ``evaluation.json``.

    Raises:
        ConfigError: not an mnist_lab checkpoint; DataError: the run's data cannot be found.
    """

    model, dm = load_checkpoint(ckpt_path, data_root=data_root)
    dm.setup()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    preset = EvalPreset(dm.mean, dm.std)
    x, y = _split(dm, "test", max_images)
    dev = device_of(model)
    logits, y = predict_logits(model, x, preset), y.to(dev)
    result = {"checkpoint": str(Path(ckpt_path).resolve()), "model": model.net.name, "n_test": int(y.numel()),
              "test/acc": float((logits.argmax(1) == y).float().mean()),
              "test/loss": float(F.cross_entropy(logits, y))}
    cal = calibration(logits, y)
    result.update({"test/ece": cal["ece"], "test/nll": cal["nll"]})
    if temperature:
        xv, yv = _split(dm, "val", None)
        t = fit_temperature(predict_logits(model, xv, preset), yv.to(dev))
        scaled = calibration(logits / t, y)
        result.update({"temperature": t, "test/ece_scaled": scaled["ece"], "test/nll_scaled": scaled["nll"]})
    errors = error_analysis(logits, y)
    robustness = evaluate_robustness(model, dm, seed=seed, max_images=max_images)
    result.update({"robustness": robustness, "robustness_seed": seed, **errors, "calibration_bins": cal["bins"]})
    write_json(out / "robustness.json", {"seed": seed, "n_images": int(y.numel()), "accuracy": robustness})
    write_json(out / "evaluation.json", result)
    if plots:
        name = model.net.name
        plot_robustness({name: robustness}, out / "robustness.png", title=f"{name}: accuracy under perturbation")
        plot_reliability(cal["bins"], out / "calibration.png", title=f"{name}: ECE {cal['ece']:.4f}, "
                         f"NLL {cal['nll']:.4f}")
        plot_confusion_matrix(torch.tensor(errors["confusion"]), out / "confusion_matrix_normalized.png",
                              title=f"{name}: test confusion matrix (row-normalised colours)")
        probs = logits.softmax(1).cpu()
        wrong = torch.nonzero(probs.argmax(1) != y.cpu()).flatten()
        worst = wrong[torch.argsort(probs[wrong].max(1).values, descending=True)][:25]
        plot_gallery(x[worst.to(x.device)].cpu(), y.cpu()[worst], probs[worst], out / "errors.png",
                     title="most confident mistakes (true label, top-3 predictions)")
        first = torch.arange(min(16, y.numel()))
        plot_gallery(x[first.to(x.device)].cpu(), y.cpu()[first], probs[first], out / "predictions.png",
                     title="test digits with top-3 probabilities")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """``python -m mnist_lab.evaluate ckpt_path=PATH | run_dir=PATH [output_dir=DIR]``."""
    try:
        if bool(cfg.ckpt_path) == bool(cfg.run_dir):
            raise ConfigError("give exactly one of ckpt_path=<file.ckpt> or run_dir=<run dir>")
        if cfg.run_dir:
            run = Path(cfg.run_dir)
            summary = run / "metrics.json"
            tested = json.loads(summary.read_text()).get("test_ckpt") if summary.is_file() else None
            ckpt = run / (tested or "checkpoints/best.ckpt")
        else:
            ckpt = Path(cfg.ckpt_path)
        out = Path(cfg.output_dir) if cfg.output_dir else (Path(cfg.run_dir) if cfg.run_dir else ckpt.parent.parent)
        result = evaluate_checkpoint(ckpt, out, data_root=cfg.data_root, seed=cfg.seed,
                                     temperature=cfg.temperature, max_images=cfg.max_images)
    except MnistLabError as e:
        exit_with(e)
    rob = result["robustness"]
    print(f"test/acc: {result['test/acc']:.4f}  ECE: {result['test/ece']:.4f}  NLL: {result['test/nll']:.4f}")
    print("robustness: " + "  ".join(f"{k} {max(v, key=float)}: {v[max(v, key=float)]:.4f}" for k, v in rob.items()))
    print(f"evaluation dir: {out}")


if __name__ == "__main__":
    main()
