"""Locust users that post real image bytes to a TorchServe or Ray Serve classifier endpoint.

Options (added to Locust's own command line):
  --pool DIR           images to send: ``*.png`` files plus ``labels.json`` ({file: label}), as written
                       by ``loadtests.compare`` from the test split, so the exit mix is the real one
  --predict-path PATH  e.g. ``/predictions/demo`` (TorchServe) or ``/predict`` (Ray Serve)
  --query QS           routing parameters sent with every request, e.g. ``budget=0.5``
  --answers-out FILE   where to write the tally of answers (exit mix, cost, served accuracy) at stop
  --expected FILE      each pool image's own answer, computed offline (``loadtests.answers``): every
                       200 answer must carry its image's class_index, exit and confidence, else it
                       counts as a Locust failure and a mismatch (another request's answer)
  --answers-log FILE   one CSV row per request at stop: start/end time, image, ok, mismatch, latency

Every request names its pool image in the ``X-Pool-Image`` header (servers ignore it; it ties a server
log line to a request). An answer that is not JSON with the contract's keys counts as a Locust failure.
Run it by hand:
  locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s --host http://127.0.0.1:8080 \\
      --pool reports/pool --predict-path /predictions/demo
"""
from __future__ import annotations

import csv
import json
import os
import random
import time
from collections import Counter

from locust import FastHttpUser, constant, events, task

from loadtests.checks import check_answer

ANSWER_KEYS = ("class_index", "label", "confidence", "exit", "cost_fraction")
POOL: list[tuple[str, bytes, int]] = []
EXPECTED: dict[str, dict] = {}
LOG: list[tuple] = []
LOG_HEADER = ("start", "end", "image", "ok", "mismatch", "exit", "latency_ms", "error")
TALLY: dict = {"answers": 0, "correct": 0, "cost_fraction_sum": 0.0, "exits": Counter(), "mismatches": 0,
               "borderline": 0}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--pool", default="reports/pool", help="folder of PNGs + labels.json")
    parser.add_argument("--predict-path", default="/predict", help="endpoint path of the classifier")
    parser.add_argument("--query", default="", help="routing parameters for every request, e.g. budget=0.5")
    parser.add_argument("--answers-out", default="", help="JSON file for the tally of answers")
    parser.add_argument("--expected", default="", help="JSON file: each pool image's own answer")
    parser.add_argument("--answers-log", default="", help="CSV file: one row per request")


@events.init.add_listener
def _load_pool(environment, **_) -> None:
    folder = environment.parsed_options.pool
    labels_file = os.path.join(folder, "labels.json")
    if not os.path.isfile(labels_file):
        raise SystemExit(f"--pool {folder!r} has no labels.json; write a pool with `python -m loadtests.compare`")
    with open(labels_file) as f:
        labels = json.load(f)
    for name, label in sorted(labels.items()):
        with open(os.path.join(folder, name), "rb") as f:
            POOL.append((name, f.read(), int(label)))
    if not POOL:
        raise SystemExit(f"--pool {folder!r} is empty")
    if environment.parsed_options.expected:
        with open(environment.parsed_options.expected) as f:
            EXPECTED.update(json.load(f))
        missing = [name for name, _, _ in POOL if name not in EXPECTED]
        if missing:
            raise SystemExit(f"--expected has no answer for {missing[:3]}...; write it for this pool")


@events.request.add_listener
def _log_request(context=None, start_time=None, response_time=0.0, exception=None, **_) -> None:
    """Every request's outcome, for per-minute percentiles and the recovery timeline of a fault run."""
    context = context or {}
    LOG.append((start_time, time.time(), context.get("image", ""), int(exception is None),
                int(context.get("mismatch", False)), context.get("exit", ""), round(response_time, 2),
                str(exception or "")[:120].replace("\n", " ")))


@events.test_stop.add_listener
def _write_tally(environment, **_) -> None:
    """The answers' tally plus Locust's final aggregate stats (fired after every user has stopped,
    so these counts include the last requests, which the interval-written ``_stats.csv`` may miss)."""
    out = environment.parsed_options.answers_out
    if not out:
        return
    total = environment.stats.total
    stats = {"requests": total.num_requests, "failures": total.num_failures, "rps": total.total_rps,
             **{f"p{q}": total.get_response_time_percentile(q / 100) for q in (50, 95, 99)}}
    with open(out, "w") as f:
        json.dump({**TALLY, "exits": {str(k): v for k, v in sorted(TALLY["exits"].items())}, "stats": stats}, f)
    if environment.parsed_options.answers_log:
        with open(environment.parsed_options.answers_log, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(LOG_HEADER)
            w.writerows(LOG)


class ClassifierUser(FastHttpUser):
    """Posts one random image of the pool at a time, as fast as answers come back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.path = opts.predict_path + (f"?{opts.query}" if opts.query else "")

    @task
    def predict(self) -> None:
        name, image, label = random.choice(POOL)
        with self.client.post(self.path, data=image, headers={"Content-Type": "image/png", "X-Pool-Image": name},
                              name="predict", catch_response=True, context={"image": name}) as resp:
            context = resp.request_meta["context"]  # the session merges it into a new dict; the log reads this one
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                answer = json.loads(resp.text)
            except (TypeError, ValueError):
                resp.failure(f"answer is not JSON: {(resp.text or '')[:200]!r}")
                return
            missing = [k for k in ANSWER_KEYS if not isinstance(answer, dict) or k not in answer]
            if missing:
                resp.failure(f"answer lacks {missing}: {str(answer)[:200]}")
                return
            context["exit"] = answer["exit"]
            if name in EXPECTED:
                wrong = check_answer(answer, EXPECTED[name])
                if wrong == "borderline":
                    TALLY["borderline"] += 1
                elif wrong:
                    TALLY["mismatches"] += 1
                    context["mismatch"] = True
                    resp.failure(f"answer for {name} is not its own: {wrong}")
                    return
            resp.success()
            TALLY["answers"] += 1
            TALLY["correct"] += int(answer["class_index"] == label)
            TALLY["cost_fraction_sum"] += float(answer["cost_fraction"])
            TALLY["exits"][int(answer["exit"])] += 1
