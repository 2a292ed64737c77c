"""training/: data, objective, resume, calibration, evaluation and the CLI end to end, on tiny
synthetic data (CPU, seconds)."""

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.data
import training.train
from models.core.checkpoint import load_checkpoint, read_manifest, write_manifest
from models.engines.compact import compact
from models.networks.densenet import ACSDenseNet, DenseNetConfig
from tests.conftest import randomize_bn
from training.calibrate import calibrate
from training.cli import main
from training.config import TrainConfig, load_splits
from training.data import (
    augment,
    epoch_order,
    holdout_split,
    load_dataset,
    normalize,
    subset,
)
from training.evaluate import EVAL_JSON, EVAL_MD, PLOT, evaluate, measure, write_report
from training.objective import CostModel, Objective, Pass, sandwich_passes
from training.state import CHECKPOINT, read_progress
from training.train import train

ROOT = Path(__file__).resolve().parents[2]

CLASSES = ["circle", "square", "stripes"]
TINY = {"growth": 8, "bn_size": 2, "init_features": 8, "blocks": [2, 2], "gate": "cheap"}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_model(gate="cheap") -> ACSDenseNet:
    return ACSDenseNet(DenseNetConfig(num_classes=3, growth=8, bn_size=2, init_features=8, blocks=(2, 2),
                                      gate=gate, input_size=16))


