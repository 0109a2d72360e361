#!/usr/bin/env python
"""Training throughput of mnist_lab's Trainer.fit path against a plain PyTorch loop, in one process.

Both paths train the same model (same initial weights), optimizer (Adam, lr 1e-3), batch size and
augmentation on the same in-memory train split. The plain loop is the floor of
../shared/bench/torch_floor.py: the split pre-normalised as one float tensor, a shuffled index
slice per step, forward, backward, step, nothing else. The fit path is a whole
``mnist_lab.train`` run (``train(cfg)``, as the command runs it): MNISTDataModule batches, the
Classifier with its metrics, every callback of a run (checkpoints, early stopping, timer, resume
state, divergence check) and the CSV logger; only the progress bar is off, and validation and
test are cut to one batch (they are not timed). Images/s are timed from the start of the first to
the end of the last training step of each epoch. The machines here are noisy (+-25 % between
epochs), so the two paths run interleaved (plain, fit, plain, fit, ... --repeats times) and the
steady state is the median of all epochs but the first of each repeat.

Usage:
  python scripts/benchmark.py --models conv2 fc --batch-sizes 32 256 --epochs 4
  python scripts/benchmark.py --models conv2 --aug --out benchmark.json
Data: --data-root, else $MNIST_LAB_DATA, else ./data (synthetic tests pass a tmp root).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from mnist_lab import MNISTDataModule, build_model, load_config, train
from mnist_lab.module import cache_gpu_absence
from mnist_lab.transforms import to_unit


class StepTimer(Callback):
    """Seconds from the first training batch's start to the last one's end, per epoch."""

    def __init__(self):
        self.seconds, self.steps = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self._sync(pl_module)
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += 1  # training steps (groups of mini-batches with steps_per_execution > 1)
        if trainer.fit_loop.epoch_loop.batch_idx == trainer.num_training_batches - 1:  # before validation
            self._sync(pl_module)
            self.seconds.append(time.perf_counter() - self._t0)
            self.steps.append(self._n)

    @staticmethod
    def _sync(module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()


def plain_loop(model, x_u8, y, batch_size, steps, epochs, mean, std, augment, device):
    """The floor: returns seconds per epoch and the loss of the first step (a same-math check). Without
    augmentation the whole split is normalised once, as ``torch_floor.py`` does."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x01 = to_unit(x_u8.to(device))
    x_pre = (x01 - mean) / std if augment is None else None
    y = y.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    seconds, first_loss = [], None
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch)).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            idx = perm[i * batch_size: (i + 1) * batch_size]
            xb = x_pre[idx] if x_pre is not None else (augment(x01[idx], gen) - mean) / std
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if first_loss is None:
                first_loss = float(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds, first_loss


def fit_path(name, batch_size, steps, epochs, args, seed, workdir, k: str = "auto") -> tuple[list[float], int]:
    """A whole ``mnist_lab.train`` run of ``epochs`` x ``steps`` mini-batch steps with ``steps_per_execution=k``;
    seconds per epoch and the K it ran with (``auto`` resolved)."""
    timer = StepTimer()
    overrides = [f"model={name}", "data.split=official", f"data.batch_size={batch_size}",
                 f"+aug={str(args.aug).lower()}", f"trainer.max_epochs={epochs}", f"steps_per_execution={k}",
                 f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=1",
                 "eval.max_images=100", f"trainer.precision={args.precision}",
                 f"trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}", "trainer.devices=1",
                 "callbacks.early_stopping.patience=1000", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "eval.full=false", "plots=false", f"seed={seed}"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the run's own report
        warnings.filterwarnings("ignore")
        metrics = train(load_config(overrides), Path(workdir) / f"run{len(list(Path(workdir).iterdir()))}",
                        callbacks=[timer])
    return timer.seconds, metrics["steps_per_execution"]


def steady(repeats: list[list[float]]) -> float:
    """Median epoch seconds over every repeat's epochs after its first (warm-up)."""
    return statistics.median([s for epochs in repeats for s in (epochs[1:] if len(epochs) > 1 else epochs)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["conv2", "fc"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per path and repeat (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved plain/fit repeats")
    parser.add_argument("--train-images", type=int, default=20000, help="images per epoch (a subset)")
    parser.add_argument("--aug", action="store_true", help="per-image augmentation in both paths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="fit path precision (the plain loop is fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--steps-per-execution", nargs="+", default=["auto"],
                        help="fit-path steps_per_execution values, one row each (default: auto, the package's "
                             "default; e.g. 1 8 auto)")
    parser.add_argument("--out", default="benchmark.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # both paths without the per-step NVML probe that importing Lightning turns on (a fit turns it off for
    # the rest of the process: the first plain loop would pay it alone); torch_floor.py never pays it
    cache_gpu_absence()
    device = torch.device(args.device)
    workdir = tempfile.mkdtemp(prefix="mnist_lab_benchmark_")  # the fit path's run dirs, removed at the end
    rows = []
    for name, bs, k in [(n, b, k) for n in args.models for b in args.batch_sizes for k in args.steps_per_execution]:
        dm = MNISTDataModule(root=args.data_root, split="official", batch_size=bs, augment=args.aug)
        dm.setup()
        x, y = dm.splits["train"]
        steps = min(args.train_images, len(y)) // bs
        L.seed_everything(0, workers=True, verbose=False)  # the fit path's seed=0: the same initial weights
        model = build_model(name).to(device)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        plain_s, fit_s, first_loss = [], [], None
        for _ in range(args.repeats):
            model.load_state_dict(init)
            seconds, loss = plain_loop(model, x, y, bs, steps, args.epochs, dm.mean, dm.std, dm.augmenter, device)
            plain_s.append(seconds)
            first_loss = loss if first_loss is None else first_loss
            seconds, k_run = fit_path(name, bs, steps, args.epochs, args, 0, workdir, k)
            fit_s.append(seconds)
        images = steps * bs
        row = {"model": name, "batch_size": bs, "steps_per_execution": k, "k": k_run, "aug": args.aug,
               "images_per_epoch": images,
               "plain_epoch_seconds": [[round(s, 4) for s in r] for r in plain_s],
               "fit_epoch_seconds": [[round(s, 4) for s in r] for r in fit_s],
               "plain_images_per_s": round(images / steady(plain_s)),
               "fit_images_per_s": round(images / steady(fit_s)),
               "plain_first_step_loss": first_loss}
        row["ratio"] = round(row["fit_images_per_s"] / row["plain_images_per_s"], 3)
        rows.append(row)
        print(f"{name:>6} bs {bs:>4} K {k}={k_run}{' aug' if args.aug else ''}: "
              f"plain {row['plain_images_per_s']:>7} img/s, mnist_lab fit {row['fit_images_per_s']:>7} img/s, "
              f"ratio {row['ratio']:.3f}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "lightning": L.__version__, "threads": torch.get_num_threads(),
        "precision": args.precision, "epochs": args.epochs, "repeats": args.repeats, "rows": rows,
    }
    shutil.rmtree(workdir, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
