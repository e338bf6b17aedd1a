"""Which process runs which stages of the staged Ray Serve app.

A grouping cuts the stages ``0..K-1`` into runs of consecutive stages. The first run is hosted by
the HTTP ``Ingress`` itself (it may be empty); every later run is one deployment. Written as text,
runs are separated by ``|`` and the ingress's run comes first::

    "0,1,2,3"    all four stages in the Ingress: no hop at all (a CPU machine's usual choice)
    "0|1,2,3"    stage 0 in the Ingress (early exits cross no hop), stages 1-3 in one deployment
    "|0|1|2|3"   the Ingress only decodes; one deployment per stage (the GPU layout; ``per-stage``)

``ingress`` and ``per-stage`` name the first and last of these. Deployments are named ``Stage{k}``
(one stage) or ``Stage{a}-{b}`` (stages ``a..b``). Pure Python: the planner and the CLI use it
without Ray.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Union

__all__ = ["Grouping", "deployment_name"]

NAMED = ("ingress", "per-stage")


def deployment_name(stages: tuple[int, ...]) -> str:
    """``Stage{k}`` for one stage, ``Stage{a}-{b}`` for stages ``a..b``."""
    return f"Stage{stages[0]}" if len(stages) == 1 else f"Stage{stages[0]}-{stages[-1]}"


@dataclass(frozen=True)
class Grouping:
    """The stages the Ingress hosts, and the runs of stages hosted by one deployment each.

    Attributes:
        ingress: stages ``0..n-1`` run in the Ingress (empty: it only decodes and batches).
        groups: the later stages as runs of consecutive stages, one deployment per run, in order.
    """

    ingress: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.ingress) + sum(len(g) for g in self.groups)

    @property
    def cuts(self) -> tuple[int, ...]:
        """The stages that start a deployment (each is a hop: the samples reaching it cross processes)."""
        return tuple(g[0] for g in self.groups)

    @property
    def names(self) -> list[str]:
        """Deployment names of the groups, in order."""
        return [deployment_name(g) for g in self.groups]

    def __str__(self) -> str:
        return "|".join(",".join(map(str, run)) for run in (self.ingress, *self.groups))

    @classmethod
    def from_cuts(cls, num_stages: int, cuts: Union[set[int], tuple[int, ...], list[int]]) -> "Grouping":
        """The grouping whose deployments start at the stages ``cuts`` (0 in ``cuts``: the Ingress hosts none)."""
        bounds = sorted(set(cuts))
        if any(c < 0 or c >= num_stages for c in bounds):
            raise ValueError(f"cuts must be stage indices 0..{num_stages - 1}, got {sorted(cuts)}")
        edges = [0, *bounds, num_stages]
        runs = [tuple(range(a, b)) for a, b in zip(edges, edges[1:])]  # runs[0] is () when 0 is a cut
        return cls(runs[0], tuple(runs[1:]))

    @classmethod
    def ingress_only(cls, num_stages: int) -> "Grouping":
        return cls.from_cuts(num_stages, ())

    @classmethod
    def per_stage(cls, num_stages: int) -> "Grouping":
        return cls.from_cuts(num_stages, range(num_stages))

    @classmethod
    def parse(cls, text: Union[str, "Grouping", list], num_stages: int) -> "Grouping":
        """``"0|1,2"``, ``"ingress"``, ``"per-stage"``, a list of runs (``[[0], [1, 2]]``, first = the Ingress's)
        or a :class:`Grouping`, checked against a model of ``num_stages`` stages.

        Raises:
            ValueError: stages missing, repeated, out of order or out of range (the message shows the form).
        """
        if isinstance(text, Grouping):
            runs = [list(text.ingress), *map(list, text.groups)]
        elif isinstance(text, str) and text.strip() in NAMED:
            return cls.ingress_only(num_stages) if text.strip() == "ingress" else cls.per_stage(num_stages)
        elif isinstance(text, str):
            try:
                runs = [[int(v) for v in part.split(",") if v.strip()] for part in text.split("|")]
            except ValueError:
                runs = None
        else:
            runs = [list(r) for r in text]
        flat = [k for run in runs or [] for k in run]
        if runs is None or flat != list(range(num_stages)) or any(not r for r in runs[1:]):
            raise ValueError(
                f"grouping {text!r} does not cover stages 0..{num_stages - 1} once each, in order: write the "
                f"Ingress's stages first, then each deployment's, separated by '|' (e.g. '0|1,2' or "
                f"'|0|1|2'), or one of {', '.join(NAMED)}")
        return cls(tuple(runs[0]), tuple(tuple(r) for r in runs[1:]))

    @classmethod
    def all(cls, num_stages: int, ingress_may_host: bool = True) -> Iterator["Grouping"]:
        """Every grouping of ``num_stages`` stages (``2 ** num_stages``; half with ``ingress_may_host`` False)."""
        for n in range(num_stages + 1):
            for cuts in itertools.combinations(range(num_stages), n):
                if ingress_may_host or 0 in cuts:
                    yield cls.from_cuts(num_stages, cuts)
