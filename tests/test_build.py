"""The build pipeline: local dataset formats and their errors, and a tiny end-to-end `branched build`."""
import csv
import json
import math
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from branched.artifact import load_model
from branched.cli import main
from branched.build.datasets import load_dataset, load_splits
from branched.errors import DataError
from branched.routing import thresholds_for_budget


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- data errors
@pytest.mark.parametrize("name,expected", [("cifar10", "cifar-10-batches-py"), ("svhn", "train_32x32.mat"),
                                           ("imagefolder", "<class name>")])
def test_missing_data_is_a_one_line_error_naming_what_is_expected(tmp_path, capsys, name, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (None, str(tmp_path / "nowhere"), str(empty)):
        args = ["build", "--out", str(tmp_path / "m"), "--dataset", name] + (["--data-root", root] if root else [])
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("branched: error:")
        assert expected in err and (root is None or root in err)
    assert not (tmp_path / "m").exists()


def test_corrupted_cifar_files_are_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
              "batches.meta"]:
        (folder / f).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="corrupted or not the python version"):
        load_dataset("cifar10", str(tmp_path))
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="lacks test_batch"):
        load_dataset("cifar10", str(folder))  # the batches folder itself is accepted as the root


def test_unknown_dataset_lists_the_known_ones(tmp_path, capsys):
    code, _, err = run_cli(capsys, "build", "--out", str(tmp_path / "m"), "--dataset", "imagenet22k")
    assert code == 2 and "mnist5k" in err and "cifar10" in err


@pytest.mark.parametrize("loss,p_value", [("harm", "paired"), ("net", "binomial")])
def test_a_p_value_that_does_not_fit_the_loss_is_a_one_line_error(tmp_path, capsys, loss, p_value):
    code, out, err = run_cli(capsys, "build", "--out", str(tmp_path / "m"), "--loss", loss, "--p-value", p_value)
    assert code == 2 and out == "" and err.count("\n") == 1 and f"--loss {loss} takes --p-value" in err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- torchvision's formats, read for real
def _skip_checksums(monkeypatch):
    # Our files are tiny stand-ins, so torchvision's MD5 check of the real archives cannot pass;
    # everything after it (torchvision's own reading of the format) runs unchanged.
    import torchvision.datasets.cifar as cifar_mod
    import torchvision.datasets.svhn as svhn_mod

    monkeypatch.setattr(cifar_mod, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(svhn_mod, "check_integrity", lambda *a, **k: True)


def test_cifar10_format_is_read_as_hwc_with_the_official_test_split(tmp_path, monkeypatch):
    _skip_checksums(monkeypatch)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 20)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    splits = load_splits("cifar10", str(tmp_path), seed=0)
    assert [len(splits[s]) for s in ("train", "calib", "test")] == [90, 10, 20]
    test = splits["test"]
    data, labels = batches["test_batch"]
    assert test.class_names[3] == "class3" and test.labels.tolist() == labels
    img = np.asarray(test.images[0])
    assert img.shape == (32, 32, 3)
    assert np.array_equal(img[..., 0].ravel(), data[0, :1024])  # CIFAR stores the red plane first
    assert len(splits["train"].mean) == 3


def test_svhn_format_maps_label_10_to_0(tmp_path, monkeypatch):
    from scipy.io import savemat

    _skip_checksums(monkeypatch)
    rng = np.random.default_rng(1)
    for name, n in (("train_32x32.mat", 30), ("test_32x32.mat", 12)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0] = 10
        savemat(str(tmp_path / name), {"X": x, "y": y})
        if name.startswith("test"):
            test_x = x
    splits = load_splits("svhn", str(tmp_path))
    test = splits["test"]
    assert len(test) == 12 and test.labels[0] == 0 and set(test.labels.tolist()) <= set(range(10))
    assert np.array_equal(np.asarray(test.images[3]), test_x[:, :, :, 3])


