"""``python -m mnist_lab.evaluate ckpt_path=PATH | run_dir=PATH``: the evaluation suite of a trained model
(``Trainer.test``), of several and their ensemble, and logits through ``Trainer.predict``.
"""

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mnist_lab.console import command
from mnist_lab.data import MNISTDataModule
from mnist_lab.errors import ConfigError, check_bool
from mnist_lab.module import Classifier
from mnist_lab.rundir import given_checkpoints, write_json
from mnist_lab.suite import EvaluationSuite
from mnist_lab.transforms import shift_pixels, to_unit

#: the views of test-time augmentation: the image and its 1-pixel shifts (dx, dy) in the four directions.
#: Shifts only: digits are not symmetric, so no flips. The first view is the image itself.
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def eval_trainer(callbacks: list[L.Callback] = ()) -> L.Trainer:
    """A Lightning trainer for inference: one device (a GPU if there is one), no logger, no checkpoints,
    no progress bar."""
    return L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


def evaluate_model(model: Classifier, datamodule: MNISTDataModule, output_dir: str | Path | None = None,
                   **suite) -> dict:
    """Test metrics of a :class:`~mnist_lab.module.Classifier` on its datamodule's test split (set up or
    not) and, by default, the whole evaluation suite, through ``Trainer.test``. ``output_dir``: where the
    suite writes its files (None: nowhere); ``suite``: :class:`~mnist_lab.suite.EvaluationSuite`'s
    arguments (``full``, ``seed``, ``temperature``, ``max_images``, ``plots``, ``perturbations``).

    Returns:
        ``test/acc``, ``test/loss``, ``test/{precision,recall,f1}_macro``, ``n_test``, ``confusion``
        (counts, rows = true class), and with ``full`` everything ``evaluation.json`` holds.
    """
    if not datamodule.splits:
        datamodule.setup("test")
    evaluation = EvaluationSuite(output_dir, **suite)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    eval_trainer([evaluation]).test(model, dataloaders=evaluation.dataloaders(datamodule), verbose=False)
    return evaluation.result


def predict(model: Classifier, images: torch.Tensor | DataLoader, trainer: L.Trainer | None = None) -> torch.Tensor:
    """Logits ``(N, num_classes)`` of ``Trainer.predict`` for uint8 images ``(N, 28, 28)``, float images
    in [0, 1] ``(N, 1, 28, 28)``, or any iterable of such batches (a datamodule's test dataloader)."""
    batches = DataLoader(to_unit(images), batch_size=1000) if isinstance(images, torch.Tensor) else images
    return torch.cat((trainer or eval_trainer()).predict(model, dataloaders=batches)).float()


def evaluate_checkpoint(ckpt_path: str | Path, output_dir: str | Path, data_root: str | Path | None = None,
                        **suite) -> dict:
    """:func:`evaluate_model` on a checkpoint, with the model and data it describes; ``suite`` as there.
    Returns the contents of ``evaluation.json``.

    Raises:
        ConfigError: see :meth:`Classifier.load_from_checkpoint`; DataError: the run's data cannot be found.
    """
    model, datamodule = _from_checkpoint(ckpt_path, data_root)
    datamodule.prepare_data()
    return {"checkpoint": str(Path(ckpt_path).resolve()), **evaluate_model(model, datamodule, output_dir, **suite)}


def predict_views(model: Classifier, datamodule: MNISTDataModule, images: torch.Tensor, labels: torch.Tensor,
                  trainer: L.Trainer | None = None, shifts=((0, 0),)) -> torch.Tensor:
    """Softmax probabilities ``(V, N, num_classes)`` of ``model`` for a split's images, one row per view of
    ``shifts`` (``V`` pixel shifts ``(dx, dy)``, see :func:`~mnist_lab.transforms.shift_pixels`). Each view
    goes through ``Trainer.predict`` once; their mean over ``V`` with :data:`TTA_SHIFTS` is test-time
    augmentation."""
    trainer = trainer or eval_trainer()
    return torch.stack([predict(model, datamodule.eval_batches(shift_pixels(images, dx, dy), labels),
                                trainer).softmax(1) for dx, dy in shifts])


