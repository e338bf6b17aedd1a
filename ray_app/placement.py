"""Where a Serve config's replicas may run, and whether a cluster can place them.

:func:`place_deployments` pins deployments of a :func:`ray_app.planner.serve_config` document to nodes (a custom
resource: hard) or prefers nodes by label (soft); :func:`replica_demands`, :func:`demand_totals` and
:func:`unplaceable` read what a config asks for and check it against a cluster's nodes, so that ``branched
ray-plan`` refuses a plan Serve would leave ``UPDATING`` forever. Pure arithmetic on the config: no Ray here.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

__all__ = ["place_deployments", "replica_demands", "demand_totals", "unplaceable"]


def place_deployments(doc: dict[str, Any], pins: Optional[dict[str, str]] = None,
                      prefer: Optional[dict[str, tuple[str, str]]] = None,
                      proxy_location: Optional[str] = None) -> dict[str, Any]:
    """Pin deployments of a :func:`serve_config` document to nodes (in place; returns ``doc``).

    Args:
        doc: the Serve config.
        pins: deployment name -> a custom resource that only the chosen node(s) have (``ray start
            --resources '{"node_b": 1}'``). A hard constraint: the replicas ask 0.01 of it, so they run
            only there, and a replica lost with its node waits until such a node is back.
        prefer: deployment name -> ``(label key, value)`` of the preferred node(s) (``ray start --labels
            key=value``). A soft constraint (``label_selector`` with a ``fallback_strategy`` to any other
            node), so Serve places a lost replica on a surviving node.
        proxy_location: ``EveryNode`` (one HTTP proxy per node) or ``HeadOnly``.

    Raises:
        ValueError: a named deployment is not in the config.
    """
    deployments = {d["name"]: d for app in doc["applications"] for d in app.get("deployments", [])}
    for name in [*(pins or {}), *(prefer or {})]:
        if name not in deployments:
            raise ValueError(f"no deployment {name!r} in the plan; it has {', '.join(deployments)}")
    for name, resource in (pins or {}).items():
        options = deployments[name].setdefault("ray_actor_options", {})
        options.setdefault("resources", {})[resource] = 0.01
    for name, (key, value) in (prefer or {}).items():
        options = deployments[name].setdefault("ray_actor_options", {})
        options["label_selector"] = {key: value}
        options["fallback_strategy"] = [{"label_selector": {key: f"!{value}"}}]
    if proxy_location:
        doc["proxy_location"] = proxy_location
    return doc


def replica_demands(doc: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """``(app/deployment, resources of one replica)`` for every replica a Serve config asks for.

    ``CPU`` is ``num_cpus`` (Ray's default of 1 when unset), ``GPU`` is ``num_gpus``, custom resources as
    given; Serve's controller and proxies ask for none.
    """
    out = []
    for app in doc["applications"]:
        for d in app.get("deployments", []):
            options = d.get("ray_actor_options") or {}
            need = {"CPU": float(options.get("num_cpus", 1.0)), "GPU": float(options.get("num_gpus", 0.0)),
                    **{k: float(v) for k, v in (options.get("resources") or {}).items()}}
            out += [(f"{app['name']}/{d['name']}", {k: v for k, v in need.items() if v})] * int(d.get("num_replicas", 1))
    return out


def demand_totals(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Resources each application of a Serve config asks for, summed over its replicas: ``{app: {CPU: ...}}``."""
    totals: dict[str, dict[str, float]] = {a["name"]: {} for a in doc["applications"]}
    for name, need in replica_demands(doc):
        app = totals[name.split("/")[0]]
        for k, v in need.items():
            app[k] = round(app.get(k, 0.0) + v, 4)
    return totals


def unplaceable(doc: dict[str, Any], nodes: Sequence[dict[str, float]]) -> list[str]:
    """The replicas of a Serve config that do not fit on ``nodes`` (each node's total resources), by
    first-fit-decreasing; empty when everything fits.

    Ray places a replica on one node with all its resources free, so a plan whose sum fits the cluster
    may still leave a replica without a node; Serve then keeps the deployment ``UPDATING`` forever.
    """
    free = [dict(n) for n in nodes]
    left = []
    for name, need in sorted(replica_demands(doc), key=lambda r: (r[1].get("GPU", 0), r[1].get("CPU", 0)), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items())), None)
        if node is None:
            left.append(f"{name} {{{', '.join(f'{k}: {v:g}' for k, v in sorted(need.items()))}}}")
            continue
        for k, v in need.items():
            node[k] -= v
    return left
