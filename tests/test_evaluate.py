"""Evaluation suite: perturbations, calibration, error analysis, evaluate and predict commands."""

import json
import math

import lightning as L
import pytest
import torch
from conftest import centroid, cli
from PIL import Image
from torchvision.transforms.v2.functional import resize

from mnist_lab import Classifier, MNISTDataModule, load_config, train
from mnist_lab.errors import ConfigError
from mnist_lab.evaluate import evaluate_checkpoint, evaluate_model
from mnist_lab.metrics import calibration, error_analysis, fit_temperature
from mnist_lab.predict import predict_files, to_mnist_form
from mnist_lab.transforms import perturb, to_unit

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blob(n=4):
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:12, 5:19] = 1.0
    x[:, :, 12:22, 15:19] = 0.6
    return x


# ---------------------------------------------------------------- perturbations
@pytest.mark.parametrize(("kind", "identity"), [("rotation", 0), ("translation", 0), ("zoom", 1.0),
                                                ("noise", 0.0), ("elastic", 0)])
def test_zero_strength_is_the_identity(kind, identity):
    x = blob()
    assert torch.allclose(perturb(x, kind, identity, gen()), x, atol=1e-5)


def test_90_degree_rotation_equals_rot90_in_the_drawn_direction():
    x = blob(16)
    out = perturb(x, "rotation", 90, gen(3))
    sign = torch.randint(0, 2, (16,), generator=gen(3)) * 2 - 1  # the signs perturb draws
    expected = torch.stack([torch.rot90(x[i], int(sign[i]), (-2, -1)) for i in range(16)])
    assert torch.allclose(out, expected, atol=1e-5)
    assert len(set(sign.tolist())) == 2  # both directions occur


@pytest.mark.parametrize("kind", ["rotation", "translation", "noise", "elastic"])
def test_perturbations_are_deterministic_for_a_seed(kind):
    x = blob(8)
    strength = {"rotation": 30, "translation": 3, "noise": 0.3, "elastic": 34}[kind]
    assert torch.equal(perturb(x, kind, strength, gen(1)), perturb(x, kind, strength, gen(1)))
    assert not torch.equal(perturb(x, kind, strength, gen(1)), perturb(x, kind, strength, gen(2)))


def test_translation_moves_every_digit_by_the_strength_in_pixels():
    moved = centroid(perturb(blob(64), "translation", 4, gen())) - centroid(blob(64))
    assert torch.allclose(moved.norm(dim=1), torch.full((64,), 4.0), atol=0.05)


def test_zoom_noise_and_elastic_strengths_mean_what_they_say():
    x = blob()
    assert float(perturb(x, "zoom", 1.5, gen()).sum() / x.sum()) == pytest.approx(1.5**2, rel=0.02)
    gray = torch.full((64, 1, 28, 28), 0.5)
    assert float((perturb(gray, "noise", 0.1, gen()) - gray).std()) == pytest.approx(0.1, rel=0.02)
    change = [float((perturb(x, "elastic", a, gen()) - x).abs().mean()) for a in (10, 20, 40)]
    assert change[0] < change[1] < change[2]


# ---------------------------------------------------------------- calibration, errors
def test_ece_and_nll_equal_a_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])  # confidence 0.9: 1 of 2 right; confidence 0.6: 2 of 2 right
    result = calibration(probs.log(), labels, n_bins=10)
    # ECE = sum over bins of (share of images) * |accuracy - confidence| = 0.5 * 0.4 + 0.5 * 0.4
    assert result["ece"] == pytest.approx(0.4, abs=1e-6)
    assert result["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.6)) / 4, abs=1e-6)
    filled = [b for b in result["bins"] if b["count"]]
    assert [(b["count"], b["accuracy"]) for b in filled] == [(2, 1.0), (2, 0.5)]
    assert [b["confidence"] for b in filled] == pytest.approx([0.6, 0.9])


def test_temperature_scaling_recovers_the_temperature_of_overconfident_logits():
    z = torch.randn(20000, 10, generator=gen()) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=gen(1)).flatten()  # calibrated at T = 1
    assert fit_temperature(3 * z, labels) == pytest.approx(3.0, rel=0.05)
    assert calibration(3 * z / 3, labels)["ece"] < calibration(3 * z, labels)["ece"]


def test_error_analysis_per_class_and_confused_pairs():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 1, 2, 0, 2])
    result = error_analysis(torch.nn.functional.one_hot(preds, 3).float(), labels)
    assert [c["recall"] for c in result["per_class"]] == pytest.approx([1 / 3, 1.0, 2 / 3])
    assert [c["precision"] for c in result["per_class"]] == pytest.approx([1 / 2, 2 / 4, 1.0])
    assert [c["support"] for c in result["per_class"]] == [3, 2, 3]
    assert result["confused_pairs"][0] == {"true": 0, "predicted": 1, "count": 2, "rate": pytest.approx(2 / 3)}
    assert result["confusion_normalized"][2] == pytest.approx([1 / 3, 0.0, 2 / 3])