def _tree(root, classes=("cat", "dog"), per_class=6, size=(12, 10)):
    rng = np.random.default_rng(2)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_trees_with_and_without_an_official_test_set(tmp_path):
    _tree(tmp_path / "flat")
    splits = load_splits("imagefolder", str(tmp_path / "flat"))
    assert sum(len(s) for s in splits.values()) == 12 and splits["train"].class_names == ["cat", "dog"]
    assert np.asarray(splits["train"].images[0]).shape == (12, 10, 3)
    _tree(tmp_path / "split" / "train", per_class=8)
    _tree(tmp_path / "split" / "test", per_class=3)
    splits = load_splits("imagefolder", str(tmp_path / "split"))
    assert len(splits["test"]) == 6 and len(splits["train"]) + len(splits["calib"]) == 16
    _tree(tmp_path / "bad" / "train")
    _tree(tmp_path / "bad" / "test", classes=("cat", "cow"))
    with pytest.raises(DataError, match="different class folders"):
        load_dataset("imagefolder", str(tmp_path / "bad"))


# ---------------------------------------------------------------- a tiny build, end to end
TINY = ["--backbone", "cifar_resnet20", "--epochs", "1", "--exit-epochs", "2", "--limit-train", "256", "--limit-calib", "300", "--limit-test",
        "200", "--input-size", "16", "--exits", "2", "--quiet"]


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "tiny"
    assert main(["build", "--out", str(out), "--max-drop", "0.05", *TINY]) == 0
    return out


