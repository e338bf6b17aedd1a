"""Ray Serve's own floor on this machine: CPU per request of an app that does nothing.

``python -m loadtests.serve_floor --profile ray-default --requests 3000`` starts a private local Ray
on the last CPU with a Ray Serve profile (:mod:`ray_app.options`), deploys a FastAPI ingress that
answers ``{"ok": true}`` to a small POST, sends ``--requests`` requests from ``--users`` threads on
the other CPU, and prints the CPU each request cost in each Ray process (``psutil``, by role as the
load tests count them) and the requests per second. What our apps cost per request beyond this floor
is ours; the floor itself is Serve on this machine.
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import psutil
from fastapi import FastAPI, Request  # no `from __future__ import annotations`: FastAPI reads them

__all__ = ["main"]


def _cpu_by_role() -> dict[str, float]:
    from .procs import role

    out: dict[str, float] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            name, t = role("ray", p), p.cpu_times()
        except psutil.Error:
            continue
        if name:
            out[name] = out.get(name, 0.0) + t.user + t.system
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from ray_app.options import DEFAULT_PROFILE, PROFILES, apply, direct_ingress, logging_config

    p = argparse.ArgumentParser(prog="python -m loadtests.serve_floor", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=list(PROFILES))
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--body-bytes", type=int, default=600, help="POST body size (a demo PNG is about 600 bytes)")
    args = p.parse_args(argv)

    variables = apply(args.profile)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, client_cpus = ({cpus[-1]}, {cpus[0]}) if len(cpus) > 1 else (set(cpus), set(cpus))
    os.sched_setaffinity(0, server_cpus)  # Ray's processes inherit this
    from ray_app.server import LOOPBACK_ENV, app_urls, private_local_ray

    os.environ.update(LOOPBACK_ENV)  # before Ray is imported: its ports on 127.0.0.1 only
    import ray
    import requests
    from ray import serve

    from .launchers import free_port
    from .overhead import per_request

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=256)
    @serve.ingress(api)
    class Noop:
        @api.post("/")
        async def answer(self, request: Request) -> dict:
            await request.body()
            return {"ok": True}

    port = free_port()
    private_local_ray(2, 80)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config(args.profile))
        serve.run(Noop.bind(), name="noop", route_prefix="/")
        url = app_urls(port, direct_ingress(variables))["noop"] + "/"
        os.sched_setaffinity(0, client_cpus)
        body = b"x" * args.body_bytes
        session = requests.Session()
        for _ in range(50):
            r = session.post(url, data=body, timeout=30)
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:200]}")
        before, t0 = _cpu_by_role(), time.monotonic()

        def worker(n: int) -> int:
            s = requests.Session()
            return sum(s.post(url, data=body, timeout=30).status_code == 200 for _ in range(n))  # noqa

        with ThreadPoolExecutor(args.users) as pool:
            ok = sum(pool.map(worker, [args.requests // args.users] * args.users))
        seconds = time.monotonic() - t0
        after = _cpu_by_role()
        per = per_request({k: after[k] - before.get(k, 0.0) for k in after}, ok)
        print(json.dumps({"profile": args.profile, "url": url, "requests": ok, "rps": round(ok / seconds, 1),
                          "cpu_ms_per_request": per}))
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