# ---------------------------------------------------------------- evaluate a trained run
@pytest.fixture
def trained_run(fc_run):
    return fc_run


def test_train_runs_the_suite_and_evaluate_reproduces_its_test_metrics(trained_run, tmp_path):
    out, metrics = trained_run
    for name in ("evaluation.json", "robustness.json", "robustness.png", "calibration.png", "errors.png",
                 "predictions.png", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert 0.1 < metrics["test/acc"] < 1.0
    assert 0 <= metrics["robustness/mean"] <= 1 and "robustness/rotation_20" in metrics
    again = evaluate_checkpoint(out / metrics["test_ckpt"], tmp_path, seed=0)
    for key in ("test/acc", "test/loss", "test/f1_macro", "test/ece"):  # the checkpoint, rebuilt, in a new process' way
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert sum(map(sum, evaluation["confusion"])) == evaluation["n_test"] == 100
    robustness = json.loads((out / "robustness.json").read_text())["accuracy"]
    assert again["robustness"] == robustness  # same seed, same perturbed images, same numbers
    assert set(robustness) == {"rotation", "translation", "zoom", "noise", "elastic"}
    assert robustness["rotation"]["0"] == pytest.approx(metrics["test/acc"], abs=1e-6)


def test_evaluate_cli_on_a_run_dir(trained_run, tmp_path):
    out, metrics = trained_run
    proc = cli("mnist_lab.evaluate", f"run_dir={out}", f"output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"test/acc: {metrics['test/acc']:.4f}" in proc.stdout
    assert json.loads((tmp_path / "evaluation.json").read_text())["test/acc"] == pytest.approx(metrics["test/acc"])
    bad = cli("mnist_lab.evaluate", f"ckpt_path={out / 'metrics.json'}", cwd=tmp_path)
    assert bad.returncode == 2 and "is not a PyTorch checkpoint" in bad.stderr and "Traceback" not in bad.stderr
    for value, shown in (("maybe", "'maybe'"), ("1", "1")):  # not a boolean: one line, before any work
        bad = cli("mnist_lab.evaluate", f"run_dir={out}", f"output_dir={tmp_path / 'never'}", f"tta={value}")
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.strip() == f"error: tta must be true or false, got {shown} (e.g. tta=true)"
        assert not (tmp_path / "never").exists()


def test_robustness_of_a_model_on_the_same_seed_is_repeatable(trained_run):
    out, metrics = trained_run
    model = Classifier.load_from_checkpoint(out / metrics["test_ckpt"])
    dm = MNISTDataModule.load_from_checkpoint(out / metrics["test_ckpt"])
    small = {"rotation": [0, 30], "noise": [0.3]}
    first = evaluate_model(model, dm, perturbations=small, seed=5)["robustness"]
    assert first == evaluate_model(model, dm, perturbations=small, seed=5)["robustness"]
    assert first["rotation"]["0"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert first != evaluate_model(model, dm, perturbations=small, seed=6)["robustness"]  # the seed is used


def test_load_from_checkpoint_rejects_files_that_are_not_mnist_lab_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="not an mnist_lab checkpoint"):
        Classifier.load_from_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="does not describe its data"):
        MNISTDataModule.load_from_checkpoint(tmp_path / "other.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"net_config": {"depth": 2}}}, tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match="written by mnist_lab 0.1, .* retrain it"):
        Classifier.load_from_checkpoint(tmp_path / "old.ckpt")
    with pytest.raises(ConfigError, match="does not exist"):
        Classifier.load_from_checkpoint(tmp_path / "missing.ckpt")


# ---------------------------------------------------------------- predict on image files
def glyphs() -> torch.Tensor:
    """10 distinct 20x20 uint8 shapes, one per class."""
    g = torch.zeros(10, 20, 20)
    g[0, 2:18, 2:18] = 1
    g[0, 6:14, 6:14] = 0           # ring
    g[1, :, 8:12] = 1              # vertical bar
    g[2, 8:12, :] = 1              # horizontal bar
    g[3, :, 8:12] = 1
    g[3, 8:12, :] = 1              # plus
    g[4, :, 2:6] = 1
    g[4, 14:, :] = 1               # L
    g[5, :4, :] = 1
    g[5, :, 8:12] = 1              # T
    g[6, 4:16, 4:16] = 1           # filled square
    g[7, :, 2:6] = 1
    g[7, :, 14:18] = 1             # two bars
    for i in range(20):
        g[8, i, i // 2: 20 - i // 2] = 1   # triangle
        g[9, i, max(0, i - 2): i + 3] = 1  # diagonal
    return (g * 255).to(torch.uint8)


def template_checkpoint(synthetic_root, path):
    """A real Lightning checkpoint of a linear classifier whose weights are the glyphs' MNIST forms."""
    dm = MNISTDataModule(root=synthetic_root)
    dm.setup()
    templates = ((to_unit(torch.stack([to_mnist_form(g) for g in glyphs()])) - dm.mean) / dm.std).flatten(1)
    model = Classifier({"_target_": "mnist_lab.models.ConvNet", "depth": 0, "dense_units": 0, "name": "templates"})
    with torch.no_grad():
        model.net.head[0].weight.copy_(templates / templates.norm(dim=1, keepdim=True))
        model.net.head[0].bias.zero_()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)  # no step: the model takes the datamodule's mean and std
    trainer.save_checkpoint(path)
    return path


def write_png(image: torch.Tensor, path: str) -> None:
    """uint8 (C, H, W) -> PNG file, through Pillow."""
    array = image.permute(1, 2, 0).squeeze(-1).numpy()
    Image.fromarray(array).save(path)


def write_variants(folder):
    """Each glyph as a 28x28 light-on-dark PNG and as a large off-centre dark-on-light RGB PNG."""
    for c, g in enumerate(glyphs()):
        small = torch.zeros(1, 28, 28, dtype=torch.uint8)
        small[:, 4:24, 4:24] = g
        write_png(small, str(folder / f"mnist_{c}.png"))
        big = resize(g[None].float(), [60, 60], antialias=True)
        canvas = torch.zeros(1, 90, 110)
        canvas[:, 5:65, 40:100] = big
        write_png((230 - 0.8 * canvas).clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous(),
                  str(folder / f"paper_{c}.png"))
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    (folder / "empty.png").write_bytes(b"")
    write_png(torch.full((1, 28, 28), 200, dtype=torch.uint8), str(folder / "blank.png"))


def test_predict_classifies_image_files_in_any_form_and_reports_bad_files(synthetic_root, tmp_path):
    ckpt = template_checkpoint(synthetic_root, tmp_path / "templates.ckpt")
    digits = tmp_path / "digits"
    digits.mkdir()
    write_variants(digits)
    model = Classifier.load_from_checkpoint(ckpt)
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in predict_files(model, sorted(digits.iterdir()))}
    for c in range(10):
        for form in ("mnist", "paper"):
            assert rows[f"{form}_{c}.png"]["prediction"] == c, (form, c, rows[f"{form}_{c}.png"])
    assert "not an image file Pillow can decode" in rows["broken.png"]["error"]
    assert rows["empty.png"]["error"] == "empty file (0 bytes)"
    assert "blank" in rows["blank.png"]["error"] and rows["blank.png"]["prediction"] is None

    proc = cli("mnist_lab.predict", f"ckpt_path={ckpt}", f"inputs={digits}", f"output_csv={tmp_path / 'p.csv'}",
               cwd=tmp_path)  # a folder: the files in it
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0].rsplit("/", 1)[-1]: line for line in proc.stdout.splitlines() if ".png" in line}
    assert lines["paper_7.png"].split()[1] == "7" and "error: empty file" in lines["empty.png"]
    assert "3 of 23 files could not be classified" in proc.stderr
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 24
    # none classified: the table says why for each file, then one error line and exit code 2
    bad = cli("mnist_lab.predict", f"ckpt_path={ckpt}", f"inputs=[{digits / 'broken.png'},{digits / 'empty.png'}]",
              cwd=tmp_path)
    assert bad.returncode == 2 and "error: empty file" in bad.stdout
    assert bad.stderr.strip().splitlines()[-1].startswith("error: none of the 2 files could be classified")