def test_tiny_build_writes_a_complete_model_directory(tiny_build):
    for name in ("config.json", "weights.pt", "tradeoff.csv", "tradeoff.png", "build_report.json",
                 "checkpoints/backbone.pt"):
        assert (tiny_build / name).is_file(), name
    assert (tiny_build / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_model(str(tiny_build))
    meta = model.config.meta
    assert meta["dataset"] == "mnist5k" and meta["split_seed"] == 0 and "data_root" not in meta
    assert meta["training"]["backbone"]["source"] == "trained" and meta["training"]["exits"]["objective"] == "pteenet"
    cal = meta["calibration"]
    assert cal["budget"] == {"max_drop": 0.05} and cal["samples"] == 300
    # --policy auto: every policy scored on the path part, the best one stored as the model's.
    scores = cal["policy_selection"]["scores"]
    assert set(scores) == {"confidence", "max_softmax", "entropy"}
    assert cal["policy"] == model.config.policy and scores[cal["policy"]] == max(scores.values())
    assert model.config.thresholds == cal["thresholds"]
    assert len(cal["exit_rates"]) == model.num_exits and math.isclose(sum(cal["exit_rates"]), 1.0)
    assert "with probability >= 0.9" in cal["guarantee"]["statement"]
    test = cal["test"]
    assert test["samples"] == 200 and test["routing_matches_records"]
    assert test["guarantee_held"] == (test["drop"] <= cal["guarantee"]["drop_bound"] + 1e-12)


def test_a_build_certifies_the_net_drop_and_orders_exits_by_measured_head_time(tmp_path):
    """--loss net and --head-cost measured reach calibration from the command line: the guarantee names its loss,
    the report keeps both head costs, and the shipped cost is the FLOPs one the routed model reports."""
    out = tmp_path / "net"
    assert main(["build", "--out", str(out), "--max-drop", "0.05", "--loss", "net", "--head-cost", "measured",
                 "--keep-off-exits", *TINY]) == 0
    model = load_model(str(out))
    cal = model.config.meta["calibration"]
    assert cal["guarantee"]["loss_name"] == "net" and cal["guarantee"]["p_value"] == "paired"
    assert "paired difference" in cal["guarantee"]["loss"]
    heads = cal["head_costs"]
    assert heads["basis"] == "measured" and len(heads["measured"]) == len(heads["flops"]) == model.num_exits
    assert heads["flops"] == pytest.approx([f / model.cost.backbone_flops for f in model.cost.exit_flops])
    assert cal["test"]["routing_matches_records"]


def test_tiny_build_curve_and_csv_agree(tiny_build):
    model = load_model(str(tiny_build))
    curve = model.config.meta["calibration"]["curve"]
    assert curve and all(len(p["thresholds"]) == model.num_exits - 1 for p in curve)
    cheapest = min(p["cost_fraction"] for p in curve)
    assert len(thresholds_for_budget(model.config, max(cheapest, 0.5))) == model.num_exits - 1
    with open(tiny_build / "tradeoff.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["chosen"] for r in rows].count("1") == 1
    chosen = next(r for r in rows if r["chosen"] == "1")
    thr = [float(v) for k, v in sorted(chosen.items()) if k.startswith("threshold_")]
    # Exits the chosen point switches off are left out of the model; the others keep their thresholds.
    assert [t for t in thr if not math.isinf(t)] == pytest.approx(model.config.thresholds, rel=1e-5)
    assert float(rows[0]["calib_risk"]) == 0.0  # first row: every exit off


def test_evaluate_reads_what_build_wrote(tiny_build, capsys):
    code, out, _ = run_cli(capsys, "evaluate", str(tiny_build), "--json")
    assert code == 0
    result = json.loads(out)
    report = json.loads((tiny_build / "build_report.json").read_text())
    # evaluate uses the whole test split; the build measured the first 200 of the same split.
    assert result["samples"] == 1000 and result["thresholds"] == pytest.approx(report["calibration"]["thresholds"])


def test_exits_switched_off_are_left_out_and_cost_exactly_the_backbone(tiny_build, tmp_path, capsys):
    """A budget nothing can meet: every exit off, a model without exits (cost 1.000), and the build says
    what the budget would need."""
    out = tmp_path / "strict"
    os.makedirs(out / "checkpoints")
    for f in ("backbone.pt", "backbone.pt.json"):
        (out / "checkpoints" / f).write_bytes((tiny_build / "checkpoints" / f).read_bytes())
    code, stdout, _ = run_cli(capsys, "build", "--out", str(out), "--resume", "--max-drop", "0.001",
                              *[a for a in TINY if a != "--quiet"])
    assert code == 0 and "backbone_only" in stdout and "left out of the model" in stdout
    model = load_model(str(out))
    cal = model.config.meta["calibration"]
    assert model.num_exits == 1 and model.config.thresholds == [] and len(cal["dropped_exits"]) == 2
    assert cal["test"]["cost_fraction"] == 1.0 and cal["exit_rates"] == [1.0]
    assert "The cheapest point within it on the calibration data" in cal["message"] or \
        "No early-exit point stays within the budget" in cal["message"]
    code, result, _ = run_cli(capsys, "evaluate", str(out), "--json")
    assert code == 0 and json.loads(result)["cost_fraction"] == 1.0


def test_a_backbone_trained_on_another_split_is_refused_with_the_fix(tiny_build, tmp_path, capsys):
    """Calibrating on images the backbone learned would void the guarantee: the build says which fraction to use."""
    weights = tiny_build / "checkpoints" / "backbone.pt"
    code, _, err = run_cli(capsys, "build", "--out", str(tmp_path / "x"), "--weights", str(weights),
                           "--calib-fraction", "0.4", *TINY)
    assert code == 2 and "pass no --calib-fraction" in err and len(err.strip().splitlines()) == 1


def test_a_gated_model_slower_than_its_backbone_falls_back_to_plain_exits(tiny_build, tmp_path, capsys, monkeypatch):
    """LC-Net gates that do not pay on this machine: the build says so and ships exits on the plain backbone."""
    from branched.build import steps

    measured = []
    monkeypatch.setattr(steps, "measured_speedup", lambda model, x, **kw: measured.append(model.config.dynamic) or 0.88)
    out = tmp_path / "gated"
    os.makedirs(out / "checkpoints")
    for f in ("backbone.pt", "backbone.pt.json"):
        (out / "checkpoints" / f).write_bytes((tiny_build / "checkpoints" / f).read_bytes())
    code, stdout, _ = run_cli(capsys, "build", "--out", str(out), "--resume", "--dynamic", "layer", "--gate-epochs", "1",
                              "--max-drop", "0.05", *[a for a in TINY if a != "--quiet"])
    assert code == 0 and "runs at 0.88x its backbone here (slower)" in stdout
    assert measured and measured[0]["mode"] == "layer", "the gated model is the one measured"
    model = load_model(str(out))
    gates = model.config.meta["training"]["gates"]
    assert model.config.dynamic is None and gates["measured_speedup"] == 0.88 and "gates dropped" in gates["fallback"]


def test_sdn_exits_after_every_block_build_and_serve(tiny_build, tmp_path, capsys):
    out = tmp_path / "sdn"
    os.makedirs(out / "checkpoints")
    for f in ("backbone.pt", "backbone.pt.json"):
        (out / "checkpoints" / f).write_bytes((tiny_build / "checkpoints" / f).read_bytes())
    tiny = [a for a in TINY if a != "--quiet"]
    tiny[tiny.index("--exits") + 1] = "all"
    code, stdout, _ = run_cli(capsys, "build", "--out", str(out), "--resume", "--exit-kind", "sdn", "--exit-hidden", "16",
                              "--objective", "kd", "--distill", "1", "--temperature", "2", "--max-drop", "0.05",
                              "--exit-augment", "crop_flip", *tiny)
    assert code == 0, stdout
    model = load_model(str(out))
    assert model.config.meta["training"]["exits"]["augment"] == "crop_flip"
    cal = model.config.meta["calibration"]
    kept = [e.after for e in model.config.exits]
    assert len(kept) + len(cal.get("dropped_exits", [])) == 9  # cifar_resnet20: stem + 9 blocks, the last has none
    assert all(e.kind == "sdn" for e in model.config.exits)
    code, result, _ = run_cli(capsys, "evaluate", str(out), "--json")
    assert code == 0 and 0 < json.loads(result)["cost_fraction"] < 1.01  # SDN heads cost well under 1% each


def test_resume_reuses_the_backbone_and_an_unreachable_budget_is_said(tiny_build, tmp_path, capsys):
    out = tmp_path / "again"
    os.makedirs(out / "checkpoints")
    for f in ("backbone.pt", "backbone.pt.json"):
        (out / "checkpoints" / f).write_bytes((tiny_build / "checkpoints" / f).read_bytes())
    argv = ["build", "--out", str(out), "--resume", "--max-cost", "0.01", "--policy", "entropy",
            *[a for a in TINY if a != "--quiet"]]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and "resuming: backbone from" in stdout
    meta = load_model(str(out)).config.meta
    assert meta["training"]["backbone"]["resumed"] is True
    assert meta["calibration"]["status"] == "unreachable" and meta["calibration"]["budget_met"] is False
    assert meta["calibration"]["policy"] == "entropy"
    assert "unreachable" in stdout
    first, second = load_model(str(tiny_build)), load_model(str(out))
    import torch

    for a, b in zip(first.segments.parameters(), second.segments.parameters()):
        assert torch.equal(a, b)


def test_densenet_keeps_its_answers_when_optimized_for_serving():
    # `bench` and the servers fold BN through an FX trace; DenseNet layers must trace correctly.
    import torch

    from branched.backbones import build_backbone
    from branched.config import ModelConfig
    from branched.model import BranchedModel

    bb = build_backbone("cifar_densenet121", 10)
    cfg = ModelConfig(backbone="cifar_densenet121", num_classes=10, input_size=16,
                      exits=[{"after": "features.denseblock1.denselayer2"}])
    model = BranchedModel(cfg, bb).eval()
    x = torch.randn(4, 3, 16, 16)
    before = model.backbone_forward(x)
    model.optimize_for_inference()
    torch.testing.assert_close(model.backbone_forward(x), before, rtol=1e-4, atol=1e-4)
