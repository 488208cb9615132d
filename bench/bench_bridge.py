"""Bridge benchmark: CPU per poll of a 10,000-run cluster where 1 % of the runs change per poll.

Run ``python bench/bench_bridge.py`` (``--runs``, ``--jobs``, ``--polls``,
``--change`` to vary; ``--quick`` for a CI smoke run of a few seconds).

Setup. A :class:`~shellinfo_grpc.testing.FakeCluster` serves ``--runs`` runs
over ``--jobs`` jobs from a thread of this process; the run-update service
(``shellinfo serve --store memory://``) runs in a process of its own. A
:class:`~shellinfo_grpc.bridge.Bridge` polls the fake with ``numRuns`` above
the run count (one request per poll) and publishes to the service. Before each
measured poll, ``--change`` of the runs (1 % by default) move one status step
(kAccepted -> kRunning -> kFinalizing -> kSuccess), outside the timing.

Measured, per poll, as CPU time of the bridge's thread (``time.thread_time``:
the fake cluster's thread and the service's process are not counted):

* **bridge**: one whole ``Bridge.run_once()``: the HTTP request and answer,
  JSON parsing, the diff against the last state of every run, ``from_rest``
  of the changed runs, and publishing them over the ``PublishRuns`` stream
  until acknowledged;
* **SDK parse**: the same answer body (fetched again outside the timing)
  parsed with ``json.loads`` and the official SDK's
  ``ProtectionRunInstance.from_dictionary`` for every element: what an agent
  built on the SDK spends before it has compared or published anything;
* **from_rest all**: ``json.loads`` and ``from_rest`` of every run's shell
  info: a bridge that converts every run on every poll;
* **json.loads**: parsing the body alone, the floor of any poller.

The figures are medians over the polls. Ratios to the SDK parse are printed
beside them; compare ratios, not absolute milliseconds, on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from shellinfo_grpc import from_rest
from shellinfo_grpc.bridge import Bridge, ClusterConfig, Credentials, ServiceConfig
from shellinfo_grpc.testing import API_PREFIX, FakeCluster

_NEXT = {"kAccepted": "kRunning", "kRunning": "kFinalizing", "kFinalizing": "kSuccess"}
_SERVE = "import sys; from shellinfo_grpc.cli import main; sys.exit(main())"


def start_service() -> tuple[subprocess.Popen[str], int]:
    """``shellinfo serve`` on a free loopback port, in a process of its own."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, "serve", "--address", "127.0.0.1:0", "--store", "memory://"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"serving on [^ ]+:(\d+)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"bench_bridge: the service did not start: {line!r}")
    return proc, int(match.group(1))


def fetch_body(cluster: FakeCluster, start_usecs: int, num_runs: int) -> bytes:
    """The protectionRuns answer the bridge got, fetched again (same clock, same state)."""
    login = urllib.request.Request(
        f"{cluster.url}{API_PREFIX}/accessTokens",
        data=json.dumps({"username": "admin", "password": "admin"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(login) as answer:  # loopback only: the fake cluster
        token = json.load(answer)["accessToken"]
    query = f"onlyReturnShellInfo=true&excludeTasks=true&startTimeUsecs={start_usecs}&numRuns={num_runs}"
    runs = urllib.request.Request(
        f"{cluster.url}{API_PREFIX}/protectionRuns?{query}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(runs) as answer:
        body: bytes = answer.read()
    return body


def cpu(fn: Callable[[], Any]) -> float:
    began = time.thread_time()
    fn()
    return time.thread_time() - began


def sdk_parse(body: bytes) -> None:
    from cohesity_management_sdk.models.protection_run_instance import ProtectionRunInstance

    for element in json.loads(body):
        ProtectionRunInstance.from_dictionary(element)


def from_rest_all(body: bytes) -> None:
    for element in json.loads(body):
        from_rest(element["protectionShellInfo"])


async def run(args: argparse.Namespace) -> None:
    proc, port = start_service()
    try:
        with FakeCluster(start_time=1_795_000_000.0, default_num_runs=args.runs + 1) as cluster:
            jobs = [cluster.add_job(f"job-{i:03d}") for i in range(args.jobs)]
            run_ids = [
                cluster.add_run(jobs[i % args.jobs], start=1_795_000_000.0 - i, timeline=[("kAccepted", 0.0)])
                for i in range(args.runs)
            ]
            config = ClusterConfig(
                cluster.url,
                Credentials(username="admin", password="admin"),
                source="bench",
                num_runs=args.runs + 1,
                max_num_runs=max(64_000, args.runs + 1),
            )
            changed = max(1, round(args.runs * args.change))
            rows: dict[str, list[float]] = {"bridge": [], "SDK parse": [], "from_rest all": [], "json.loads": []}
            async with Bridge([config], ServiceConfig(f"127.0.0.1:{port}"), clock=cluster.time) as bridge:
                began = time.thread_time()
                first = await bridge.run_once(flush_timeout=120)
                first_cpu = time.thread_time() - began
                assert first.ok, first
                cursor = 0
                for _ in range(args.polls):
                    for _ in range(changed):
                        run_id = run_ids[cursor % len(run_ids)]
                        cursor += 1
                        state = cluster.shell_info(run_id)
                        assert state is not None
                        nxt = _NEXT.get(state["status"])
                        if nxt is not None:
                            cluster.set_status(run_id, nxt)
                    cluster.advance(1.0)
                    began = time.thread_time()
                    result = await bridge.run_once(flush_timeout=60)
                    rows["bridge"].append(time.thread_time() - began)
                    assert result.ok, result
                    start = round((cluster.time() - config.lookback) * 1e6)
                    body = fetch_body(cluster, start, config.num_runs)
                    rows["SDK parse"].append(cpu(functools.partial(sdk_parse, body)))
                    rows["from_rest all"].append(cpu(functools.partial(from_rest_all, body)))
                    rows["json.loads"].append(cpu(functools.partial(json.loads, body)))
                published = bridge.metrics.registry.get_sample_value(
                    "shellinfo_bridge_runs_published_total", {"cluster": "bench"}
                )
    finally:
        proc.terminate()
        proc.wait(10)

    medians = {name: statistics.median(values) for name, values in rows.items()}
    reference = medians["SDK parse"]
    print(f"bench_bridge: {args.runs} runs over {args.jobs} jobs, {changed} changed per poll, {args.polls} polls")
    print(f"python {platform.python_version()} on {platform.machine()}; CPU of the bridge's thread, medians")
    print(f"first poll (all {args.runs} runs new, published): {first_cpu * 1e3:.1f} ms CPU")
    print(f"{'':16} {'ms CPU/poll':>12} {'us/changed run':>15} {'x SDK parse':>12}")
    for name, value in medians.items():
        per_change = f"{value / changed * 1e6:15.1f}" if name == "bridge" else f"{'':15}"
        print(f"{name:16} {value * 1e3:12.2f} {per_change} {value / reference:12.2f}")
    print(f"updates acknowledged by the service: {published:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--polls", type=int, default=15)
    parser.add_argument("--change", type=float, default=0.01, help="share of the runs that change per poll")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 1,000 runs, 3 polls")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.jobs, args.polls = 1000, 20, 3
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
