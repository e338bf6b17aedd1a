"""The framework-free serving core: request parameters, bad requests, batches with mixed thresholds."""
import math

import pytest

from branched.artifact import save_model
from branched.routing import thresholds_for_budget, thresholds_from_params
from branched.errors import RequestError
from branched.serving import Predictor

from helpers import make_model, png



@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model = make_model("cifar_resnet20", 32)
    model.config.thresholds = [0.5, 0.5]
    model.config.meta["calibration"] = {"curve": [
        {"thresholds": [0.0, 0.0], "cost_fraction": 0.3, "accuracy": 0.90},
        {"thresholds": [0.6, 0.2], "cost_fraction": 0.5, "accuracy": 0.97},
        {"thresholds": [0.9, 0.5], "cost_fraction": 0.8, "accuracy": 0.98}]}
    d = tmp_path_factory.mktemp("m")
    save_model(model, str(d))
    return Predictor(str(d))


def test_params(predictor):
    cfg = predictor.config
    assert thresholds_from_params({}, cfg) is None
    assert thresholds_from_params({"threshold": "0.7"}, cfg).tolist() == pytest.approx([0.7, 0.7])
    assert thresholds_from_params({"thresholds": "0.1,inf"}, cfg).tolist() == [pytest.approx(0.1), math.inf]
    assert thresholds_for_budget(cfg, 0.6) == [0.6, 0.2]
    assert thresholds_from_params({"budget": "0.85"}, cfg).tolist() == pytest.approx([0.9, 0.5])
    for bad, match in [({"threshold": "abc"}, "number"), ({"thresholds": "0.1"}, "expected 2"),
                       ({"threshold": "2"}, r"\[0, 1\]"), ({"budget": "0.1"}, "cheapest"),
                       ({"budget": "-1"}, "> 0"), ({"threshold": "0.1", "budget": "0.5"}, "only one")]:
        with pytest.raises(ValueError, match=match):
            thresholds_from_params(bad, cfg)


def test_batch_with_bad_requests_and_mixed_thresholds(predictor):
    requests = [(png(1), {}), (b"", {}), (png(2), {"threshold": "0"}), (png(3), {"threshold": "x"}),
                (png(4), {"thresholds": "inf,inf"}), (b"not an image", {})]
    results = predictor.answer_batch(requests)
    assert isinstance(results[1], RequestError) and "empty" in str(results[1])
    assert isinstance(results[3], RequestError) and results[3].status == 400
    assert isinstance(results[5], RequestError)
    assert results[2]["exit"] == 0 and results[4]["exit"] == 2
    for i in (0, 2, 4):
        alone = predictor.answer_batch([requests[i]])[0]
        assert alone["exit"] == results[i]["exit"] and alone["class_index"] == results[i]["class_index"]
        assert set(alone) >= {"class_index", "label", "confidence", "exit", "cost_fraction"}
