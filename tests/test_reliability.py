"""Reliability: kill and resume, determinism, 2-process DDP, divergence, and every bad input answered
with one clear line and a non-zero exit code. The commands run through their main() in this process,
where a process of their own is not the point (SIGKILL and DDP have one)."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import QUIET, cli, run_module, synthetic_digits, write_idx, write_synthetic_mnist

from mnist_lab import Classifier, MNISTDataModule, load_config, train
from mnist_lab.errors import ConfigError, TrainingDiverged
from mnist_lab.evaluate import predict
from mnist_lab.rundir import write_json
from mnist_lab.train import resume

# conv2 with dropout and augmentation: every kind of randomness (init, shuffling, augmentation,
# dropout) is in play; a one-cycle LR stepped every batch; 4 epochs of 25 steps
RUN = ["model=conv2", "model.dropout=0.25", "+aug=true", "scheduler=onecycle", "trainer.max_epochs=4",
       "trainer.deterministic=true", "plots=false", "eval.full=false", *QUIET]
TIMINGS = ("train_seconds", "seconds_per_epoch", "run_dir")


def summary(run) -> dict:
    """metrics.json without what two runs of the same config may differ in (wall times, the dir)."""
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in TIMINGS}


def rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def same(x, y) -> bool:
    """Deep equality of checkpoint contents: tensors to the bit, dicts, lists, tuples, scalars."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return isinstance(y, list | tuple) and len(x) == len(y) and all(map(same, x, y))
    return x == y


def assert_same_state(run, reference) -> None:
    """The two runs' last checkpoints hold the same weights, optimizer, LR scheduler, early-stopping
    and RNG states."""
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for r in (run, reference))
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert same(a[key], b[key]), key
    for key in b["callbacks"]:
        if key.startswith(("EarlyStopping", "ResumeState")):
            assert same(a["callbacks"][key], b["callbacks"][key]), key


def train_cli(args, data_root, cwd):
    return cli("mnist_lab.train", *args, data_root=data_root, cwd=cwd)


