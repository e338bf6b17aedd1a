"""The model directory: identical answers after a round trip; clear errors for damage."""
import json
import os
import pickle

import pytest
import torch

from branched.artifact import load_model, save_model
from branched.backbones import build_backbone, load_backbone_weights
from branched.cli import main
from branched.errors import ArtifactError

from helpers import make_model, median_thresholds


@pytest.fixture
def saved(tmp_path):
    model = make_model("cifar_resnet20", 32, n_exits=3)
    model.config.thresholds = [0.5, 0.4, 0.3]
    save_model(model, str(tmp_path / "m"))
    return model, str(tmp_path / "m")


def test_round_trip_gives_identical_answers(saved):
    model, d = saved
    loaded = load_model(d)
    x = torch.randn(10, 3, 32, 32)
    thr = median_thresholds(model, x)
    a, b = model.routed_forward(x, thr), loaded.routed_forward(x, thr)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_index, b.exit_index)
    assert loaded.config.thresholds == [0.5, 0.4, 0.3]
    assert loaded.cost.to_dict() == model.cost.to_dict()
    cfg = json.load(open(os.path.join(d, "config.json")))
    for key in ("backbone", "input_size", "mean", "std", "class_names", "exits", "thresholds", "cost"):
        assert key in cfg


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_foreign_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ArtifactError, match="not a branched-model"):
        load_model(str(tmp_path))


def test_corrupt_config(saved):
    _, d = saved
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_model(d)


def test_truncated_weights(saved):
    _, d = saved
    path = os.path.join(d, "weights.pt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="weights-only"):
        load_model(d)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/branched-pwned",))


def test_pickled_objects_are_never_executed(saved):
    _, d = saved
    with open(os.path.join(d, "weights.pt"), "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ArtifactError):
        load_model(d)
    assert not os.path.exists("/tmp/branched-pwned")


def test_weights_of_another_model(saved, tmp_path):
    _, d = saved
    other = make_model("cifar_resnet20", 32, n_exits=1)
    torch.save(other.state_dict(), os.path.join(d, "weights.pt"))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_model(d)


def test_backbone_checkpoint_loading(tmp_path):
    bb = build_backbone("cifar_resnet20", 10)
    path = str(tmp_path / "bb.pt")
    torch.save(bb.state_dict(), path)
    again = load_backbone_weights("cifar_resnet20", 10, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.model.eval()(x), again.model.eval()(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone_weights("cifar_resnet20", 10, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_backbone_weights("resnet18", 1000, "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(ValueError, match="does not fit"):
        load_backbone_weights("cifar_resnet32", 10, path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("branched: error:") and "\n" not in err
