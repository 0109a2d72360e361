"""The evaluation suite: robustness, calibration and error analysis on the logits of ``Trainer.test``
(docs/evaluation.md).
"""

from pathlib import Path

import lightning as L
import torch
from torchmetrics.utilities.distributed import gather_all_tensors

from mnist_lab.batches import InMemoryBatches
from mnist_lab.metrics import IDENTITY, ROBUSTNESS, calibration, error_analysis, fit_temperature, robustness_headline
from mnist_lab.plots import plot_confusion_matrix, plot_gallery, plot_reliability, plot_robustness
from mnist_lab.rundir import RunDir, write_json
from mnist_lab.transforms import perturb, to_unit

TEST_KEYS = ("test/acc", "test/loss", "test/precision_macro", "test/recall_macro", "test/f1_macro")


class Perturbed:
    """A split perturbed as a whole (one generator per setting, seeded, so every model sees the same
    images), then batched as its unperturbed ``batches`` are. The copy is made when iterated."""

    def __init__(self, batches: InMemoryBatches, kind: str, strength: float, seed: int):
        self.batches, self.kind, self.strength, self.seed = batches, kind, strength, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        b = self.batches
        generator = torch.Generator(device=b.images.device).manual_seed(self.seed)
        images = perturb(to_unit(b.images), self.kind, self.strength, generator)
        return iter(InMemoryBatches(images, b.labels, b.sampler))


