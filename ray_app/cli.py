"""``branched ray-plan``: write a Ray Serve config with each stage's resources sized to its work.

Registered through the ``branched.commands`` entry-point group (pyproject.toml); importing this
module does not import Ray.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Optional

from branched.cli import add_data_args, parse_thresholds
from branched.errors import UsageError

from .costmodel import Calibration, choose_grouping, describe
from .grouping import Grouping
from .options import DEFAULT_PROFILE, PROFILES, env
from .placement import demand_totals, place_deployments, unplaceable
from .planner import calibrated_exit_rates, plan_baseline, plan_groups, reach_probabilities, serve_config, stage_flops

__all__ = ["register"]


def _exit_rates(args: argparse.Namespace, config) -> tuple[list[float], str]:
    """Exit rates from --exit-rates, else the model's calibration, else an evaluation on a split."""
    if args.exit_rates:
        return args.exit_rates, "--exit-rates"
    if args.thresholds is None and args.dataset is None and args.split == "calib":
        rates = calibrated_exit_rates(config)
        if rates:
            return rates, "the model's calibration"
    if not (args.dataset or config.meta.get("dataset")):
        raise UsageError(f"{args.model_dir} has no calibrated exit rates and does not record its dataset; "
             "pass --exit-rates r0,...,r{K-1} or --dataset NAME to measure them")
    from branched.artifact import load_model
    from branched.build.datasets import split_tensors
    from branched.build.evaluate import evaluate

    model = load_model(args.model_dir)
    x, y = split_tensors(model.config, args.split, args.dataset, args.data_root)
    result = evaluate(model, x, y, args.thresholds)
    return result["exit_rates"], f"an evaluation on the {args.split} split ({result['samples']} samples)"


def _calibration(args: argparse.Namespace, model_dir: str) -> Optional[Calibration]:
    """Measurements to choose the grouping from: a saved plan's (--calibration), a fresh run (--calibrate), or None."""
    if args.calibration:
        import yaml

        with open(args.calibration) as f:
            doc = yaml.safe_load(f) or {}
        staged = next((a for a in doc.get("applications") or [] if a.get("name") == "staged"), {})
        record = (staged.get("args") or {}).get("plan") or doc  # a plan written by ray-plan, or the record alone
        if "calibration" not in record:
            raise UsageError(f"{args.calibration} holds no calibration; write one with `branched ray-plan ... --calibrate "
                             "--out FILE`")
        return Calibration.from_dict(record["calibration"])
    if not args.calibrate:
        return None
    from .options import apply

    apply(args.profile)  # before Ray starts: the hop is measured with the settings it will be served with
    from .server import private_local_ray

    private_local_ray(4, 128)  # loopback only; imports Ray with that setting
    import ray
    from ray import serve

    from .calibrate import calibrate

    device = args.device or ("cuda" if args.gpus is not None else "cpu")
    threads = max(1, int(args.cpus_per_replica))
    print(f"calibrating on this machine: stage compute on {device} ({threads} thread(s)), then a handle call on a "
          f"private local Ray (Serve profile {args.profile})", file=sys.stderr)
    try:
        with socket.socket() as sock:  # a free loopback port for the probe's (unused) proxy
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        return calibrate(model_dir, args.expected_batch or args.max_batch_size, threads, device,
                         batch_wait_s=args.batch_wait_s)
    finally:
        serve.shutdown()
        ray.shutdown()


def _grouping(args: argparse.Namespace, config, rates: list[float], out) -> tuple[Grouping, Optional[dict]]:
    """The grouping: --grouping, else the cheapest by the calibration, else one stage per deployment."""
    stages = len(config.exits) + 1
    if args.grouping:
        return Grouping.parse(args.grouping, stages), None
    cal = _calibration(args, args.model_dir)
    if cal is None:
        print("  no calibration (--calibrate or --calibration FILE): one stage per deployment", file=out)
        return Grouping.per_stage(stages), None
    reach = reach_probabilities(rates)
    may_host = args.gpus is None
    best, costs = choose_grouping(reach, cal, may_host)
    lines = describe(best, costs, reach, cal, may_host)
    print("\n".join(lines), file=out)
    return best.grouping, {"exit_rates": rates, "calibration": cal.to_dict(), "reasoning": lines,
                           "work_s": best.compute, "profile": args.profile}