def evaluate_ensemble(ckpt_paths: list[str | Path], data_root: str | Path | None = None,
                      max_images: int | None = None, tta: bool = False) -> dict:
    """Test accuracy and NLL of each checkpoint and of their ensemble, whose probabilities are the mean of
    the members' softmax probabilities (e.g. the seeds of one preset; one checkpoint is an ensemble of one).
    With ``tta``, also test-time augmentation: each member's probabilities averaged over the views of
    :data:`TTA_SHIFTS`, on the validation split as well as the test split, so that it is chosen on
    validation: ``tta["chosen"]`` is whether it raises the ensemble's validation accuracy.

    Returns:
        ``{"n_test", "ensemble": {"test/acc", "test/nll"}, "members": [{"checkpoint", "model", "test/acc",
        "test/nll"}, ...]}``; with ``tta`` also ``"tta": {"shifts", "val/acc", "val/acc_tta", "test/acc_tta",
        "test/nll_tta", "chosen"}`` (the ensemble's) and ``test/acc_tta`` per member.

    Raises:
        ConfigError: see :meth:`Classifier.load_from_checkpoint`, or checkpoints trained on different
            datasets or splits (their test splits differ).
    """
    members = [(Path(p), *_from_checkpoint(p, data_root)) for p in ckpt_paths]
    keys = ("dataset", "split", "fractions", "val_fraction", "split_seed")
    if len({tuple(str(dm.hparams[k]) for k in keys) for _, _, dm in members}) > 1:
        raise ConfigError(f"the checkpoints come from different datasets or splits ({', '.join(keys)} differ), so "
                          "their test splits differ; ensemble checkpoints of one protocol")
    dm, trainer, shifts = members[0][2], eval_trainer(), TTA_SHIFTS if tta else TTA_SHIFTS[:1]
    dm.prepare_data()
    dm.setup("test")

    def views(split: str) -> tuple[list[torch.Tensor], torch.Tensor]:  # per member (V, N, C), every view once
        x, y = (t[:max_images] if max_images else t for t in dm.splits[split])
        return [predict_views(model, dm, x, y, trainer, shifts) for _, model, _ in members], y

    def scores(p: torch.Tensor, y: torch.Tensor, prefix: str = "test/", suffix: str = "") -> dict[str, float]:
        y = y.to(p.device)
        return {f"{prefix}acc{suffix}": float((p.argmax(1) == y).float().mean()),
                f"{prefix}nll{suffix}": float(F.nll_loss(p.log(), y))}

    test, y = views("test")  # the plain probabilities are view (0, 0), the first of TTA_SHIFTS
    result = {"n_test": int(y.numel()), "ensemble": scores(torch.stack([v[0] for v in test]).mean(0), y),
              "members": [{"checkpoint": str(path), "model": model.name, **scores(v[0], y)}
                          for (path, model, _), v in zip(members, test)]}
    if tta:
        for member, v in zip(result["members"], test):
            member["test/acc_tta"] = scores(v.mean(0), y)["test/acc"]
        val, y_val = views("val")
        plain, shifted = (scores(torch.stack(probs).mean(0), y_val, "val/")["val/acc"]
                          for probs in ([v[0] for v in val], [v.mean(0) for v in val]))
        result["tta"] = {"shifts": [list(s) for s in TTA_SHIFTS], "val/acc": plain, "val/acc_tta": shifted,
                         **scores(torch.stack([v.mean(0) for v in test]).mean(0), y, suffix="_tta"),
                         "chosen": shifted > plain}
    return result


def _from_checkpoint(ckpt_path: str | Path, data_root: str | Path | None = None) -> tuple[Classifier,
                                                                                         MNISTDataModule]:
    """The model (eval mode, CPU) and the datamodule (``data_root``: another root) a checkpoint describes."""
    model = Classifier.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    root = {"root": str(data_root)} if data_root is not None else {}
    return model, MNISTDataModule.load_from_checkpoint(ckpt_path, map_location="cpu", **root)


@command("evaluate")
def main(cfg: DictConfig) -> None:
    """``python -m mnist_lab.evaluate ckpt_path=PATH | run_dir=PATH [output_dir=DIR] [tta=true]``; with a list
    of checkpoints or run dirs (``ckpt_path=[a.ckpt,b.ckpt]``), their ensemble's test accuracy; ``tta=true``
    adds test-time augmentation, measured on validation and test (``tta.json``, ``ensemble.json``)."""
    for key in ("tta", "temperature"):
        check_bool(key, cfg[key])
    ckpts = given_checkpoints(cfg.ckpt_path, cfg.run_dir)
    out = Path(cfg.output_dir) if cfg.output_dir else (ckpts[0].parent.parent if len(ckpts) == 1 else None)
    if len(ckpts) > 1 or cfg.tta:
        ensemble = evaluate_ensemble(ckpts, data_root=cfg.data_root, max_images=cfg.max_images, tta=cfg.tta)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / ("ensemble.json" if len(ckpts) > 1 else "tta.json"), ensemble)
    if len(ckpts) == 1:
        result = evaluate_checkpoint(ckpts[0], out, data_root=cfg.data_root, seed=cfg.seed,
                                     temperature=cfg.temperature, max_images=cfg.max_images)
    else:
        for m in [*ensemble["members"], {"checkpoint": f"ensemble of {len(ckpts)} (mean probabilities)",
                                         **ensemble["ensemble"]}]:
            print(f"{m['checkpoint']}  test/acc: {m['test/acc']:.4f}  NLL: {m['test/nll']:.4f}")
    if cfg.tta:
        t = ensemble["tta"]
        print(f"test-time augmentation ({len(t['shifts'])} views): val/acc {t['val/acc']:.4f} -> "
              f"{t['val/acc_tta']:.4f} ({'chosen' if t['chosen'] else 'not chosen'} on validation), "
              f"test/acc {t['test/acc_tta']:.4f}")
    if len(ckpts) == 1:
        rob = {k: max(v, key=float) for k, v in result["robustness"].items()}
        print(f"test/acc: {result['test/acc']:.4f}  ECE: {result['test/ece']:.4f}  NLL: {result['test/nll']:.4f}")
        print("robustness: " + "  ".join(f"{k} {s}: {result['robustness'][k][s]:.4f}" for k, s in rob.items()))
        print(f"evaluation dir: {out}")


if __name__ == "__main__":
    main()