def write_folders(root, per_class=(16, 6), size=16, seed=0):
    """train/<class>/*.png and test/<class>/*.png: noisy images whose class sets a channel."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
                image[..., c] += 120
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("data") / "synthetic")


def tiny_config(folders, run, **kw) -> TrainConfig:
    settings = dict(data=str(folders), run=str(run), arch="densenet", model_config=TINY, image_size=16,
                    calib_fraction=0.25, epochs=2, batch_size=12, workers=1, device="cpu")
    return TrainConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    """A tiny run trained for two epochs, and its splits."""
    cfg = tiny_config(folders, tmp_path_factory.mktemp("runs") / "tiny")
    return train(cfg).eval(), load_splits(cfg)


# --- data -----------------------------------------------------------------------------------

def test_image_folders_decode_once_and_reuse_the_cache(folders, tmp_path, monkeypatch):
    cache = tmp_path / "cache.safetensors"
    data = load_dataset(folders, cache, image_size=16, workers=1)
    assert data.classes == CLASSES
    assert data.train_x.shape == (48, 3, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (18, 3, 16, 16)
    assert data.train_y.tolist() == [0] * 16 + [1] * 16 + [2] * 16
    first = Image.open(folders / "train" / "square" / "0000.png")
    assert torch.equal(data.train_x[16], torch.from_numpy(np.array(first)).permute(2, 0, 1))
    assert data.mean[1] > data.mean[0] - 0.1 and all(0 < s < 1 for s in data.std)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(training.data, "decode_image_folders", no_decoding)
    again = load_dataset(folders, cache, image_size=16)
    assert torch.equal(again.train_x, data.train_x) and again.classes == CLASSES
    assert torch.equal(load_dataset(cache).test_y, data.test_y)  # the cache file as the source
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(folders, cache, image_size=24)  # another size is another cache


def test_changed_source_is_decoded_again(tmp_path):
    root = write_folders(tmp_path / "d", per_class=(2, 1))
    cache = tmp_path / "c.safetensors"
    assert len(load_dataset(root, cache, 16).train_y) == 6
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "train" / "circle" / "extra.jpg")
    data = load_dataset(root, cache, 16)
    assert len(data.train_y) == 7
    assert data.train_x[2].shape == (3, 16, 16)  # resized and center-cropped
    assert data.train_x[2, 0].min() > 200


def test_cifar_python_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(10)]
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 4).tolist()}
        written[name] = batch
        with open(root / name, "wb") as f:  # the dataset's own (pickle) format
            pickle.dump(batch, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
    data = load_dataset(tmp_path, tmp_path / "cifar.safetensors")  # the parent folder works too
    assert data.classes == names
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    pixels = written["data_batch_2"][b"data"][1]
    assert torch.equal(data.train_x[5, 1, 0], torch.from_numpy(pixels[1024:1056]))  # green, first row
    assert data.test_y.tolist() == written["test_batch"][b"labels"]


def test_calibration_split_is_held_out_of_train_and_never_the_test_split(folders):
    cfg = tiny_config(folders, "unused")
    splits = load_splits(cfg)
    train_idx, calib = splits.train, splits.calibration
    assert len(set(train_idx.tolist()) & set(calib.tolist())) == 0
    assert len(train_idx) + len(calib) == len(splits.data.train_y)
    assert torch.bincount(splits.data.train_y[calib]).tolist() == [4, 4, 4]  # stratified
    test_images = {bytes(x.flatten().tolist()) for x in splits.data.test_x}
    assert not any(bytes(x.flatten().tolist()) in test_images for x in splits.data.train_x[calib])
    again, _ = holdout_split(splits.data.train_y, 0.25, cfg.seed)
    assert torch.equal(again, train_idx)  # the same split for every command of a run
    assert len(subset(train_idx, 5, 0)) == 5


def test_epoch_order_shards_ranks_and_drops_the_last_partial_batch():
    one = epoch_order(50, 8, seed=1, epoch=3)
    assert len(one) == 6 and all(len(b) == 8 for b in one)
    assert len(set(torch.cat(one).tolist())) == 48
    r0, r1 = epoch_order(50, 8, 1, 3, 0, 2), epoch_order(50, 8, 1, 3, 1, 2)
    assert len(r0) == len(r1) == 6 and all(len(b) == 4 for b in r0)
    assert not set(torch.cat(r0).tolist()) & set(torch.cat(r1).tolist())
    assert not torch.equal(torch.cat(one), torch.cat(epoch_order(50, 8, 1, 4)))


def test_augment_crops_and_flips_on_the_device():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0), pad=0)
    flipped = (out == images.flip(3)).flatten(1).all(1)
    same = (out == images).flatten(1).all(1)
    assert (flipped | same).all() and 10 < flipped.sum() < 54
    out = augment(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(0), pad=2))
    x = normalize(images, MEAN, STD)
    assert x.dtype == torch.float32 and x.min() >= -2 and x.max() <= 2


# --- objective ------------------------------------------------------------------------------

def budgets_of(passes: list[Pass]) -> list[float]:
    return [p.budget for p in passes]


def test_budget_sampling_has_full_floor_and_random_budgets():
    g = torch.Generator().manual_seed(0)
    passes = sandwich_passes(0.2, 3, g)
    budgets = budgets_of(passes)
    assert budgets[:2] == [1.0, 0.2] and len(budgets) == 5
    assert all(0.2 <= b <= 1.0 for b in budgets[2:])
    assert all(b >= 0.5 for b in budgets_of(sandwich_passes(0.2, 20, g, low=0.5))[2:])
    assert budgets_of(sandwich_passes(1.0, 3, g)) == [1.0]  # a dense network
    assert [p.kind for p in passes] == ["full", "floor", "random", "random", "random"]
    assert [p.teaches for p in passes] == [True, False, False, False, False]
    assert [p.gates_learn for p in passes] == [False, False, True, True, True]


def test_cost_term_reaches_the_gates_and_moves_the_executed_ratio_to_the_target():
    model = tiny_model().train()
    cost = CostModel(model)
    assert all(w > 0 for w in cost.per_channel)
    objective = Objective(cost, cost_weight=10.0, dg_weight=0.0)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))
    logits, info = model(x, budget=0.5, return_info=True)
    ratio = cost.ratio(info)
    assert torch.allclose(ratio.detach(), info.cost.ratio.float())  # the exact executed ratio
    (ratio.mean() - 0.5).square().backward()
    assert model.layers()[0].gate.fc.bias.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None  # only through the gates

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gaps = []
    for _ in range(15):
        logits, info = model(x, budget=0.5, return_info=True)
        loss, parts = objective(model, logits, info, labels=y)
        gaps.append(abs(float(parts["ratio"]) - 0.5))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gaps[0] > 0.3 and gaps[-1] < gaps[0] - 0.15


def test_dgconv_regularizer_is_in_the_first_pass_only():
    from models.networks.resnext import GResNeXt, ResNeXtConfig
    model = GResNeXt(ResNeXtConfig(num_classes=3, layers=(1, 1), widths=(8, 16), stem_channels=8,
                                   gate="cheap", input_size=16)).train()
    objective = Objective(CostModel(model), cost_weight=0.0, dg_weight=1.0)
    logits, info = model(torch.randn(4, 3, 16, 16), budget=1.0, return_info=True)
    y = torch.zeros(4, dtype=torch.long)
    plain, _ = objective(model, logits, info, labels=y)
    with_reg, _ = objective(model, logits, info, labels=y, regularize=True)
    assert (with_reg - plain).item() == pytest.approx(model.regularizer().item())
    with_reg.backward()
    assert model.blocks[0].conv2.gate.grad.abs().sum() > 0


# --- training -------------------------------------------------------------------------------

def test_resume_continues_at_the_right_epoch_with_identical_state(folders, tmp_path, monkeypatch):
    straight = train(tiny_config(folders, tmp_path / "straight", epochs=2))
    steps = read_progress(tmp_path / "straight")["step"]
    assert steps == 2 * (36 // 12)

    save = training.train.save_state

    def interrupted(run, model, optimizer, progress, extra=None):
        save(run, model, optimizer, progress, extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(training.train, "save_state", interrupted)
    cfg = tiny_config(folders, tmp_path / "resumed", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    progress = read_progress(tmp_path / "resumed")
    assert (progress["epoch"], progress["step"]) == (1, steps // 2)
    monkeypatch.setattr(training.train, "save_state", save)
    resumed = train(cfg, resume=True)
    progress = read_progress(tmp_path / "resumed")
    assert (progress["epoch"], progress["step"]) == (2, steps)
    assert [h["epoch"] for h in progress["history"]] == [1, 2]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        train(cfg)  # never overwrites a run


def test_resume_within_an_epoch_matches_an_uninterrupted_run(folders, tmp_path, monkeypatch):
    settings = dict(epochs=2, budget_schedule="per-sample", lookahead=True, flip="alternate")
    straight = train(tiny_config(folders, tmp_path / "straight", **settings))
    save, calls = training.train.save_state, []

    def interrupted(run, model, optimizer, progress, extra=None):
        save(run, model, optimizer, progress, extra)
        calls.append(progress)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.train, "save_state", interrupted)
    cfg = tiny_config(folders, tmp_path / "resumed", checkpoint_minutes=0, **settings)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    progress = read_progress(tmp_path / "resumed")
    assert (progress["epoch"], progress["step"], progress["batch"]) == (0, 2, 2)  # 3 batches an epoch
    monkeypatch.setattr(training.train, "save_state", save)
    resumed = train(cfg, resume=True)
    progress = read_progress(tmp_path / "resumed")
    assert (progress["epoch"], progress["step"], "batch" in progress) == (2, 6, False)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dense_baseline_trains_with_the_same_code(folders, tmp_path):
    cfg = tiny_config(folders, tmp_path / "dense", epochs=1, model_config={**TINY, "gate": None})
    model = train(cfg)
    assert not model.gated
    history = read_progress(tmp_path / "dense")["history"]
    assert history[0]["ratio"] == 1.0 and "val_top1@1.0" in history[0]
    assert main(["calibrate", "--run", str(tmp_path / "dense")]) == 0
    assert main(["export", "--run", str(tmp_path / "dense"), "--out", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| dense MACs |" in card and "floor" not in card and "cost weight" not in card


# --- calibration and evaluation -------------------------------------------------------------

def test_calibration_is_monotone_and_tracks_the_budget():
    torch.manual_seed(1)
    model = randomize_bn(tiny_model()).eval()
    for layer in model.layers():  # spread the gate scores as a trained gate would
        torch.nn.init.normal_(layer.gate.fc.weight)
        torch.nn.init.normal_(layer.gate.fc.bias)
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    labels = torch.zeros(48, dtype=torch.long)
    table = calibrate(model, images, MEAN, STD, step=0.1, iterations=9)
    assert table.source == "closed-loop" and table.budgets[0] == pytest.approx(model.floor())
    assert all(t2 <= t1 for t1, t2 in zip(table.taus, table.taus[1:], strict=False))
    assert all(c <= d for r1, r2 in zip(table.counts, table.counts[1:], strict=False)
               for c, d in zip(r1, r2, strict=True))
    model.table = table
    everything = measure(model, images, labels, 1.0, "threshold", MEAN, STD)[1]
    for budget, counts in zip(table.budgets, table.counts, strict=True):
        ratio = measure(model, images, labels, budget, "threshold", MEAN, STD)[1].mean().item()
        assert ratio <= budget + 1e-6
        assert ratio >= min(budget, everything.mean().item()) - 0.03
        assert model.count_cost(counts).ratio[0] <= budget + 1e-9
        topk = measure(model, images, labels, budget, "topk", MEAN, STD)[1]
        assert torch.allclose(topk, model.count_cost(counts).ratio[0])  # its own row, float32 or not
        assert (topk <= budget + 1e-9).all()


def test_calibration_keeps_low_budgets_within_them_when_gates_saturate():
    """A gate whose score is exactly 1.0 passes tau = 1.0, so budgets that even tau = 1.0
    overspends get a threshold above 1 (every gate closed: the floor)."""
    torch.manual_seed(1)
    model = randomize_bn(tiny_model()).eval()
    with torch.no_grad():
        model.layers()[0].gate.fc.bias.fill_(50.0)  # its scores: exactly 1.0
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    labels = torch.zeros(16, dtype=torch.long)
    table = calibrate(model, images, MEAN, STD, step=0.1, iterations=3)
    assert table.taus[0] > 1.0
    model.table = table
    for budget in table.budgets:
        ratio = measure(model, images, labels, budget, "threshold", MEAN, STD)[1].mean().item()
        assert ratio <= budget + 1e-6


def test_evaluation_writes_json_markdown_and_plot(trained, tmp_path):
    model, splits = trained
    data = splits.data
    result = evaluate(model, data.test_x, data.test_y, data.mean, data.std, budgets=[0.3, 1.0])
    assert len(result["rows"]) == 6 and result["images"] == 18
    row = result["rows"][0]
    assert row["policy"] == "threshold" and 0 <= row["top1"] <= 1
    assert row["ratio_mean"] <= row["ratio_p95"] <= row["ratio_max"] <= 1.01
    write_report(result, tmp_path, "tiny")
    assert json.loads((tmp_path / EVAL_JSON).read_text())["rows"] == result["rows"]
    assert (tmp_path / EVAL_MD).read_text().count("\n| topk |") == 2
    assert (tmp_path / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the CLI, end to end --------------------------------------------------------------------

def test_cli_smoke_prepare_train_calibrate_evaluate_export_load_predict(folders, tmp_path, capsys):
    started = time.time()
    cache = tmp_path / "cache.safetensors"
    run, out = tmp_path / "runs" / "smoke", tmp_path / "weights" / "smoke"
    assert main(["prepare", "--data", str(folders), "--cache", str(cache), "--image-size", "16",
                 "--workers", "1"]) == 0
    assert main(["train", "--data", str(folders), "--cache", str(cache), "--run", str(run),
                 "--arch", "densenet", "--recipe", "default", "--config", json.dumps(TINY),
                 "--image-size", "16",
                 "--calib-fraction", "0.25", "--limit", "24", "--epochs", "2", "--batch-size", "8",
                 "--random-budgets", "1", "--device", "cpu", "--dataset-name", "synthetic"]) == 0
    assert (run / CHECKPOINT).is_file()
    assert main(["calibrate", "--run", str(run), "--step", "0.1", "--iterations", "8",
                 "--bn-check"]) == 0
    assert main(["evaluate", "--run", str(run), "--budgets", "0.2", "0.5", "1.0"]) == 0
    assert main(["export", "--run", str(run), "--out", str(out), "--default-budget", "0.5",
                 "--default-policy", "cap", "--serve-default"]) == 0
    assert "exported" in capsys.readouterr().out

    ckpt = load_checkpoint(out)
    manifest = ckpt.manifest
    assert manifest["name"] == "smoke" and manifest["classes"] == CLASSES
    assert manifest["calibration"]["source"] == "closed-loop"
    assert "bn_per_budget" in manifest["calibration"]["extra"]
    assert len(manifest["accuracy"]) == 9
    assert manifest["provenance"]["dataset"] == "synthetic" and manifest["provenance"]["epochs"] == 2
    assert manifest["default"] == {"budget": 0.5, "policy": "cap"} and manifest["serve_default"]
    train = manifest["provenance"]["train"]
    assert (train["run"], train["cache"]) == ("smoke", "cache.safetensors")  # no machine paths
    card = (out / "README.md").read_text()
    assert "| threshold | 0.5 |" in card and PLOT in card
    assert "the 2 epochs' clocks sum to" in card and "train " in card  # logged and epoch clocks
    assert main(["precision", "--weights", str(out), "--data", str(cache), "--budgets", "1.0", "0.5",
                 "--policies", "threshold", "cap"]) == 0
    measured = read_manifest(out)["dtypes"]["bfloat16"]
    assert [(r["policy"], r["budget"]) for r in measured["rows"]] == [
        ("threshold", 1.0), ("threshold", 0.5), ("cap", 1.0), ("cap", 0.5)]
    drops = [r["float32"] - r["bfloat16"] for r in measured["rows"]]
    assert measured["top1_drop_max"] == pytest.approx(max(drops))
    assert (out / "README.md").read_text().count("## Serving precision") == 1
    load_checkpoint(out)  # the manifest stays valid
    assert (out / PLOT).is_file() and (out / EVAL_JSON).is_file()

    data = load_dataset(cache)
    x = normalize(data.test_x[:5], manifest["input"]["mean"], manifest["input"]["std"])
    with torch.no_grad():
        logits = ckpt.model(x, budget=0.5)
        assert logits.shape == (5, 3)
        assert torch.allclose(compact(ckpt.model)(x, budget=0.5), logits, atol=1e-4)
    assert time.time() - started < 60


def test_cli_resume_refuses_to_change_the_recipe(folders, tmp_path, capsys):
    run = tmp_path / "r"
    args = ["train", "--data", str(folders), "--run", str(run), "--arch", "densenet", "--recipe", "default",
            "--config", json.dumps(TINY), "--image-size", "16", "--epochs", "1", "--batch-size", "12",
            "--device", "cpu"]
    assert main(args) == 0
    assert main(["train", "--run", str(run), "--resume", "--lr", "0.5"]) == 2  # one line, exit 2
    assert "cannot change ['lr']" in capsys.readouterr().err
    assert main(["train", "--run", str(run), "--resume", "--epochs", "2"]) == 0
    assert read_progress(run)["epoch"] == 2


@pytest.mark.parametrize("drop,says,not_says", [
    (-0.0003, ["negative: bfloat16 scored higher", "serves bfloat16"], ["float32."]),
    (0.0013, ["0.13 points: more than 0.1 point, so `dtype=auto` serves float32."], ["negative"]),
])
def test_precision_card_says_what_auto_serves(drop, says, not_says):
    from training.precision import card_section

    row = {"policy": "threshold", "budget": 1.0, "float32": 0.7, "bfloat16": 0.7 - drop, "drop": drop}
    text = card_section({"images": 100, "top1_drop_max": drop, "rows": [row]})
    assert all(s in text for s in says) and not any(s in text for s in not_says)


def test_cli_defaults_train_a_folder_without_a_test_split(tmp_path, capsys):
    """A newcomer's folder: <class>/ folders only, the default model family and recipe, the
    export inside the run (never the tracked weights/)."""
    data = (write_folders(tmp_path / "split") / "train").rename(tmp_path / "photos")  # <class>/*.png
    run = tmp_path / "runs" / "mine"
    assert main(["all", "--data", str(data), "--run", str(run), "--image-size", "16", "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu", "--workers", "1", "--budgets", "1.0"]) == 0
    captured = capsys.readouterr()
    assert "no test/ folder: holding out 6 of the 48 images" in captured.err
    manifest = read_manifest(run / "weights" / "mine")
    train = manifest["provenance"]["train"]
    assert train["arch"] == "acs_ranked_fastnet" and train["recipe"] == "fast"
    assert manifest["provenance"]["evaluation"]["images"] == 6
    assert not (ROOT / "weights" / "mine").exists()


@pytest.mark.parametrize("argv,says", [
    (["train", "--data", "/no/such/folder", "--run", "{tmp}/r"], "/no/such/folder"),
    (["train", "--run", "{tmp}/r"], "--data is required"),
    (["evaluate", "--run", "{tmp}/missing"], "missing"),
])
def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, says):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err


def test_topk_counts_leave_no_layer_starved_while_another_fills():
    """The per-layer counts of topk/cap follow the threshold policy's spending at every budget:
    layers it uses alike get counts within a couple of groups of each other (filling whichever
    layer still fit gave cheap layers all their channels and costly ones none)."""
    from models.core.budget import budget_grid
    from training.calibrate import fitted_counts

    model = ACSDenseNet(DenseNetConfig(num_classes=3, growth=8, bn_size=2, init_features=8, blocks=(3, 3),
                                       gate="cheap", input_size=16)).eval()
    totals = model.gated_totals()
    kept = torch.tensor([0.4 * t for t in totals], dtype=torch.float64)
    counts = [0] * len(totals)
    for budget in budget_grid(model.floor(), 0.05):
        previous, counts = counts, fitted_counts(model, kept, budget, counts)
        assert float(model.budget_ratio(model.count_cost(counts))[0]) <= budget + 1e-9
        assert all(c >= p for c, p in zip(counts, previous, strict=True))  # monotone
        assert max(counts) - min(counts) <= 2, (budget, counts)


def test_cli_recalibrates_an_exported_checkpoint_in_place(folders, tmp_path):
    from models.core.checkpoint import save_checkpoint

    out = tmp_path / "weights" / "tiny"
    config = {**TINY, "blocks": tuple(TINY["blocks"]), "num_classes": 3, "input_size": 16}
    model = randomize_bn(ACSDenseNet(DenseNetConfig(**config))).eval()
    save_checkpoint(model, out, name="tiny", classes=CLASSES,
                    provenance={"train": {"calib_fraction": 0.25, "seed": 0}},
                    accuracy=[{"policy": "threshold", "budget": 1.0, "top1": 0.5}])
    (out / "README.md").write_text("# tiny\n\n## Accuracy and executed MACs on the test split (3 images)\n\n"
                                   "old table\n\n## Use\n\nkept\n")
    assert main(["recalibrate", "--weights", str(out), "--data", str(folders), "--budgets", "0.5", "1.0",
                 "--limit", "8"]) == 0
    manifest = read_manifest(out)
    assert {(r["policy"], r["budget"]) for r in manifest["accuracy"]} == {
        (p, b) for p in ("threshold", "topk", "cap") for b in (0.5, 1.0)}
    assert manifest["calibration"]["source"] == "closed-loop"
    assert manifest["provenance"]["calibration"]["images"] == 8
    card = (out / "README.md").read_text()
    assert "old table" not in card and "| topk | 0.5 |" in card and "## Use\n\nkept" in card
    load_checkpoint(out)  # still valid


def test_cli_recalibrate_counts_only_keeps_thresholds_and_their_rows(folders, tmp_path):
    """--counts-only: the thresholds and the threshold rows stay; topk/cap counts are fitted
    again (a table whose counts starve every layer gets real ones) and those policies measured."""
    from models.core.budget import CalibrationTable
    from models.core.checkpoint import save_checkpoint

    out = tmp_path / "weights" / "tiny"
    config = {**TINY, "blocks": tuple(TINY["blocks"]), "num_classes": 3, "input_size": 16}
    model = randomize_bn(ACSDenseNet(DenseNetConfig(**config))).eval()
    table = model.uniform_table()
    model.table = CalibrationTable(table.budgets, table.taus, [[0] * len(c) for c in table.counts],
                                   table.floor, "closed-loop")
    row = {"policy": "threshold", "budget": 1.0, "top1": 0.123, "ratio_mean": 0.9, "ratio_p95": 0.9,
           "ratio_max": 0.9, "mmacs_mean": 1.0, "mmacs_p95": 1.0, "mmacs_max": 1.0}
    save_checkpoint(model, out, name="tiny", classes=CLASSES,
                    provenance={"train": {"calib_fraction": 0.25, "seed": 0},
                                "evaluation": {"split": "test", "images": 18}}, accuracy=[row])
    argv = ["recalibrate", "--weights", str(out), "--data", str(folders), "--budgets", "0.5", "1.0",
            "--limit", "8", "--counts-only"]
    assert main(argv) == 0
    manifest = read_manifest(out)
    assert manifest["accuracy"][0] == row
    assert {(r["policy"], r["budget"]) for r in manifest["accuracy"][1:]} == {
        (p, b) for p in ("topk", "cap") for b in (0.5, 1.0)}
    assert manifest["calibration"]["taus"] == table.taus
    assert manifest["calibration"]["counts"][-1] != manifest["calibration"]["counts"][0]
    manifest["provenance"]["evaluation"]["images"] = 5
    write_manifest(out, manifest)
    assert main(argv) == 2  # the kept rows came from another number of test images