def test_evaluate_several_checkpoints_reports_each_and_their_ensemble(synthetic_root, tmp_path):
    runs = []
    for seed in (0, 1, 2):
        cfg = load_config(["model=fc", f"data.root={synthetic_root}", "trainer.max_epochs=1", "plots=false",
                           "trainer.limit_train_batches=3", "eval.full=false", f"seed={seed}", *QUIET])
        train(cfg, tmp_path / f"seed{seed}")
        runs.append(tmp_path / f"seed{seed}")
    proc = cli("mnist_lab.evaluate", f"run_dir=[{','.join(map(str, runs))}]", f"output_dir={tmp_path / 'ens'}",
               data_root=synthetic_root, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    # by hand: the mean of the three models' softmax probabilities on the 100 test images
    dm = MNISTDataModule(root=synthetic_root)
    dm.setup()
    x, y = dm.splits["test"]
    with torch.no_grad():
        probs = [Classifier.load_from_checkpoint(r / "checkpoints" / "best.ckpt").eval()(to_unit(x)).softmax(1)
                 for r in runs]
    mean = torch.stack(probs).mean(0)
    assert result["ensemble"]["test/acc"] == pytest.approx(float((mean.argmax(1) == y).float().mean()), abs=1e-6)
    assert result["ensemble"]["test/nll"] == pytest.approx(float(-mean[torch.arange(100), y].log().mean()), rel=1e-5)
    for member, run in zip(result["members"], runs):
        assert member["test/acc"] == pytest.approx(json.loads((run / "metrics.json").read_text())["test/acc"])
    assert len({m["test/acc"] for m in result["members"]}) > 1  # three different models
    assert f"ensemble of 3 (mean probabilities)  test/acc: {result['ensemble']['test/acc']:.4f}" in proc.stdout
