"""Run the robustness suite's generators for many inputs: ``python bench/fuzz.py``.

Each target is an entry point with the property it must keep, both taken
from ``tests/strategies.py`` (the ones ``tests/test_robustness.py`` checks
a few hundred times in CI):

* ``from_rest``: any Python value; only ``RestDecodeError``, one bounded line;
  what it accepts is storable and round trips;
* ``to_rest``: any message; a storable one round trips, ``is_final`` agrees;
* ``framing``: any bytes into the delimited reader; only ``FramingError``,
  after every record before the bad one;
* ``cli``: any bytes into ``shellinfo convert``/``validate``, every format;
  exit 0 or 2, one line per problem, the two commands agree;
* ``server``: any request bytes to every rpc of a real server on
  127.0.0.1:0 (never UNKNOWN/INTERNAL), and any run published (accepted runs
  read back through GetRun, ListRuns and WatchRuns).

How inputs are made. Hypothesis is thorough but costly (a few hundred inputs
a second here), so each target draws a pool of ``--pool`` inputs with
hypothesis and derives the rest from that pool by cheap splicing (two pool
inputs combined) and byte flips, with ``random.Random(seed)``. The split is
printed. Everything is deterministic for a given ``--seed``.

``--count`` (default 10**6) is the number of inputs shared by the in-process
targets (from_rest, to_rest, framing, cli, weighted 49:49:49:3 since a cli
input runs the command four times, at a few ms each); the server target gets
``--server-count`` (default 20 000) as its calls take milliseconds each.
Every failure prints the target, the seed, the input's index, its repr (and
hex for bytes) and the error; the exit status is 1 if any target failed.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import strategies as S
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from shellinfo_grpc import ProtectionShellInfo

__all__ = ["TARGETS", "main"]

IN_PROCESS: Final = ("from_rest", "to_rest", "framing", "cli")
WEIGHTS: Final = {"from_rest": 49, "to_rest": 49, "framing": 49, "cli": 3}
#: Failures kept in full per target; the rest are only counted.
MAX_REPORTED: Final = 5


@dataclass
class Tally:
    """What one target did."""

    name: str
    pooled: int = 0
    derived: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    failed: int = 0


def draw_pool(strategy: st.SearchStrategy[Any], size: int, at: int) -> list[Any]:
    """``size`` inputs drawn by hypothesis (generation only, no shrinking), reproducibly from ``at``."""
    pool: list[Any] = []

    @seed(at)
    @settings(
        max_examples=size,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        pool.append(value)

    collect()
    return pool


# --- deriving inputs from a pool ---------------------------------------------------


def _flip(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    at = rng.randrange(len(data))
    return data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]


def _splice_bytes(rng: random.Random, a: bytes, b: bytes) -> bytes:
    return a[: rng.randint(0, len(a))] + b[rng.randint(0, len(b)) :]


def derive_record(rng: random.Random, a: Any, b: Any) -> Any:
    """A record with keys of both parents (plain dicts), else one parent as is."""
    if type(a) is dict and type(b) is dict:
        items = list(a.items()) + list(b.items())
        rng.shuffle(items)
        out: dict[Any, Any] = {}
        for key, value in items[: rng.randint(0, len(items))]:
            with contextlib.suppress(Exception):  # hostile keys may refuse hashing or comparing
                out[key] = value
        return out
    return a if rng.random() < 0.5 else b


_FIELDS: Final = [f.name for f in ProtectionShellInfo.DESCRIPTOR.fields]


def derive_message(rng: random.Random, a: ProtectionShellInfo, b: ProtectionShellInfo) -> ProtectionShellInfo:
    """Each field (set or unset) from one parent or the other; unknown fields of the first kept."""
    out = ProtectionShellInfo()
    out.CopyFrom(a)
    for name in _FIELDS:
        if rng.random() < 0.5:
            out.ClearField(name)  # type: ignore[arg-type]  # a name from the descriptor
            if b.HasField(name):  # type: ignore[arg-type]
                if name == "unrecognized":
                    out.unrecognized.CopyFrom(b.unrecognized)
                else:
                    setattr(out, name, getattr(b, name))
    return out


def derive_stream(rng: random.Random, a: tuple[bytes, int], b: tuple[bytes, int]) -> tuple[bytes, int]:
    """Two streams one after the other (the first's valid records stay valid), or one with a byte flipped."""
    if rng.random() < 0.5:
        return a[0] + b[0], a[1]
    return _flip(rng, a[0]), 0


def derive_cli(rng: random.Random, a: tuple[str, bytes], b: tuple[str, bytes]) -> tuple[str, bytes]:
    """The first input's format, with the two inputs spliced or one byte flipped."""
    if rng.random() < 0.5:
        return a[0], _splice_bytes(rng, a[1], b[1])
    return a[0], _flip(rng, a[1])


@dataclass(frozen=True)
class Target:
    """A generator, a property and a way to derive more inputs from a pool."""

    strategy: Callable[[], st.SearchStrategy[Any]]
    check: Callable[[Any], None]
    derive: Callable[[random.Random, Any, Any], Any]


TARGETS: Final[dict[str, Target]] = {
    "from_rest": Target(S.python_records, S.check_from_rest, derive_record),
    "to_rest": Target(S.messages, S.check_to_rest, derive_message),
    "framing": Target(S.delimited_streams, S.check_framing, derive_stream),
    "cli": Target(S.cli_inputs, S.check_cli, derive_cli),
}


def describe(value: Any) -> str:
    """The input, for a reproduction: its repr (cut at 2000 characters) and hex for bytes."""
    try:
        text = repr(value)
    except Exception as exc:  # a hostile value's repr may raise
        text = f"<repr failed: {type(exc).__name__}>"
    if len(text) > 2000:
        text = text[:2000] + f"... ({len(text) - 2000} more characters)"
    blobs = (
        [value]
        if isinstance(value, bytes)
        else [v for v in value if isinstance(v, bytes)]
        if isinstance(value, tuple)
        else []
    )
    return text + "".join(f"\n    hex: {blob[:4096].hex()}" for blob in blobs)


def run_checks(tally: Tally, check: Callable[[Any], None], inputs: Sequence[Any] | Any, start: int, seed_: int) -> None:
    for index, value in enumerate(inputs, start):
        try:
            check(value)
        except Exception as exc:
            tally.failed += 1
            if len(tally.failures) < MAX_REPORTED:
                where = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:1500]
                tally.failures.append(
                    f"{tally.name} input #{index} (seed {seed_}): {where}\n    input: {describe(value)}"
                )