def _cmd_plan(args: argparse.Namespace) -> None:
    import yaml

    from branched.artifact import load_config

    if (args.gpus is None) == (args.cpus is None):
        raise UsageError("give the budget as exactly one of --gpus N or --cpus N")
    config = load_config(args.model_dir)
    flops = stage_flops(config)
    rates, source = _exit_rates(args, config)
    if len(rates) != len(flops):
        raise UsageError(f"{args.model_dir} has {len(flops)} exits (last = backbone head); got {len(rates)} exit rates")
    apps = set(args.apps.split(","))
    if not apps or not apps <= {"staged", "baseline"}:
        raise UsageError(f"--apps takes staged, baseline or staged,baseline; got {args.apps!r}")
    budget = f"{args.gpus} GPU(s)" if args.gpus is not None else f"{args.cpus:g} CPU(s)"
    out = sys.stderr if args.out is None else sys.stdout
    print(f"{args.model_dir}: {len(flops)} stages, {budget}, exit rates from {source}", file=out)
    grouping, record = _grouping(args, config, rates, out)
    work = record["work_s"] if record else None
    if work is not None and not grouping.ingress:
        work = [0.0, *work[1:]]
    plans = plan_groups(grouping, flops, rates, args.gpus, args.cpus, args.cpus_per_replica, args.ingress_replicas,
                        args.ingress_cpus, work)
    baseline = plan_baseline(args.gpus or 0, args.cpus or 0.0, args.cpus_per_replica) if "baseline" in apps else None
    doc = serve_config(args.model_dir, plans, baseline, staged="staged" in apps, ingress_replicas=args.ingress_replicas,
                       ingress_cpus=args.ingress_cpus, host=args.host, port=args.port,
                       max_batch_size=args.max_batch_size, record=record)
    place_deployments(doc, dict(args.pin or []), {d: tuple(kv.split("=", 1)) for d, kv in args.prefer or []},
                      args.proxy_location)
    text = yaml.safe_dump(doc, sort_keys=False)
    unit = "GPUs" if args.gpus is not None else "CPUs"
    print(f"  {'deployment':<11} {'stages':<8} {'reach':>7} {'GFLOPs':>9} {'work share':>10} {'replicas':>8} "
          f"{'num_gpus':>8} {'num_cpus':>8} {unit + ' total':>10}", file=out)
    for p in plans:
        total = p.replicas * (p.num_gpus if args.gpus is not None else p.num_cpus)
        stages = ",".join(map(str, p.stages))
        print(f"  {p.name:<11} {stages:<8} {p.reach:>7.3f} {p.stage_flops / 1e9:>9.4f} {p.share:>10.3f} "
              f"{p.replicas:>8} {p.num_gpus:>8.2f} {p.num_cpus:>8.2f} {total:>10.2f}", file=out)
    variables = env(args.profile)
    if variables:
        print(f"  Ray Serve profile {args.profile}: start Ray and Serve with "
              + " ".join(f"{k}={v}" for k, v in variables.items()), file=out)
    _check_resources(args, doc, out)
    if args.out is None:
        sys.stdout.write(text)
        return
    with open(args.out, "w") as f:
        f.write(f"# Written by `branched ray-plan {args.model_dir} ...`; deploy with `serve deploy {args.out}`.\n")
        if variables:
            f.write("# Start Ray (every node) and Serve with: " + " ".join(f"{k}={v}" for k, v in variables.items())
                    + "\n")
        f.write(text)
    print(f"wrote {args.out}", file=out)


