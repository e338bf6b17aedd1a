"""Is an answer its own request's? Plain Python, so the locustfile and the runner share it."""
from __future__ import annotations

from typing import Union

__all__ = ["check_answer", "check_any", "CONFIDENCE_TOL"]

CONFIDENCE_TOL = 1e-4  # batch-size float noise is ~1e-7; another image's answer differs far more


def check_answer(answer: dict, expected: dict) -> str:
    """'' when ``answer`` is the image's own answer (same class, exit and confidence within
    :data:`CONFIDENCE_TOL`); 'borderline' when it differs on an image whose score sits within float
    noise of a threshold (``expected["borderline"]``, see ``loadtests.answers``); else what differs.

    Args:
        answer: a server's JSON answer.
        expected: the image's answer alone: ``class_index``, ``exit``, ``confidence``, ``borderline``.
    """
    same_route = answer["class_index"] == expected["class_index"] and answer["exit"] == expected["exit"]
    if same_route and abs(float(answer["confidence"]) - expected["confidence"]) <= CONFIDENCE_TOL:
        return ""
    if expected.get("borderline"):
        return "borderline"
    return (f"class {answer['class_index']} exit {answer['exit']} confidence {float(answer['confidence']):.5f}, "
            f"expected class {expected['class_index']} exit {expected['exit']} "
            f"confidence {expected['confidence']:.5f}")


def check_any(answer: dict, expected: Union[dict, list]) -> str:
    """:func:`check_answer` against one expected answer, or against a list of them (the image's answers at
    every operating point a load controller may serve): '' when any matches, else 'borderline' when any
    is borderline, else what differs from the first."""
    if isinstance(expected, dict):
        return check_answer(answer, expected)
    results = [check_answer(answer, e) for e in expected]
    return "" if "" in results else "borderline" if "borderline" in results else results[0]