def fuzz_in_process(name: str, count: int, pool_size: int, seed_: int) -> Tally:
    """Check ``count`` inputs of one in-process target: a hypothesis pool, then derived inputs."""
    target = TARGETS[name]
    tally = Tally(name)
    begin = time.perf_counter()
    pool = draw_pool(target.strategy(), min(pool_size, count), seed_)
    tally.pooled = len(pool)
    run_checks(tally, target.check, pool, 0, seed_)
    rng = random.Random(f"{seed_}:{name}")
    todo = count - len(pool)
    done = 0
    while done < todo:
        batch = min(10_000, todo - done)
        derived = [target.derive(rng, rng.choice(pool), rng.choice(pool)) for _ in range(batch)]
        run_checks(tally, target.check, derived, len(pool) + done, seed_)
        done += batch
        if done % 100_000 == 0:
            print(
                f"    {name}: {len(pool) + done} inputs, {time.perf_counter() - begin:.0f} s, {tally.failed} failed",
                flush=True,
            )
    tally.derived = done
    tally.seconds = time.perf_counter() - begin
    return tally


def fuzz_server(count: int, pool_size: int, seed_: int) -> Tally:
    """Request bytes to every rpc, and runs to publish, against one real server on 127.0.0.1:0."""
    tally = Tally("server")
    begin = time.perf_counter()
    server = S.ServerThread()
    try:
        rng = random.Random(f"{seed_}:server")
        methods = list(S.REQUEST_TYPES)
        per = max(count // (len(methods) + 1), 1)
        for method in methods:
            share = per // 10 if method == "WatchRuns" else per  # a watch that parses waits 0.2 s for its deadline
            pool = draw_pool(st.lists(S.request_bytes(method), min_size=1, max_size=3), min(pool_size, share), seed_)
            tally.pooled += len(pool)

            def check(data: list[bytes], method: str = method) -> None:
                S.check_request(server, method, data)

            run_checks(tally, check, pool, 0, seed_)
            derived = [[_flip(rng, rng.choice(rng.choice(pool)))] for _ in range(max(share - len(pool), 0))]
            run_checks(tally, check, derived, len(pool), seed_)
            tally.derived += len(derived)
        runs = draw_pool(
            st.tuples(S.sources.filter(lambda s: len(s.encode()) <= 256), S.publish_runs()), min(pool_size, per), seed_
        )
        tally.pooled += len(runs)
        run_checks(tally, lambda item: S.check_published(server, *item), runs, 0, seed_)
    finally:
        server.close()
    tally.seconds = time.perf_counter() - begin
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--count", type=int, default=10**6, help="inputs shared by the in-process targets (default 10**6)"
    )
    parser.add_argument("--server-count", type=int, default=20_000, help="inputs for the server target (default 20000)")
    parser.add_argument(
        "--target", action="append", choices=[*IN_PROCESS, "server"], help="run only this target (repeatable)"
    )
    parser.add_argument(
        "--pool", type=int, default=3000, help="inputs hypothesis draws per target before deriving (default 3000)"
    )
    parser.add_argument("--seed", type=int, default=20261201, help="seed of hypothesis and of the derivation")
    parser.add_argument(
        "--weights",
        default=",".join(f"{k}={v}" for k, v in WEIGHTS.items()),
        help="how --count is shared by the in-process targets (default %(default)s)",
    )
    parser.add_argument(
        "--no-known-open", action="store_true", help="do not step around the classes strategies.KNOWN_OPEN lists"
    )
    args = parser.parse_args(argv)
    chosen = args.target or [*IN_PROCESS, "server"]
    local = [name for name in IN_PROCESS if name in chosen]
    weights = {k: int(v) for k, _, v in (part.partition("=") for part in args.weights.split(","))}
    weight = sum(weights.get(name, 0) for name in local) or 1
    if args.no_known_open:
        S.KNOWN_OPEN.clear()
    print(f"fuzz: seed {args.seed}; known open classes stepped around: {sorted(S.KNOWN_OPEN) or 'none'}", flush=True)
    tallies: list[Tally] = []
    begin = time.perf_counter()
    counts = {name: args.count * weights.get(name, 0) // weight for name in local}
    if local:
        counts[local[0]] += args.count - sum(counts.values())  # what rounding left over
    for name in local:
        count = counts[name]
        tally = fuzz_in_process(name, count, args.pool, args.seed)
        tallies.append(tally)
        print(
            f"  {name:<10} {tally.pooled + tally.derived:>9} inputs ({tally.pooled} drawn, {tally.derived} derived)"
            f"  {tally.seconds:8.1f} s  {tally.failed} failed",
            flush=True,
        )
    if "server" in chosen:
        tally = fuzz_server(args.server_count, args.pool, args.seed)
        tallies.append(tally)
        print(
            f"  {'server':<10} {tally.pooled + tally.derived:>9} inputs ({tally.pooled} drawn, {tally.derived} derived)"
            f"  {tally.seconds:8.1f} s  {tally.failed} failed",
            flush=True,
        )
    total = sum(t.pooled + t.derived for t in tallies)
    failed = sum(t.failed for t in tallies)
    print(f"fuzz: {total} inputs in {time.perf_counter() - begin:.1f} s, {failed} failed")
    for tally in tallies:
        for failure in tally.failures:
            print(f"FAILURE {failure}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    sys.exit(main())