def _cluster_nodes(url: str) -> tuple[Optional[list[dict[str, float]]], str]:
    """Total resources of each alive node of the Ray cluster whose dashboard is at ``url``, or None and why not."""
    import requests

    token = os.environ.get("RAY_AUTH_TOKEN", "")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not token and os.path.isfile(path):
        with open(path) as f:
            token = f.read().strip()
    try:
        r = requests.get(f"{url.rstrip('/')}/api/v0/nodes?limit=10000", timeout=3,
                         headers={"Authorization": f"Bearer {token}"} if token else {})
        if r.status_code in (401, 403):
            return None, f"the Ray cluster at {url} refused this client's token (set RAY_AUTH_TOKEN_PATH)"
        r.raise_for_status()
        nodes = r.json()["data"]["result"]["result"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None, f"no Ray cluster answered at {url} (--address)"
    return [n.get("resources_total") or {} for n in nodes if n.get("state") == "ALIVE"], ""


def _check_resources(args: argparse.Namespace, doc: dict, out) -> None:
    """Print what the plan asks for; refuse a plan the reachable cluster cannot place, warn when both apps
    together ask for more than the budget given."""
    totals = demand_totals(doc)
    cpus, gpus = (round(sum(t.get(k, 0.0) for t in totals.values()), 2) for k in ("CPU", "GPU"))
    print(f"plan asks for {cpus:g} CPUs, {gpus:g} GPUs in all: " + ", ".join(
        f"{app} {t.get('CPU', 0):g} CPUs" + (f" {t['GPU']:g} GPUs" if t.get("GPU") else "") for app, t in totals.items()),
        file=out)
    budget = ("--gpus", args.gpus, max(1, args.gpus // 2)) if args.gpus is not None else \
        ("--cpus", args.cpus, args.cpus / 2)
    fix = f"deploy one app (--apps staged) or give each app half the budget ({budget[0]} {budget[2]:g})" \
        if len(totals) > 1 else f"plan with the cluster's own budget ({budget[0]})"
    nodes, why = (None, "") if args.no_check else _cluster_nodes(args.address)
    if nodes is not None:
        left = unplaceable(doc, nodes)
        have = {k: round(sum(n.get(k, 0.0) for n in nodes), 2) for k in ("CPU", "GPU")}
        where = (f"the cluster at {args.address} ({len(nodes)} node{'s' * (len(nodes) != 1)}, {have['CPU']:g} CPUs, "
                 f"{have['GPU']:g} GPUs)")
        if left:
            raise UsageError(f"{where} cannot place {len(left)} replica(s) of this plan ({'; '.join(left[:3])}): "
                             f"Serve would keep them UPDATING and requests would hang; {fix}")
        print(f"fits {where}", file=out)
        return
    if not args.no_check:
        print(f"{why}; checked against {budget[0]} only", file=out)
    need = gpus if args.gpus is not None else cpus
    if len(totals) > 1 and need > budget[1] + 1e-9:
        print(f"warning: both apps together ask for {need:g} {budget[0][2:].upper()[:-1]}s, more than {budget[0]} "
              f"{budget[1]:g}: on a cluster of that size {fix}", file=out)


def _pairs(text: str) -> list[tuple[str, str]]:
    """``"Stage0=node_a,Stage1=node_b"`` -> ``[("Stage0", "node_a"), ("Stage1", "node_b")]`` (argparse type)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise argparse.ArgumentTypeError(f"expected DEPLOYMENT=VALUE[,DEPLOYMENT=VALUE...], got {text!r}")
    return [(d.strip(), v.strip()) for d, v in pairs]


def _rates(text: str) -> list[float]:
    """``"0.5,0.3,0.2"`` -> ``[0.5, 0.3, 0.2]`` (argparse type)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"exit rates must be comma-separated numbers, got {text!r}") from None


def register(subparsers) -> None:
    """Add ``ray-plan`` to the ``branched`` command."""
    p = subparsers.add_parser(
        "ray-plan", help="Ray Serve config with replicas / GPU fractions per stage in proportion to its work",
        description="Give each stage deployment of the staged Ray Serve app resources in proportion to the "
                    "work that reaches it: reach_k x stage_flops_k, with reach_k = 1 - (exit rates before k).")
    p.add_argument("model_dir")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--gpus", type=int, help="GPUs for the stages (fractional num_gpus per replica)")
    budget.add_argument("--cpus", type=float, help="CPUs for the whole app, ingress included")
    p.add_argument("--exit-rates", type=_rates, help="per exit, comma-separated, last = backbone head "
                                                      "(default: the model's calibration, else measured)")
    p.add_argument("--thresholds", type=parse_thresholds, help="thresholds to measure exit rates with")
    add_data_args(p, split_default="calib")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="num_cpus of one stage replica (default 1)")
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--ingress-cpus", type=float, default=1.0, help="num_cpus of one ingress replica (default 1)")
    p.add_argument("--apps", default="staged,baseline", help="applications to write (default staged,baseline)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to serve beyond this machine)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", help="write the config here (default: print it)")
    g = p.add_argument_group("grouping: which process runs which stages")
    g.add_argument("--calibrate", action="store_true", help="measure stage compute and a hop on this machine and "
                   "choose the cheapest grouping (a private local Ray for a few seconds)")
    g.add_argument("--calibration", help="choose from the measurements saved in an earlier plan (YAML) instead")
    g.add_argument("--grouping", help="use this grouping: the Ingress's stages, then each deployment's, "
                   "'|'-separated ('0|1,2'), or ingress / per-stage")
    g.add_argument("--expected-batch", type=int, help="batch size a loaded replica runs (default --max-batch-size)")
    g.add_argument("--batch-wait-s", type=float,
                   help="the deployments' batch wait: a later deployment's batch holds the survivors of the upstream "
                        "batches that arrive within it (default: full batches, as from many upstream replicas)")
    g.add_argument("--device", help="where stages are timed (default: cuda with --gpus, else cpu)")
    g.add_argument("--profile", default=DEFAULT_PROFILE, choices=list(PROFILES),
                   help=f"Ray Serve settings to measure and serve with (default {DEFAULT_PROFILE}; ray_app/options.py)")
    p.add_argument("--pin", type=_pairs, metavar="DEPLOYMENT=RESOURCE,...",
                   help="run a deployment only on nodes with this custom resource (ray start --resources); "
                        "hard: a replica lost with its node waits for such a node")
    p.add_argument("--prefer", type=_pairs, metavar="DEPLOYMENT=KEY=VALUE,...",
                   help="prefer nodes with this label (ray start --labels KEY=VALUE); soft: lost replicas "
                        "move to other nodes")
    p.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], help="HTTP proxies (default EveryNode)")
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"),
                   help="dashboard of the cluster to check the plan against (default: $RAY_DASHBOARD_ADDRESS or "
                        "http://127.0.0.1:8265)")
    p.add_argument("--no-check", action="store_true", help="do not ask a cluster whether the plan fits")
    p.set_defaults(func=_cmd_plan)

