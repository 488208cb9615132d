"""Node beside Python: watch catch-up of stored updates, same server, same run (issue 10.7).

Run ``python bench/bench_node_catchup.py`` (50,000 updates, 5 interleaved
rounds) or ``--quick`` (5,000 updates, 1 round; a smoke test). Needs ``node``
and the suite in interop/node installed (``npm ci`` there; this script runs
``npm run generate`` when the generated code is missing).

One ``shellinfo serve`` on a SQLite file in a temporary directory is filled
with ``--records`` updates (the records of bench_service.py, through
PublishRuns). Then each round times, in turn and in a rotating order, a watch
from revision 1 until the last stored update arrived, with:

* ``python client``: the package's blocking ``RunUpdateClient.watch()`` (events
  with decoded ``RunUpdate`` messages, its resume bookkeeping included);
* ``node client``: connect-node with protobuf-es messages
  (interop/node/bench/catchup.js), timed inside the Node process after a
  warm-up catch-up on the same connection (process start-up and JIT warm-up
  are not counted; the Python candidates are warm from the warm-up round);
* each of them also converting every run to the REST form (``to_rest`` /
  the JS reference adapter's ``toRestText``).

The median rate of each is printed with its ratio to the Python client. Absolute
figures on a shared machine wander; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shellinfo_grpc import RunUpdateClient, to_rest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import fill_run, fill_source

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "interop" / "node"
LAUNCH = (
    "import sys; from importlib.metadata import entry_points; "
    "(ep,) = entry_points(group='console_scripts', name='shellinfo'); sys.exit(ep.load()(sys.argv[1:]))"
)


@contextmanager
def server(directory: Path) -> Iterator[str]:
    """A ``shellinfo serve`` on a SQLite file in ``directory``; yields its address."""
    log = directory / "serve.log"
    store = f"sqlite:///{directory / 'runs.sqlite3'}"
    with log.open("w", encoding="utf-8") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", "--address", "127.0.0.1:0", "--store", store], stderr=err
        )
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"serving on (127\.0\.0\.1:\d+)", log.read_text(encoding="utf-8"))):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shellinfo serve did not start: {log.read_text(encoding='utf-8')}")
            time.sleep(0.05)
        yield found.group(1)
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)


def fill(address: str, records: int) -> float:
    """Store ``records`` updates through PublishRuns; returns the seconds it took."""
    t0 = time.perf_counter()
    with RunUpdateClient(address, timeout=600) as client:
        results = list(client.publish_many((fill_source(i), fill_run(i)) for i in range(records)))
    elapsed = time.perf_counter() - t0
    revisions = [getattr(r, "revision", None) for r in results]
    if revisions != list(range(1, records + 1)):
        raise RuntimeError("fill: the store was not empty, or an update was refused")
    return elapsed


def python_catch_up(address: str, records: int, rest: bool) -> float:
    """Seconds until the Python client delivered the ``records``-th update from revision 1."""
    with RunUpdateClient(address) as client:
        t0 = time.perf_counter()
        got = 0
        with client.watch(start_revision=1) as events:
            for event in events:
                if event.update is None:
                    continue
                got += 1
                if event.revision != got:
                    raise RuntimeError(f"python: revision {event.revision} where {got} was due")
                if rest:
                    to_rest(event.update.run)
                if got == records:
                    break
        return time.perf_counter() - t0


def node_catch_up(address: str, records: int, rest: bool) -> float:
    """Seconds the Node client took, as measured inside the Node process."""
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run(
        [node, "bench/catchup.js", f"http://{address}", str(records), "rest" if rest else "messages"],
        cwd=SUITE,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"node bench failed: {done.stderr.strip()}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["updates"] != records:
        raise RuntimeError(f"node: {result['updates']} updates of {records}")
    return float(result["seconds"])


def prepare_node() -> None:
    """Check node and the suite's packages; generate the code if it is missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("bench_node_catchup: node and npm are needed")
    if not (SUITE / "node_modules").is_dir():
        raise SystemExit(f"bench_node_catchup: run `npm ci` in {SUITE} first")
    if not (SUITE / "gen").is_dir():
        env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        npm = shutil.which("npm")
        assert npm is not None
        subprocess.run([npm, "run", "--silent", "generate"], cwd=SUITE, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000, help="stored updates to catch up on")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="5,000 updates, 1 round (smoke test)")
    args = parser.parse_args(argv)
    records, rounds = (5_000, 1) if args.quick else (args.records, args.rounds)
    prepare_node()
    candidates: dict[str, Callable[[str], float]] = {
        "python client": lambda a: python_catch_up(a, records, rest=False),
        "node client": lambda a: node_catch_up(a, records, rest=False),
        "python client + to_rest": lambda a: python_catch_up(a, records, rest=True),
        "node client + toRestText": lambda a: node_catch_up(a, records, rest=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp, server(Path(tmp)) as address:
        seconds = fill(address, records)
        print(f"filled {records:,} updates through PublishRuns in {seconds:.1f} s (SQLite, {address})")
        names = list(candidates)
        for name in names:  # warm-up: connections, JIT, page cache
            candidates[name](address)
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                rates[name].append(records / candidates[name](address))
    print(f"\nwatch catch-up of {records:,} stored updates from revision 1, {rounds} interleaved round(s), median")
    print(f"{'candidate':<28}{'updates/s':>12}{'spread':>18}{'vs python client':>20}")
    base = statistics.median(rates["python client"])
    for name, values in rates.items():
        median = statistics.median(values)
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"{name:<28}{median:>12,.0f}{spread:>18}{median / base:>19.2f}x")
    rest_base = statistics.median(rates["python client + to_rest"])
    node_rest = statistics.median(rates["node client + toRestText"])
    print(f"\nnode / python, messages: {statistics.median(rates['node client']) / base:.2f}x; ", end="")
    print(f"with REST conversion: {node_rest / rest_base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
