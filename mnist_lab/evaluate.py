"""Evaluation: test metrics, robustness, calibration and error analysis of a trained classifier.

One inference path: :func:`predict_logits` turns a model and images into logits; the test metrics
of a run, the evaluation suite and ``mnist_lab.predict`` all go through it. At the end of a run,
``mnist_lab.train`` calls :func:`evaluate_model` on the model and datamodule it has in memory;
``python -m mnist_lab.evaluate ckpt_path=PATH`` (or ``run_dir=PATH``) rebuilds both from the
checkpoint (no model or data config to repeat) and calls the same function. It writes into the run
dir (or ``output_dir=``):

- ``confusion_matrix.png``: test confusion matrix (counts; colours row-normalised);
- ``evaluation.json``: test accuracy, loss and macro precision / recall / F1, ECE and NLL (before and
  after temperature scaling), per-class precision / recall / F1, the confusion matrix, the
  most-confused class pairs, and the robustness accuracies;
- ``robustness.json``, ``robustness.png``: accuracy on deterministic perturbed copies of the test
  split (rotation, translation, zoom, Gaussian noise, elastic distortion) vs strength;
- ``calibration.png``: reliability diagram; ``errors.png``: the most confident mistakes;
  ``predictions.png``: test digits with their top-3 probabilities.

The same functions serve a notebook: ``evaluate_model(model, datamodule)``, ``evaluate_robustness``,
``calibration``, ``fit_temperature``, ``error_analysis``, ``predict_logits``.
"""

