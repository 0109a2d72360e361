"""Metrics of a classifier's logits: pure functions of tensors, no model, data or files.

The evaluation suite (:class:`mnist_lab.suite.EvaluationSuite`) calls them on the logits of
``Trainer.test``; a notebook can call them on any logits ``(N, C)`` and int64 labels ``(N,)``.
"""

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics import classification as tm

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



def eval_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 accuracy and macro precision / recall / F1, named ``<prefix>acc`` etc."""
    return MetricCollection({
        "acc": tm.MulticlassAccuracy(num_classes, average="micro"),
        "precision_macro": tm.MulticlassPrecision(num_classes, average="macro"),
        "recall_macro": tm.MulticlassRecall(num_classes, average="macro"),
        "f1_macro": tm.MulticlassF1Score(num_classes, average="macro"),
    }, prefix=prefix)


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
    ece = tm.MulticlassCalibrationError(logits.shape[1], n_bins=n_bins, norm="l1").to(logits.device)
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
    """Temperature scaling (Guo et al. 2017): the ``T > 0`` minimising the NLL of ``logits / T``, fitted by
    L-BFGS on ``log T`` in float64 (in float32 the flat optimum moves with rounding, by 0.3 %). Fit it on the
    validation split, apply it to the test split. Works inside ``Trainer.test`` (its inference mode is lifted
    here: the fit needs gradients)."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, labels = logits.to(torch.float64, copy=True), labels.clone()  # normal tensors, even in inference mode
        log_t = torch.zeros(1, dtype=torch.float64, device=logits.device, requires_grad=True)
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
                 for name, metric in (("precision", tm.MulticlassPrecision), ("recall", tm.MulticlassRecall),
                                      ("f1", tm.MulticlassF1Score))}
    cm = tm.MulticlassConfusionMatrix(c).to(dev)(logits, labels).cpu()
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