@pytest.fixture(scope="module")
def reference_run(synthetic_root, tmp_path_factory):
    """An uninterrupted run of RUN (seed 42)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = train_cli([*RUN, f"hydra.run.dir={run}"], synthetic_root, run.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


# ---------------------------------------------------------------- determinism
def test_the_same_seed_gives_identical_metrics(reference_run, synthetic_root, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other_seed"
    for run, seed in ((again, 42), (other, 43)):
        assert train_cli([*RUN, f"seed={seed}", f"hydra.run.dir={run}"], synthetic_root, tmp_path).returncode == 0
    assert summary(again) == summary(reference_run)
    assert rows(again) == rows(reference_run)
    assert len({r["epoch"] for r in rows(again) if r["train/loss"]}) == 4
    # the comparison can fail: another seed changes the numbers
    assert summary(other)["last_train/loss"] != summary(reference_run)["last_train/loss"]


# ---------------------------------------------------------------- kill and resume
@pytest.mark.parametrize(("signal", "code"), [("SIGKILL", -9), ("SIGTERM", 143), ("SIGINT", 130)])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_metrics(signal, code, reference_run, synthetic_root,
                                                                      tmp_path):
    run = tmp_path / "run"
    kill = [f"+callbacks.kill.{k}={v}" for k, v in
            (("_target_", "probes.SignalAt"), ("epoch", 2), ("batch", 5), ("signal", signal))]
    args = [*RUN, *kill, f"hydra.run.dir={run}"]  # SIGKILL ends a process: a process of its own
    killed = (run_module("mnist_lab.train", args, synthetic_root, tmp_path) if signal == "SIGKILL"
              else train_cli(args, synthetic_root, tmp_path))
    assert killed.returncode == code, killed.stderr[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # epochs 0 and 1 completed; the kill came in the middle of epoch 2, inside a training step (a group of
    # steps_per_execution=auto mini-batches: here the epoch's 25). SIGKILL and SIGINT stop there; Lightning
    # handles SIGTERM once the training step is done, so epoch 2 ends and is saved first
    assert last["epoch"] == (2 if signal == "SIGTERM" else 1)
    if signal == "SIGKILL":
        assert not (run / "metrics.json").exists()
    else:  # a caught signal: one line that says how to continue, and the status on disk
        assert f"error: stopped by {signal}" in killed.stderr and f"resume={run}" in killed.stderr
        assert "Traceback" not in killed.stderr
        assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"

    resumed = train_cli([f"resume={run}"], synthetic_root, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary(run) == summary(reference_run)
    assert rows(run) == rows(reference_run)  # the epochs before the kill are kept, none twice
    assert_same_state(run, reference_run)
    assert "probes.SignalAt" in (run / ".hydra" / "overrides.yaml").read_text()  # the run's own record stays
    assert (run / ".hydra_resume" / "overrides.yaml").read_text().strip() == f"- resume={run}"


def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(synthetic_root, tmp_path):
    run = tmp_path / "run"
    kill = [f"+callbacks.kill.{k}={v}" for k, v in
            (("_target_", "probes.SignalAt"), ("epoch", 0), ("batch", 3), ("signal", "SIGINT"))]
    proc = train_cli(["model=fc", *kill, f"hydra.run.dir={run}", *QUIET], synthetic_root, tmp_path)
    assert proc.returncode == 130
    assert "error: stopped by SIGINT before the first epoch ended, so there is no checkpoint" in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["resume"] is None


def test_resume_refuses_what_it_cannot_continue(reference_run, synthetic_root, tmp_path):
    with pytest.raises(ConfigError, match="that run completed; there is nothing to resume"):
        resume(reference_run)
    with pytest.raises(ConfigError, match="no config.yaml there, so it is not a run dir"):
        resume(tmp_path)
    (tmp_path / "config.yaml").write_text((reference_run / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="no checkpoints/last.ckpt .the run stopped before its first epoch ended"):
        resume(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "diverged"}))
    with pytest.raises(ConfigError, match="that run diverged; from its last good checkpoint it would diverge"):
        resume(tmp_path)
    proc = train_cli([f"resume={reference_run}", "trainer.max_epochs=9"], synthetic_root, tmp_path)
    assert proc.returncode == 2
    assert "drop the other overrides (trainer.max_epochs=9)" in proc.stderr and "Traceback" not in proc.stderr


def test_a_new_run_never_overwrites_an_old_one(reference_run, synthetic_root, tmp_path):
    before = {p: p.read_bytes() for p in reference_run.rglob("*") if p.is_file()}
    proc = train_cli([*RUN, f"hydra.run.dir={reference_run}"], synthetic_root, tmp_path)
    assert proc.returncode == 2
    assert f"error: the run dir {reference_run} already holds a run (config.yaml)" in proc.stderr
    assert f"resume={reference_run}" in proc.stderr
    assert {p: p.read_bytes() for p in reference_run.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigError, match="already holds a run"):
        train(load_config(RUN), reference_run)


def test_an_interrupted_write_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json(path, {"status": "completed", "test/acc": 0.99})

    def half_then_killed(self, text, encoding=None):
        with open(self, "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"status": "completed", "test/acc": 0.5, "note": "x" * 1000})
    assert json.loads(path.read_text()) == {"status": "completed", "test/acc": 0.99}


# ---------------------------------------------------------------- divergence
def test_a_loss_that_blows_up_stops_training_at_that_step(synthetic_root, tmp_path):
    run = tmp_path / "run"
    proc = train_cli(["model=fc", "optimizer.lr=1e6", f"hydra.run.dir={run}", *QUIET], synthetic_root, tmp_path)
    assert proc.returncode == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training diverged: the training loss became ")
    assert "at global step 2, at learning rate 1e+06" in line and "Lower optimizer.lr" in line
    assert "Traceback" not in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["status"], metrics["epoch"], metrics["step"], metrics["lr"]) == ("diverged", 0, 2, 1e6)
    assert metrics["last_good_checkpoint"] is None and not (run / "checkpoints").exists()


def test_a_nan_after_good_epochs_keeps_the_last_good_checkpoint(synthetic_root, tmp_path):
    poison = ["+callbacks.poison._target_=probes.PoisonAt", "+callbacks.poison.epoch=2",
              "+callbacks.poison.batch=3"]
    cfg = load_config(["model=fc", f"data.root={synthetic_root}", "plots=false", *poison, *QUIET])
    with pytest.raises(TrainingDiverged, match=r"became nan .* in epoch 2, at global step 54"):
        train(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["last_good_checkpoint"] == "checkpoints/last.ckpt"
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(w).all() for w in last["state_dict"].values())
    epoch_rows = [r for r in rows(tmp_path / "run") if r["epoch"]]  # (the others: the learning rate)
    assert len(epoch_rows) == 4  # val and train rows of epochs 0 and 1: nothing lost


def test_a_sparser_divergence_check_still_stops_before_the_next_checkpoint(synthetic_root, tmp_path):
    """check_every_n_steps=100 (the speedrun's GPU setting) with 25 steps an epoch: the check at the
    end of the epoch catches a NaN from step 3 of epoch 1, before that epoch's checkpoint."""
    poison = ["+callbacks.poison._target_=probes.PoisonAt", "+callbacks.poison.epoch=1",
              "+callbacks.poison.batch=3", "callbacks.divergence.check_every_n_steps=100"]
    cfg = load_config(["model=fc", f"data.root={synthetic_root}", "plots=false", *poison, *QUIET])
    with pytest.raises(TrainingDiverged, match=r"in epoch 1, within the 100 steps before global step 50"):
        train(cfg, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(w).all() for w in last["state_dict"].values())


# ---------------------------------------------------------------- DDP
def test_two_process_ddp_on_cpu_trains_each_image_once_and_the_same_for_every_k(synthetic_root, tmp_path):
    """steps_per_execution 1 and auto (the default: 32, its groups cut by a validation every 10 steps and the
    batch loss logged every 6; 13 steps an epoch per rank): identical runs. (K = 8 against K = 1, which this
    test also ran before, is the single-process tests' K > 1; auto is the K > 1 under DDP.)"""
    for k in (1, "auto"):
        run = tmp_path / str(k)
        args = [f"steps_per_execution={k}", "model=fc", "optimizer.lr=1e-5", "trainer.max_epochs=2",
                "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "eval.full=false",
                "+trainer.val_check_interval=10", "trainer.log_every_n_steps=6", "module.log_train_steps=true",
                "trainer.deterministic=true", "+callbacks.seen._target_=probes.SeenSamples", f"hydra.run.dir={run}",
                *QUIET]
        proc = run_module("mnist_lab.train", args, synthetic_root, tmp_path)  # DDP launches its processes
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("run dir:") == 1

        seen = [json.loads((run / f"seen_rank{r}.json").read_text()) for r in (0, 1)]
        for epoch in ("0", "1"):  # each rank: its own half of the 800 training images, each image once
            a, b = seen[0][epoch], seen[1][epoch]
            assert len(a) == len(set(a)) == len(b) == len(set(b)) == 400
            assert not set(a) & set(b) and set(a) | set(b) == set(range(800))
        assert seen[0]["0"] != seen[0]["1"]  # a new shuffle each epoch
    k1, auto = (tmp_path / str(k) for k in (1, "auto"))
    assert (summary(auto) | {"steps_per_execution": 0}) == (summary(k1) | {"steps_per_execution": 0})
    assert [summary(r)["steps_per_execution"] for r in (k1, auto)] == [1, 32]
    assert rows(auto) == rows(k1)
    assert [r["step"] for r in rows(k1) if r["val/loss"]] == ["9", "22"]  # after the 10th step of each epoch
    assert_same_state(auto, k1)

    # only rank 0 writes the run dir (the other rank writes only its own Hydra log)
    run = k1
    written = {p.name for p in run.iterdir()} - {"seen_rank0.json", "seen_rank1.json"}
    assert written == {".hydra", "checkpoints", "config.yaml", "hparams.yaml", "metrics.csv", "metrics.json",
                       "curves.png", "confusion_matrix.png", "samples.png", "train.log", "train_ddp_process_1.log"}

    # the metrics of the 2-process run equal a single-process evaluation of its checkpoint: the val
    # metrics that each rank computed on its half and synced, and the test metrics rank 0 computed
    metrics = json.loads((run / "metrics.json").read_text())
    model = Classifier.load_from_checkpoint(run / metrics["test_ckpt"])
    dm = MNISTDataModule.load_from_checkpoint(run / metrics["test_ckpt"], root=str(synthetic_root))
    dm.setup()
    for split, acc, loss in (("val", "best_val/acc", "best_val/loss"), ("test", "test/acc", "test/loss")):
        x, y = dm.splits[split]
        logits = predict(model, x)
        assert 0.1 < metrics[acc] < 0.95  # not a trivial 0 or 1
        assert metrics[acc] == pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-6), split
        assert metrics[loss] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5), split


