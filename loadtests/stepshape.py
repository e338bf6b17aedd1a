"""A Locust load shape for the step-load test: a fixed population of users whose pace follows the steps.

Loaded beside the locustfile: ``locust -f loadtests/locustfile.py,loadtests/stepshape.py ...`` (the step-load
runner, :mod:`loadtests.stepload`, does it). Options (added to Locust's own):
  --steps "20:0.5,20:1,20:2,20:1,20:0.5"   per step, seconds:multiple of --capacity
  --capacity R       requests/s the multiples refer to (the measured capacity at the calibrated point)
  --step-users U     users, all spawned in the first second; each sends ``rate / U`` requests/s, so the
                     offered load follows the steps while answers come back within ``U / rate`` seconds
                     (a user whose answer is later sends its next request at once: past that, the load is
                     a closed loop of U users, the most requests that can be in flight)
  --steps-out FILE   JSON written at the first tick: ``t0`` (epoch seconds of the start) and the steps

The users ask :meth:`StepShape.next_send` when to send next (see the locustfile's ``wait_time``): Poisson
arrivals whose rate changes at each step's exact time, with no user started or stopped mid-run.
"""
from __future__ import annotations

import json
import time
from typing import Optional

from locust import LoadTestShape, events

from loadtests.stepspec import next_send, parse_steps


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--steps", default="", help="per step, seconds:multiple of --capacity, comma-separated")
    parser.add_argument("--capacity", type=float, default=0.0, help="requests/s the step multiples refer to")
    parser.add_argument("--step-users", type=int, default=0, help="users (all spawned at the start)")
    parser.add_argument("--steps-out", default="", help="JSON file: start time and steps")


class StepShape(LoadTestShape):
    """``--step-users`` users from the start; the offered rate is ``multiple x --capacity`` in each step."""

    def __init__(self) -> None:
        super().__init__()
        self._steps: Optional[list[tuple[float, float]]] = None
        self._written = False

    def _options(self):
        return self.runner.environment.parsed_options

    def steps(self) -> list[tuple[float, float]]:
        if self._steps is None:
            opts = self._options()
            if opts.capacity <= 0 or opts.step_users <= 0:
                raise ValueError("the step shape needs --capacity > 0 and --step-users > 0")
            self._steps = parse_steps(opts.steps)
        return self._steps

    def multiple(self, t: float) -> Optional[float]:
        """The step multiple at run time ``t`` (None after the last step)."""
        end = 0.0
        for seconds, multiple in self.steps():
            end += seconds
            if t < end:
                return multiple
        return None

    def next_send(self, after: float) -> Optional[float]:
        """Run time of one user's next request after run time ``after`` (:func:`loadtests.stepspec.next_send`)."""
        opts = self._options()
        return next_send(self.steps(), opts.capacity, opts.step_users, after)

    def tick(self) -> Optional[tuple[int, float]]:
        t = self.get_run_time()
        opts = self._options()
        if not self._written and opts.steps_out:
            with open(opts.steps_out, "w") as f:
                json.dump({"t0": time.time() - t, "capacity": opts.capacity, "users": opts.step_users,
                           "steps": [{"seconds": s, "multiple": m} for s, m in self.steps()]}, f)
            self._written = True
        if self.multiple(t) is None:
            return None
        return opts.step_users, float(opts.step_users)