from __future__ import annotations

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
from mnist_lab.module import Classifier, eval_metrics
from mnist_lab.plots import plot_confusion_matrix, plot_gallery, plot_reliability, plot_robustness
from mnist_lab.rundir import RunDir, read_checkpoint, write_json
from mnist_lab.transforms import perturb, to_unit

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
    """Rebuild ``(model, datamodule)`` from an mnist_lab checkpoint alone, safely (weights-only
    loading; the network is built only from an ``nn.Module`` class its config names). The model is in
    eval mode on ``device`` (default: CUDA if available, else CPU) and takes images in [0, 1]; the
    datamodule has the run's dataset, split and batch settings: call ``prepare_data()`` and
    ``setup()`` on it to read the data (``data_root`` overrides the saved root).

    Raises:
        ConfigError: the file is missing, would run code when loaded, is not a checkpoint, is not an
            mnist_lab checkpoint (or one written before checkpoints described their network: retrain
            those), or its weights do not fit the network its config describes.
    """
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt.get("hyper_parameters") or {}
    if "net_config" in hp:
        raise ConfigError(f"{ckpt_path} was written by mnist_lab 0.1, whose checkpoints do not describe their "
                          "network; retrain it with this version (the same command)")
    if not isinstance(hp.get("net"), dict) or "datamodule_hyper_parameters" not in ckpt:
        raise ConfigError(f"{ckpt_path} is not an mnist_lab checkpoint (no network config / datamodule "
                          "hyper-parameters); give a .ckpt file written by mnist_lab.train")
    model = Classifier(**{**hp, "compile": False})
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ConfigError(f"{ckpt_path}: weights do not fit the architecture its config describes: "
                          f"{str(e).splitlines()[0]}") from None
    dm_hp = dict(ckpt["datamodule_hyper_parameters"])
    if data_root is not None:
        dm_hp["root"] = str(data_root)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), MNISTDataModule(**dm_hp)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The one inference path: float32 logits ``(N, C)`` of ``model`` (eval mode, no gradients,
    batched on the model's device) for uint8 images ``(N, 28, 28)`` or float images in [0, 1]
    ``(N, 1, 28, 28)``."""
    model.eval()
    dev = device_of(model)
    return torch.cat([model(to_unit(images[i: i + batch_size].to(dev))).float()
                      for i in range(0, images.shape[0], batch_size)])


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
    dev = device_of(model)
    x01, y = to_unit(x.to(dev)), y.to(dev)
    clean = float((predict_logits(model, x01).argmax(1) == y).float().mean())
    results: dict[str, dict[str, float]] = {}
    for i, (kind, strengths) in enumerate((perturbations or ROBUSTNESS).items()):
        results[kind] = {}
        for j, strength in enumerate(strengths):
            if strength == IDENTITY.get(kind):
                results[kind][str(strength)] = clean
                continue
            gen = torch.Generator(device=dev).manual_seed(seed * 10_007 + i * 101 + j)
            logits = predict_logits(model, perturb(x01, kind, strength, gen))
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


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``test/acc`` (top-1), ``test/loss`` (mean cross-entropy, nats) and ``test/{precision,recall,f1}_macro``
    of logits ``(N, C)`` against int64 labels ``(N,)``: the Classifier's own torchmetrics."""
    metrics = eval_metrics(logits.shape[1], "test/").to(logits.device)
    values = {k: float(v) for k, v in metrics(logits, labels).items()}
    return {**values, "test/loss": float(F.cross_entropy(logits, labels))}


def evaluate_model(model: torch.nn.Module, datamodule: MNISTDataModule, output_dir: str | Path | None = None,
                   full: bool = True, seed: int = 0, temperature: bool = True, max_images: int | None = None,
                   plots: bool = True) -> dict:
    """Test metrics of a model on its datamodule's test split, and with ``full`` the whole suite.

    Args:
        model: maps images in [0, 1] to logits (a :class:`Classifier`).
        datamodule: set up or not (``setup()`` is called if needed).
        output_dir: where to write ``confusion_matrix.png`` and, with ``full``, ``evaluation.json``,
            ``robustness.json`` and the suite's plots; ``None`` writes nothing.
        full: also calibration (ECE, NLL, temperature scaling fitted on val), error analysis and robustness.
        seed: perturbation seed (the same seed gives every model the same perturbed images).
        max_images: evaluate on the first N test images only (quick looks).

    Returns:
        ``test/acc``, ``test/loss``, ``test/{precision,recall,f1}_macro``, ``n_test``, ``confusion``
        (counts, rows = true class), and with ``full`` everything ``evaluation.json`` holds.
    """
    x, y = _split(datamodule, "test", max_images)
    logits = predict_logits(model, x)
    y = y.to(logits.device)
    errors = error_analysis(logits, y)
    result = {"model": getattr(model, "name", type(model).__name__),
              "n_test": int(y.numel()), **classification_metrics(logits, y), "confusion": errors.pop("confusion")}
    out = Path(output_dir) if output_dir is not None else None
    name = result["model"]
    if out is not None and plots:
        plot_confusion_matrix(torch.tensor(result["confusion"]), out / "confusion_matrix.png",
                              title=f"{name}: test confusion matrix")
    if not full:
        return result
    cal = calibration(logits, y)
    result.update({"test/ece": cal["ece"], "test/nll": cal["nll"]})
    if temperature:
        xv, yv = _split(datamodule, "val", None)
        t = fit_temperature(predict_logits(model, xv), yv.to(logits.device))
        scaled = calibration(logits / t, y)
        result.update({"temperature": t, "test/ece_scaled": scaled["ece"], "test/nll_scaled": scaled["nll"]})
    robustness = evaluate_robustness(model, datamodule, seed=seed, max_images=max_images)
    result.update({"robustness": robustness, "robustness_seed": seed, **errors, "calibration_bins": cal["bins"]})
    if out is None:
        return result
    run = RunDir(out)
    write_json(run.robustness, {"seed": seed, "n_images": int(y.numel()), "accuracy": robustness})
    write_json(run.evaluation, result)
    if plots:
        plot_robustness({name: robustness}, out / "robustness.png", title=f"{name}: accuracy under perturbation")
        plot_reliability(cal["bins"], out / "calibration.png", title=f"{name}: ECE {cal['ece']:.4f}, "
                         f"NLL {cal['nll']:.4f}")
        probs, x, y = logits.softmax(1).cpu(), x.cpu(), y.cpu()
        wrong = torch.nonzero(probs.argmax(1) != y).flatten()
        worst = wrong[torch.argsort(probs[wrong].max(1).values, descending=True)][:25]
        plot_gallery(x[worst], y[worst], probs[worst], out / "errors.png",
                     title="most confident mistakes (true label, top-3 predictions)")
        first = torch.arange(min(16, y.numel()))
        plot_gallery(x[first], y[first], probs[first], out / "predictions.png",
                     title="test digits with top-3 probabilities")
    return result


def evaluate_checkpoint(ckpt_path: str | Path, output_dir: str | Path, data_root: str | Path | None = None,
                        **kwargs) -> dict:
    """:func:`evaluate_model` (the full suite) on a checkpoint, with the model and data it describes;
    ``kwargs`` go to :func:`evaluate_model`. Returns the contents of ``evaluation.json``.

    Raises:
        ConfigError: see :func:`load_checkpoint`; DataError: the run's data cannot be found.
    """
    model, dm = load_checkpoint(ckpt_path, data_root=data_root)
    dm.prepare_data()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return {"checkpoint": str(Path(ckpt_path).resolve()), **evaluate_model(model, dm, output_dir, **kwargs)}


def evaluate_ensemble(ckpt_paths: list[str | Path], data_root: str | Path | None = None,
                      max_images: int | None = None) -> dict:
    """Test accuracy and NLL of each checkpoint and of their ensemble, whose probabilities are the
    mean of the members' softmax probabilities (e.g. the seeds of one preset).

    Returns:
        ``{"n_test", "ensemble": {"test/acc", "test/nll"},
        "members": [{"checkpoint", "model", "test/acc", "test/nll"}, ...]}``.

    Raises:
        ConfigError: see :func:`load_checkpoint`, or checkpoints trained on different datasets or splits
            (their test splits differ).
    """
    members = [(Path(p), *load_checkpoint(p, data_root=data_root)) for p in ckpt_paths]
    keys = ("dataset", "split", "fractions", "val_fraction", "split_seed")
    if len({tuple(str(dm.hparams[k]) for k in keys) for _, _, dm in members}) > 1:
        raise ConfigError(f"the checkpoints come from different datasets or splits ({', '.join(keys)} differ), so "
                          "their test splits differ; ensemble checkpoints of one protocol")
    dm = members[0][2]
    dm.prepare_data()
    x, y = _split(dm, "test", max_images)
    probs = [predict_logits(model, x).softmax(1) for _, model, _ in members]
    y = y.to(probs[0].device)

    def scores(p: torch.Tensor) -> dict[str, float]:
        return {"test/acc": float((p.argmax(1) == y).float().mean()), "test/nll": float(F.nll_loss(p.log(), y))}

    return {"n_test": int(y.numel()), "ensemble": scores(torch.stack(probs).mean(0)),
            "members": [{"checkpoint": str(path), "model": model.name, **scores(p)}
                        for (path, model, _), p in zip(members, probs)]}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """``python -m mnist_lab.evaluate ckpt_path=PATH | run_dir=PATH [output_dir=DIR]``; with a list of
    checkpoints or run dirs (``ckpt_path=[a.ckpt,b.ckpt]``), their ensemble's test accuracy."""
    try:
        if bool(cfg.ckpt_path) == bool(cfg.run_dir):
            raise ConfigError("give exactly one of ckpt_path=<file.ckpt> or run_dir=<run dir> (or a list of either)")
        given = cfg.run_dir or cfg.ckpt_path
        given = [given] if isinstance(given, str) else list(given)
        ckpts = [RunDir(r).tested_checkpoint() for r in given] if cfg.run_dir else [Path(p) for p in given]
        if len(ckpts) > 1:
            result = evaluate_ensemble(ckpts, data_root=cfg.data_root, max_images=cfg.max_images)
            if cfg.output_dir:
                Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
                write_json(Path(cfg.output_dir) / "ensemble.json", result)
        else:
            out = Path(cfg.output_dir) if cfg.output_dir else (Path(given[0]) if cfg.run_dir else
                                                               ckpts[0].parent.parent)
            result = evaluate_checkpoint(ckpts[0], out, data_root=cfg.data_root, seed=cfg.seed,
                                         temperature=cfg.temperature, max_images=cfg.max_images)
    except MnistLabError as e:
        exit_with(e)
    if len(ckpts) > 1:
        for m in result["members"]:
            print(f"{m['checkpoint']}  test/acc: {m['test/acc']:.4f}  NLL: {m['test/nll']:.4f}")
        ens = result["ensemble"]
        print(f"ensemble of {len(ckpts)} (mean probabilities)  test/acc: {ens['test/acc']:.4f}  "
              f"NLL: {ens['test/nll']:.4f}")
        return
    rob = result["robustness"]
    print(f"test/acc: {result['test/acc']:.4f}  ECE: {result['test/ece']:.4f}  NLL: {result['test/nll']:.4f}")
    print("robustness: " + "  ".join(f"{k} {max(v, key=float)}: {v[max(v, key=float)]:.4f}" for k, v in rob.items()))
    print(f"evaluation dir: {out}")


if __name__ == "__main__":
    main()