# ---------------------------------------------------------------- bad input
def corrupt(root, case: str):
    """Damage one file of a synthetic dataset under ``root`` the way ``case`` says."""
    raw = root / "MNIST" / "raw"
    if case == "magic":
        f = raw / "train-images-idx3-ubyte"
        f.write_bytes(b"\x00\x00\x08\x01" + f.read_bytes()[4:])
    elif case == "truncated":
        f = raw / "t10k-images-idx3-ubyte"
        f.write_bytes(f.read_bytes()[:-100])
    elif case == "label_count":
        write_idx(raw / "train-labels-idx1-ubyte", synthetic_digits(99, 0)[1])
    elif case == "label_range":
        labels = synthetic_digits(100, 0)[1]
        labels[5] = 12
        write_idx(raw / "train-labels-idx1-ubyte", labels)


#: (overrides, how the data is damaged, exit code, what stderr says)
BAD_INPUT = [
    (["data.download=false"], "missing", 2, "MNIST not found: looked in"),
    ([], "magic", 2, "train-images-idx3-ubyte is not a whole IDX images file: 78416 bytes (torchvision: shape "
                     "'[100]' is invalid for input of size 78408)"),
    ([], "truncated", 2, "t10k-images-idx3-ubyte is not a whole IDX images file: 15596 bytes (torchvision: shape "
                         "'[20, 28, 28]' is invalid for input of size 15580)"),
    ([], "label_count", 2, "has 100 images but train-labels-idx1-ubyte has 99 labels"),
    ([], "label_range", 2, "has 1 labels outside 0-9 (e.g. 12); the file is corrupt"),
    (["data.dataset=cifar10"], None, 2, "unknown data.dataset='cifar10'; choose one of mnist, fashion_mnist, kmnist"),
    (["model=conv9"], None, 1, "Could not find 'model/conv9'"),
    (["data.fractions=[0.9,0.2,-0.1]"], None, 2, "must be three non-negative train/val/test fractions that sum to 1"),
    (["data.fractions=[0.7,0.2,0.2]"], None, 2, "that sum to 1 (sum is 1.1)"),
    (["model.dropout=1.0"], None, 2, "model.dropout=1.0 is outside [0, 1)"),
    (["model.dropout=-0.1"], None, 2, "model.dropout=-0.1 is outside [0, 1)"),
    (["data.batch_size=0"], None, 2, "data.batch_size=0 must be a positive integer"),
    (["model.depth=-1"], None, 2, "model.depth=-1"),
    (["model=depthwise_3k", "model.repeats=0"], None, 2, "model.repeats=0 must be a list, one entry per block, e.g. "
                                                         "model.repeats=[1,3]"),
    (["+aug=maybe"], None, 2, "aug/data.augment must be true or false, got 'maybe'"),
    (["hydra.run.dir={tmp}/a_file/run"], None, 2, "cannot write the run dir {tmp}/a_file/run: Not a directory"),
    (["optimizer.lr=-1"], None, 2, "optimizer: Invalid learning rate: -1 (fix the optimizer.* values"),
    (["seed=abc"], None, 2, "seed='abc' must be a non-negative integer, e.g. seed=42"),
    (["run_dir={tmp}/elsewhere"], None, 2, "run_dir={tmp}/elsewhere is filled in by mnist_lab.train; choose the"),
    (["model.nonsense=3"], None, 1, "Could not override 'model.nonsense'"),
    (["+model.nonsense=3"], None, 2, "model: ConvNet.__init__() got an unexpected keyword argument 'nonsense'"),
    *([] if torch.cuda.is_available() else  # Lightning's own error, in one line
      [(["trainer.accelerator=gpu"], None, 2, "trainer: No supported gpu backend found! (fix the trainer.*")]),
]


