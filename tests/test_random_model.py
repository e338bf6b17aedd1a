"""The compute-heavy benchmark model: random weights, exit mix fixed by quantile thresholds."""
import math

import pytest
import torch

from branched.artifact import load_config, load_model
from branched.build.random_model import quantile_thresholds
from branched.cli import main as cli_main


def test_quantile_thresholds_let_the_asked_shares_out():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(1000, generator=g) for _ in range(3)]
    mix = [0.5, 0.2, 0.1, 0.2]
    thresholds = quantile_thresholds(scores, mix)
    left = torch.ones(1000, dtype=torch.bool)
    for k, (s, t) in enumerate(zip(scores, thresholds)):
        out = left & (s >= t)
        assert int(out.sum()) == round(mix[k] * 1000)
        left &= ~out
    assert int(left.sum()) == 200
    assert quantile_thresholds(scores, [0.0, 0.0, 0.0, 1.0]) == [math.inf] * 3
    everyone = quantile_thresholds(scores, [1.0, 0.0, 0.0, 0.0])  # all leave at exit 0: a threshold in [0, lowest)
    assert 0.0 <= everyone[0] < float(scores[0].min()) and everyone[1:] == [math.inf] * 2
    with pytest.raises(ValueError, match="summing to 1"):
        quantile_thresholds(scores, [0.5, 0.5, 0.5, 0.0])


def test_random_model_has_the_asked_exit_mix(tmp_path, capsys):
    out = str(tmp_path / "heavy")
    mix = "0.4,0.3,0.1,0.2"
    assert cli_main(["random-model", "--out", out, "--backbone", "cifar_resnet20", "--input-size", "16",
                     "--dataset", "mnist5k", "--exit-mix", mix, "--calib-images", "100"]) == 0
    assert "random weights" in capsys.readouterr().out
    config = load_config(out)
    assert config.meta["random_weights"] and len(config.thresholds) == 3 and config.policy == "max_softmax"
    rates = config.meta["calibration"]["exit_rates"]
    assert rates == pytest.approx([0.4, 0.3, 0.1, 0.2], abs=0.011)
    assert all(e.kind == "linear" for e in config.exits)
    model = load_model(out)
    assert model.cost.exit_cost_fractions()[0] < 0.5  # a real saving: the first exit is early and cheap
