"""Locust users that post real image bytes to a TorchServe or Ray Serve classifier endpoint.

Options (added to Locust's own command line):
  --pool DIR           images to send: ``*.png`` files plus ``labels.json`` ({file: label}), as written
                       by ``loadtests.compare`` from the test split, so the exit mix is the real one
  --predict-path PATH  e.g. ``/predictions/demo`` (TorchServe) or ``/predict`` (Ray Serve)
  --query QS           routing parameters sent with every request, e.g. ``budget=0.5``
  --header NAME=VALUE  a header sent with every request (repeatable), e.g. ``thresholds=0.9,inf``: routing
                       parameters as headers reach the handler on both servers (TorchServe's
                       ``/predictions`` hands a handler no query string)
  --stamp              send ``X-Request-Start: t=<epoch seconds>`` (what a proxy stamps): a TorchServe
                       handler with a load controller then learns each request's latency
  --answers-out FILE   where to write the tally of answers (exit mix, cost, served accuracy) at stop
  --expected FILE      each pool image's own answer, computed offline (``loadtests.answers``): every
                       200 answer must carry its image's class_index, exit and confidence, else it
                       counts as a Locust failure and a mismatch (another request's answer)
                       (a list per image: its answers at every operating point a load controller may
                       serve, any of which is accepted)
  --answers-log FILE   one CSV row per request at stop: start/end time, image, ok, mismatch, latency,
                       class, correct (against the pool label), cost fraction
  --pace R             each user sends R requests/s (Poisson: exponential periods of mean 1/R; a late answer
                       makes the next request leave at once); 0: as fast as answers come back. A load shape
                       with ``next_send()`` (``loadtests/stepshape.py``) paces the users instead.

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

import gevent
from locust import FastHttpUser, events, task

from loadtests.checks import check_any

ANSWER_KEYS = ("class_index", "label", "confidence", "exit", "cost_fraction")
POOL: list[tuple[str, bytes, int]] = []
EXPECTED: dict[str, dict] = {}
LOG: list[tuple] = []
LOG_HEADER = ("start", "end", "image", "ok", "mismatch", "exit", "latency_ms", "error", "class_index", "correct",
              "cost_fraction")
TALLY: dict = {"answers": 0, "correct": 0, "cost_fraction_sum": 0.0, "exits": Counter(), "mismatches": 0,
               "borderline": 0}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--pool", default="reports/pool", help="folder of PNGs + labels.json")
    parser.add_argument("--predict-path", default="/predict", help="endpoint path of the classifier")
    parser.add_argument("--query", default="", help="routing parameters for every request, e.g. budget=0.5")
    parser.add_argument("--header", action="append", default=[], help="NAME=VALUE header for every request")
    parser.add_argument("--stamp", action="store_true", help="send X-Request-Start with each request's send time")
    parser.add_argument("--answers-out", default="", help="JSON file for the tally of answers")
    parser.add_argument("--expected", default="", help="JSON file: each pool image's own answer")
    parser.add_argument("--answers-log", default="", help="CSV file: one row per request")
    parser.add_argument("--pace", type=float, default=0.0, help="requests/s per user (0: closed loop)")


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
                str(exception or "")[:120].replace("\n", " "), context.get("class_index", ""),
                context.get("correct", ""), context.get("cost_fraction", "")))


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
    """Posts one random image of the pool at a time, as fast as answers come back (or at ``--pace``)."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.path = opts.predict_path + (f"?{opts.query}" if opts.query else "")
        self.headers = {"Content-Type": "image/png", **dict(h.split("=", 1) for h in opts.header)}
        self.due = self._clock()
        gevent.sleep(self.wait_time())  # paced: a random phase (users spawned together must not send together)

    def _clock(self) -> float:
        shape = self.environment.shape_class
        return shape.get_run_time() if hasattr(shape, "next_send") else time.monotonic()

    def wait_time(self) -> float:
        """0 in a closed loop; paced: until the next request is due (Poisson arrivals per user at ``--pace`` or
        at the shape's rate, ``next_send``); a late answer makes the next request leave at once (no catching up)."""
        shape, now = self.environment.shape_class, self._clock()
        if hasattr(shape, "next_send"):
            due = shape.next_send(self.due)
            if due is None:
                # This user's next arrival falls after the last step: it sends nothing more, and sleeps until the
                # shape ends the run (which stops it). Returning a short wait here made every such user send once a
                # second through the last step, tripling its offered load at the end.
                return 3600.0
        elif self.environment.parsed_options.pace > 0:
            due = self.due + random.expovariate(self.environment.parsed_options.pace)
        else:
            return 0.0
        self.due = max(now, due)
        return self.due - now

    @task
    def predict(self) -> None:
        name, image, label = random.choice(POOL)
        headers = {**self.headers, "X-Pool-Image": name}
        if self.environment.parsed_options.stamp:
            headers["X-Request-Start"] = f"t={time.time():.6f}"
        with self.client.post(self.path, data=image, headers=headers,
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
            context.update(exit=answer["exit"], class_index=answer["class_index"],
                           correct=int(answer["class_index"] == label), cost_fraction=answer["cost_fraction"])
            if name in EXPECTED:
                wrong = check_any(answer, EXPECTED[name])
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