@pytest.fixture(scope="module")
def bad_input_answers(tmp_path_factory) -> list[tuple[Path, object]]:
    """Every case of BAD_INPUT on the train command line (its own data, damaged as the case says): its
    folder and the command's answer."""
    base, answers = tmp_path_factory.mktemp("bad_input"), []
    for i, (args, case, _, _) in enumerate(BAD_INPUT):
        tmp = base / str(i)
        root = write_synthetic_mnist(tmp / "data", n_train=100, n_test=20)
        if case == "missing":
            root = tmp / "nowhere"
        elif case:
            corrupt(root, case)
        (tmp / "a_file").write_text("a file, not a folder")
        args = [a.replace("{tmp}", str(tmp)) for a in args]
        if not any(a.startswith("hydra.run.dir") for a in args):
            args.append(f"hydra.run.dir={tmp / 'run'}")
        answers.append((tmp, train_cli([*args, "trainer.max_epochs=1", *QUIET], root, tmp)))
    return answers


@pytest.mark.parametrize("i", range(len(BAD_INPUT)), ids=[" ".join(c[0]) or c[1] for c in BAD_INPUT])
def test_bad_input_is_answered_before_training_with_one_line(i, bad_input_answers):
    _, _, code, message = BAD_INPUT[i]
    tmp, answer = bad_input_answers[i]
    assert answer.returncode == code, answer.stderr[-2000:]
    assert message.replace("{tmp}", str(tmp)) in answer.stderr
    assert "Traceback" not in answer.stderr
    if code == 2:
        assert answer.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp / "run" / "checkpoints").exists()  # nothing trained


def test_evaluate_and_predict_answer_a_wrong_checkpoint_with_one_line(reference_run, synthetic_root, tmp_path):
    ckpt = torch.load(reference_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["net"]["depth"] = 3  # conv2's weights, conv3's architecture
    torch.save(ckpt, tmp_path / "other_arch.ckpt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "digit.png").write_bytes(b"")
    cases = [
        ("other_arch.ckpt", "weights do not fit the architecture its config describes"),
        ("notes.txt", "is not a PyTorch checkpoint"),
        ("missing.ckpt", "does not exist"),
    ]
    commands = [(module, extra, name, message) for name, message in cases
                for module, extra in (("mnist_lab.evaluate", []),
                                      ("mnist_lab.predict", [f"inputs={tmp_path / 'digit.png'}"]))]
    for module, extra, name, message in commands:
        answer = cli(module, f"ckpt_path={tmp_path / name}", *extra, data_root=synthetic_root, cwd=tmp_path)
        assert answer.returncode == 2, (module, name, answer.stderr[-2000:])
        assert message in answer.stderr and "Traceback" not in answer.stderr, (module, name, answer.stderr)
