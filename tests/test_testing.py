"""shellinfo_grpc.testing.FakeCluster on its own, driven from blocking code with a plain HTTP client.

It must answer like a cluster: login and token expiry, API keys, runs grouped
per job and newest first, cut at numRuns, the query filters, runs that
progress with the clock, errors as the cluster sends them, and the faults a
test scripts. The bridge's own tests (test_bridge.py) use it from asyncio.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from shellinfo_grpc.testing import API_PREFIX, FakeCluster

pytestmark = pytest.mark.timeout(60)

START = 1_700_000_000.0


def call(
    cluster: FakeCluster, endpoint: str, *, query: str = "", body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    """One request; the status, the JSON body and the headers (also for 4xx/5xx)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{cluster.url}{API_PREFIX}/{endpoint}{'?' + query if query else ''}",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST" if data is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # loopback: the fake
            return answer.status, json.load(answer), dict(answer.headers)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read()), dict(error.headers)


def login(cluster: FakeCluster, password: str = "admin") -> dict[str, str]:
    status, body, _ = call(cluster, "accessTokens", body={"username": "admin", "password": password})
    assert status == 201, body
    assert body["tokenType"] == "Bearer"
    return {"Authorization": f"Bearer {body['accessToken']}"}


def runs(cluster: FakeCluster, auth: dict[str, str], query: str = "onlyReturnShellInfo=true") -> list[dict[str, Any]]:
    status, body, _ = call(cluster, "protectionRuns", query=query, headers=auth)
    assert status == 200, body
    assert isinstance(body, list)
    return body


def test_answers_are_grouped_per_job_newest_first_and_cut_at_num_runs() -> None:
    with FakeCluster(start_time=START) as cluster:
        b = cluster.add_job("b", job_id=20)
        a = cluster.add_job("a", job_id=10)
        for i in range(3):
            cluster.add_run(b, start=START - 100 + i)
            cluster.add_run(a, start=START - 50 + i)
        auth = login(cluster)
        everything = runs(cluster, auth)
        order = [(e["jobId"], e["protectionShellInfo"]["startTimeUsecs"]) for e in everything]
        assert order == sorted(order, key=lambda item: (item[0], -item[1]))
        cut = runs(cluster, auth, "onlyReturnShellInfo=true&numRuns=4")
        assert cut == everything[:4]  # the same trailing job is dropped on every poll
        assert {e["jobId"] for e in cut} == {a, b}
        only_b = runs(cluster, auth, f"onlyReturnShellInfo=true&jobId={b}")
        assert [e["jobId"] for e in only_b] == [b, b, b]
        late = runs(cluster, auth, f"onlyReturnShellInfo=true&startTimeUsecs={round((START - 49) * 1e6)}")
        assert [e["protectionShellInfo"]["startTimeUsecs"] for e in late] == [
            round((START - 48) * 1e6),
            round((START - 49) * 1e6),
        ]
        element = everything[0]
        assert element["jobName"] == "a"
        assert element["jobUid"] == {
            "clusterId": cluster.cluster_id,
            "clusterIncarnationId": cluster.cluster_incarnation_id,
            "id": a,
        }


def test_runs_progress_with_the_clock_and_end_only_when_final() -> None:
    with FakeCluster(start_time=START) as cluster:
        job = cluster.add_job("vm")
        run = cluster.add_run(job, timeline=[("kAccepted", 0), ("kRunning", 60), ("kFailure", 120)], error="disk")
        future = cluster.add_run(job, start=START + 1000)
        auth = login(cluster)
        seen = []
        for _ in range(4):
            (element,) = runs(cluster, auth)
            seen.append(element["protectionShellInfo"])
            cluster.advance(60)
        assert [s["status"] for s in seen] == ["kAccepted", "kRunning", "kFailure", "kFailure"]
        assert all("endTimeUsecs" not in s and "error" not in s for s in seen[:2])
        assert seen[2]["endTimeUsecs"] == round((START + 120) * 1e6)
        assert seen[2]["error"] == "disk"
        # endTimeUsecs keeps only runs that completed before it: runs in progress are dropped.
        cluster.set_status(run, "kFailure")
        cluster.advance(1000)
        assert cluster.shell_info(future) is not None
        ended = runs(cluster, auth, f"onlyReturnShellInfo=true&endTimeUsecs={cluster.now_usecs()}")
        assert [e["protectionShellInfo"]["jobRunId"] for e in ended] == [run]