class EvaluationSuite(L.Callback):
    """Test metrics of a ``Trainer.test`` run and, with ``full``, the whole suite (figures logged through
    Lightning: ``test/ece``, ``test/nll``, ``temperature``, ``test/*_scaled``, ``robustness/*``); afterwards
    :attr:`result` holds what ``evaluation.json`` holds. Rank 0 writes ``confusion_matrix.png``,
    ``evaluation.json``, ``robustness.json``, ``robustness.png``, ``calibration.png``, ``errors.png`` and
    ``predictions.png``.

    Args:
        output_dir: where rank 0 writes the suite's files; ``None`` writes nothing.
        full: also calibration (ECE, NLL, temperature scaling fitted on val), error analysis and robustness.
        seed: perturbation seed: the same seed gives every model the same perturbed images.
        temperature: fit temperature scaling on the validation split (with ``full``).
        max_images: the first N test images only (quick looks); ``None``: the whole test split.
        plots: draw the PNG files (with ``output_dir``).
        perturbations: ``{kind: [strength, ...]}`` (units: :func:`mnist_lab.transforms.perturb`); default
            :data:`mnist_lab.metrics.ROBUSTNESS`.
    """

    def __init__(self, output_dir: str | Path | None = None, full: bool = True, seed: int = 0,
                 temperature: bool = True, max_images: int | None = None, plots: bool = True,
                 perturbations: dict[str, list[float]] | None = None):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.full, self.seed, self.temperature, self.max_images, self.plots = full, seed, temperature, max_images, plots
        self.perturbations = perturbations or ROBUSTNESS
        self.names: list = []  # what each test dataloader is: "test", "val" or (kind, strength)
        self.result: dict = {}

    def dataloaders(self, datamodule) -> list:
        """The test dataloaders of the suite for a set-up ``datamodule`` (see the module docstring)."""
        x, y = datamodule.splits["test"]
        if self.max_images:
            x, y = x[: self.max_images], y[: self.max_images]
        loaders = {"test": datamodule.eval_batches(x, y)}
        if self.full and self.temperature:
            loaders["val"] = datamodule.val_dataloader()
        for i, (kind, strengths) in enumerate(self.perturbations.items() if self.full else ()):
            for j, strength in enumerate(strengths):
                if strength != IDENTITY.get(kind):  # the identity reuses the clean accuracy
                    loaders[(kind, strength)] = Perturbed(loaders["test"], kind, strength, self.seed * 10_007
                                                          + i * 101 + j)
        self.names = list(loaders)
        return list(loaders.values())

    def on_test_start(self, trainer, pl_module) -> None:
        self._outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        kept = (outputs.detach().float(), batch[1]) + ((batch[0],) if dataloader_idx == 0 else ())
        self._outputs.setdefault(dataloader_idx, []).append(kept)

    def _gathered(self, index: int) -> list[torch.Tensor]:
        """Logits, labels (and images, for the test split) of one dataloader, from every rank."""
        parts = [torch.cat(column) for column in zip(*self._outputs[index])]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [torch.cat(gather_all_tensors(p)) for p in parts]
        return parts

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        logits, labels, self._images = self._gathered(0)
        self._logits, self._labels = logits, labels
        errors = error_analysis(logits, labels)
        self.result = {"model": getattr(pl_module, "name", type(pl_module).__name__), "n_test": int(labels.numel()),
                       "confusion": errors.pop("confusion")}
        if not self.full:
            return
        cal = calibration(logits, labels)
        logged = {"test/ece": cal["ece"], "test/nll": cal["nll"]}
        if "val" in self.names:
            val_logits, val_labels = self._gathered(self.names.index("val"))
            t = fit_temperature(val_logits, val_labels)
            scaled = calibration(logits / t, labels)
            logged.update({"temperature": t, "test/ece_scaled": scaled["ece"], "test/nll_scaled": scaled["nll"]})
        clean = float((logits.argmax(1) == labels).float().mean())
        robustness = {kind: {str(s): clean if s == IDENTITY.get(kind) else self._accuracy((kind, s)) for s in strengths}
                      for kind, strengths in self.perturbations.items()}
        logged.update(robustness_headline(robustness))
        for key, value in logged.items():
            pl_module.log(key, value, add_dataloader_idx=False, sync_dist=True)
        self.result.update({**logged, "robustness": robustness, "robustness_seed": self.seed, **errors,
                            "calibration_bins": cal["bins"]})

    def _accuracy(self, name) -> float:
        logits, labels = self._gathered(self.names.index(name))
        return float((logits.argmax(1) == labels).float().mean())

    def on_test_end(self, trainer, pl_module) -> None:
        tested = {k: float(trainer.callback_metrics[k]) for k in TEST_KEYS if k in trainer.callback_metrics}
        self.result = {"model": self.result["model"], "n_test": self.result["n_test"], **tested,
                       **{k: v for k, v in self.result.items() if k not in ("model", "n_test")}}
        if trainer.is_global_zero and self.output_dir is not None:
            self.write(self.output_dir)
        self._outputs.clear()

    def write(self, out: Path) -> None:
        """``confusion_matrix.png`` and, with ``full``, ``evaluation.json``, ``robustness.json`` and the plots."""
        name, result = self.result["model"], self.result
        if self.plots:
            plot_confusion_matrix(torch.tensor(result["confusion"]), out / "confusion_matrix.png",
                                  title=f"{name}: test confusion matrix")
        if not self.full:
            return
        run = RunDir(out)
        write_json(run.robustness, {"seed": self.seed, "n_images": result["n_test"], "accuracy": result["robustness"]})
        write_json(run.evaluation, result)
        if not self.plots:
            return
        plot_robustness({name: result["robustness"]}, out / "robustness.png", title=f"{name}: accuracy under "
                        "perturbation")
        plot_reliability(result["calibration_bins"], out / "calibration.png",
                         title=f"{name}: ECE {result['test/ece']:.4f}, NLL {result['test/nll']:.4f}")
        probs, x, y = self._logits.softmax(1).cpu(), self._images.cpu()[:, 0], self._labels.cpu()
        wrong = torch.nonzero(probs.argmax(1) != y).flatten()
        worst = wrong[torch.argsort(probs[wrong].max(1).values, descending=True)][:25]
        plot_gallery(x[worst], y[worst], probs[worst], out / "errors.png",
                     title="most confident mistakes (true label, top-3 predictions)")
        first = torch.arange(min(16, y.numel()))
        plot_gallery(x[first], y[first], probs[first], out / "predictions.png",
                     title="test digits with top-3 probabilities")