def test_without_only_return_shell_info_there_is_a_backup_run_instead() -> None:
    with FakeCluster(start_time=START) as cluster:
        cluster.add_run(cluster.add_job("vm"))
        auth = login(cluster)
        (element,) = runs(cluster, auth, "")
        assert "protectionShellInfo" not in element
        assert element["backupRun"]["status"] == "kAccepted"
        assert "sourceBackupStatus" in element["backupRun"]
        (element,) = runs(cluster, auth, "excludeTasks=true")
        assert "sourceBackupStatus" not in element["backupRun"]


def test_tokens_expire_and_errors_look_like_the_clusters() -> None:
    with FakeCluster(start_time=START, token_lifetime=100, api_keys=["k1"]) as cluster:
        auth = login(cluster)
        assert call(cluster, "accessTokens", body={"username": "admin", "password": "no"})[:2] == (
            401,
            {"errorCode": "KStatusUnauthorized", "message": "Invalid username or password."},
        )
        assert call(cluster, "protectionJobs", headers=auth)[0] == 200
        cluster.advance(100)
        assert call(cluster, "protectionJobs", headers=auth)[:2] == (401, {"message": "Token expired"})
        assert call(cluster, "protectionJobs", headers={"Authorization": "Bearer nope"})[1] == {
            "errorCode": "KStatusUnauthorized",
            "message": "The access token is invalid.",
        }
        assert call(cluster, "protectionJobs", headers={"apiKey": "k1"})[0] == 200
        assert call(cluster, "protectionJobs", headers={"apiKey": "k2"})[0] == 401
        helios = {"apiKey": "k1", "accessClusterId": str(cluster.cluster_id)}
        assert call(cluster, "protectionJobs", headers=helios)[0] == 200
        assert call(cluster, "protectionJobs", headers={"apiKey": "k1", "accessClusterId": "1"})[0] == 404
        status, body, _ = call(cluster, "protectionRuns", query="numRuns=many", headers={"apiKey": "k1"})
        assert (status, body["errorCode"]) == (400, "KStatusBadRequest")
        assert "numRuns" in body["message"]


def test_scripted_faults_and_the_request_log() -> None:
    with FakeCluster(start_time=START, max_window=7 * 86400) as cluster:
        auth = login(cluster, "admin")
        cluster.fail_next(429, retry_after=20, endpoint="protectionRuns")
        cluster.fail_next(500, times=2)
        status, body, headers = call(cluster, "protectionRuns", headers=auth)
        assert (status, headers["Retry-After"], body["errorCode"]) == (429, "20", "KStatusTooManyRequests")
        assert call(cluster, "protectionJobs", headers=auth)[0] == 500
        assert call(cluster, "protectionRuns", headers=auth)[0] == 500
        # A window wider than max_window is a 500, as on some clusters.
        assert call(cluster, "protectionRuns", headers=auth)[0] == 500
        recent = f"startTimeUsecs={round((START - 3600) * 1e6)}"
        assert call(cluster, "protectionRuns", query=recent, headers=auth)[0] == 200
        cluster.slow_next(0.5, endpoint="protectionJobs")
        began = time.monotonic()
        assert call(cluster, "protectionJobs", headers=auth)[0] == 200
        assert time.monotonic() - began >= 0.5
        log = cluster.requests
        assert [(r.endpoint, r.status) for r in log] == [
            ("accessTokens", 201),
            ("protectionRuns", 429),
            ("protectionJobs", 500),
            ("protectionRuns", 500),
            ("protectionRuns", 500),
            ("protectionRuns", 200),
            ("protectionJobs", 200),
        ]
        assert log[0].username == "admin"
        assert "admin" not in repr([r for r in log if r.endpoint != "accessTokens"])
        assert all("password" not in json.dumps(dict(r.query)) for r in log)
        assert log[5].query == {"startTimeUsecs": str(round((START - 3600) * 1e6))}


def test_usable_from_several_threads_and_closed_twice() -> None:
    cluster = FakeCluster(start_time=START)
    cluster.start()
    try:
        job = cluster.add_job("vm")
        auth = login(cluster)

        def add() -> None:
            for _ in range(50):
                cluster.add_run(job)

        threads = [threading.Thread(target=add) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(runs(cluster, auth)) == 200
    finally:
        cluster.close()
        cluster.close()
    with pytest.raises(RuntimeError, match="not started"):
        _ = cluster.url


@pytest.mark.parametrize(
    ("timeline", "message"),
    [([], "timeline"), ([("kRunning", 10), ("kAccepted", 0)], "time order")],
)
def test_bad_timelines_are_refused(timeline: list[tuple[str, float]], message: str) -> None:
    cluster = FakeCluster()
    job = cluster.add_job("vm")
    with pytest.raises(ValueError, match=message):
        cluster.add_run(job, timeline=timeline)
