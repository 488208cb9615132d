"""An HTTP client of one Cohesity cluster's REST API v1, for the bridge.

It speaks exactly what a poller of protection runs needs, as the cluster and
the official SDK speak it: token login (``POST /public/accessTokens``) or an
API key (``apiKey`` header, plus ``accessClusterId`` for Helios), the run list
(``GET /public/protectionRuns``) and the job list (``GET /public/protectionJobs``).

What it does about a real cluster's behaviour:

* a 401 on a token session logs in again and retries the request once;
* 429, 5xx, timeouts and connection failures are retried up to
  ``RetryPolicy.attempts`` times with exponential backoff and jitter, waiting
  at least what a ``Retry-After`` header asks for; then the request fails with
  :class:`ClusterUnavailable`, which carries the wait the cluster asked for;
* every request has a connect and a read timeout;
* TLS certificates are verified unless the caller explicitly turns that off.

Secrets never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from shellinfo_grpc.errors import (
    ClusterAuthError,
    ClusterError,
    ClusterProtocolError,
    ClusterUnavailable,
    ConfigurationError,
)

__all__ = [
    "API_PREFIX",
    "ClusterClient",
    "Credentials",
    "RetryPolicy",
]

log = logging.getLogger("shellinfo_grpc.bridge")

#: Where the v1 public API lives under a cluster's base URL.
API_PREFIX: Final = "/irisservices/api/v1/public"

#: The longest ``Retry-After`` honoured, in seconds; longer asks are cut to it.
MAX_RETRY_AFTER: Final = 600.0


@dataclass(frozen=True)
class Credentials:
    """How to authenticate: a user (``username``, ``password``, ``domain``) or an ``api_key``.

    ``access_cluster_id`` goes with an API key to route requests through
    Helios to one cluster. The secrets are left out of ``repr``.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    domain: str = "LOCAL"
    api_key: str | None = field(default=None, repr=False)
    access_cluster_id: str | None = None

    def __post_init__(self) -> None:
        if (self.username is None) == (self.api_key is None):
            raise ConfigurationError("credentials: give a username and password, or an API key (exactly one)")
        if self.username is not None and not self.password:
            raise ConfigurationError("credentials: a username needs a password")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigurationError("credentials: the API key is empty")
        if self.access_cluster_id is not None and self.api_key is None:
            raise ConfigurationError("credentials: accessClusterId goes with an API key only")


@dataclass(frozen=True)
class RetryPolicy:
    """How one request is retried on 429, 5xx, timeouts and connection failures.

    The n-th retry waits a random time between half of and the full
    ``min(initial_delay * 2 ** (n - 1), max_delay)`` seconds, and at least the
    cluster's ``Retry-After`` (up to :data:`MAX_RETRY_AFTER`). ``attempts`` is
    the most tries of one request, the first included.
    """

    attempts: int = 3
    initial_delay: float = 1.0
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError("retry attempts: at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("retry delays must not be negative")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the ``retry``-th retry (1-based), with jitter."""
        ceiling = min(self.initial_delay * 2.0 ** min(max(retry - 1, 0), 62), self.max_delay)
        # Jitter spreads the retries of many bridges; no cryptographic need.
        wait = random.uniform(ceiling / 2, ceiling)  # noqa: S311
        if retry_after is not None:
            wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
        return wait


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds (delay-seconds or an HTTP date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now(), 0.0)


def ssl_context(*, ca_file: Path | str | None, insecure_skip_verify: bool) -> ssl.SSLContext | bool:
    """The TLS setting of a session: verify (system roots or ``ca_file``), or explicitly not."""
    if insecure_skip_verify:
        if ca_file is not None:
            raise ConfigurationError("give a CA file or skip verification, not both")
        return False
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot read the CA file {ca_file}: {exc}") from None


def _message(body: bytes) -> str:
    """The readable part of a cluster's error body (``errorCode``: ``message``), bounded."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return text[:200] or "(no body)"
    if isinstance(data, dict):
        message = str(data.get("message", ""))[:200]
        code = data.get("errorCode")
        return f"{code}: {message}" if code else message or "(no message)"
    return str(data)[:200]


class ClusterClient:
    """Requests to one cluster over one ``aiohttp`` session (see the module docstring).

    ``url`` is the base URL (``https://host[:port]``). ``connect_timeout``
    and ``read_timeout`` bound each request, in seconds: connecting, and
    waiting for each piece of the answer. ``tls`` is what :func:`ssl_context`
    returns. ``name`` names the cluster in logs (the URL when not given).
    Create it inside the event loop that uses it; close it with :meth:`close`.
    ``on_status`` is told every HTTP status received (and ``"timeout"`` /
    ``"connection"`` for requests that got none), for metrics.
    """

    def __init__(
        self,
        url: str,
        credentials: Credentials,
        *,
        tls: ssl.SSLContext | bool = True,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        on_status: Callable[[str], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        self._credentials = credentials
        self._retry = retry or RetryPolicy()
        self._on_status = on_status or (lambda _status: None)
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        connector = aiohttp.TCPConnector(ssl=tls, limit=4)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, raise_for_status=False)
        self._authorization: str | None = None
        self._login_lock = asyncio.Lock()

    async def close(self) -> None:
        """Close the session and its connections."""
        await self._session.close()

    # --- the endpoints ----------------------------------------------------------------

    async def protection_runs(
        self, *, start_time_usecs: int, num_runs: int, job_id: int | None = None
    ) -> list[dict[str, Any]]:
        """``GET protectionRuns``: shell info only, no tasks, from ``start_time_usecs``, at most ``num_runs``.

        Never sends ``endTimeUsecs``: it would drop the runs still in progress.
        """
        params = {
            "onlyReturnShellInfo": "true",
            "excludeTasks": "true",
            "startTimeUsecs": str(start_time_usecs),
            "numRuns": str(num_runs),
        }
        if job_id is not None:
            params["jobId"] = str(job_id)
        data = await self._get_json("protectionRuns", params)
        return self._objects(data, "protectionRuns")

    async def protection_jobs(self) -> list[dict[str, Any]]:
        """``GET protectionJobs``: every job the cluster lists."""
        data = await self._get_json("protectionJobs", {})
        return self._objects(data, "protectionJobs")

    def _objects(self, data: Any, endpoint: str) -> list[dict[str, Any]]:
        if not isinstance(data, list):
            raise ClusterProtocolError(self.url, f"{endpoint}: expected a JSON array, got {type(data).__name__}")
        return [item for item in data if type(item) is dict]

    # --- authentication ---------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        credentials = self._credentials
        if credentials.api_key is not None:
            headers = {"apiKey": credentials.api_key.strip()}
            if credentials.access_cluster_id is not None:
                headers["accessClusterId"] = credentials.access_cluster_id
            return headers
        if self._authorization is None:
            return {}
        return {"Authorization": self._authorization}

    async def _login(self, stale: str | None) -> None:
        """Log in, unless another request already replaced the ``stale`` authorization."""
        async with self._login_lock:
            if self._authorization is not None and self._authorization != stale:
                return
            credentials = self._credentials
            body = {"username": credentials.username, "password": credentials.password, "domain": credentials.domain}
            status, raw, _ = await self._send("POST", "accessTokens", json_body=body)
            if status in {401, 403}:
                raise ClusterAuthError(self.url, f"login as {credentials.username!r} refused: {_message(raw)}", status)
            if status >= 400:
                raise self._http_error("accessTokens", status, raw, None)
            try:
                data = json.loads(raw)
                token, kind = data["accessToken"], data.get("tokenType") or "Bearer"
            except (ValueError, KeyError, TypeError):
                raise ClusterProtocolError(self.url, "accessTokens: the answer holds no accessToken", status) from None
            if not isinstance(token, str) or not isinstance(kind, str) or not token:
                raise ClusterProtocolError(self.url, "accessTokens: the answer holds no accessToken", status)
            self._authorization = f"{kind} {token}"
            log.info("cluster=%s logged in as %s", self.name, credentials.username)

    # --- requests -------------------------------------------------------------------------

    async def _get_json(self, endpoint: str, params: Mapping[str, str]) -> Any:
        """GET an endpoint: log in first if needed; on 401 log in again and retry once."""
        token_session = self._credentials.api_key is None
        if token_session and self._authorization is None:
            await self._login(None)
        status, raw, _ = await self._send("GET", endpoint, params=params)
        if status == 401 and token_session:
            log.info("cluster=%s %s answered 401 (%s); logging in again", self.name, endpoint, _message(raw))
            await self._login(self._authorization)
            status, raw, _ = await self._send("GET", endpoint, params=params)
        if status in {401, 403}:
            raise ClusterAuthError(self.url, f"{endpoint}: {status} {_message(raw)}", status)
        if status >= 400:
            raise self._http_error(endpoint, status, raw, None)
        try:
            return json.loads(raw)
        except ValueError:
            raise ClusterProtocolError(self.url, f"{endpoint}: the answer is not JSON", status) from None

    def _http_error(self, endpoint: str, status: int, raw: bytes, retry_after: float | None) -> ClusterError:
        if status == 429 or status >= 500:
            return ClusterUnavailable(self.url, f"{endpoint}: {status} {_message(raw)}", status, retry_after)
        return ClusterProtocolError(self.url, f"{endpoint}: {status} {_message(raw)}", status)

    async def _send(
        self,
        method: str,
        endpoint: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> tuple[int, bytes, float | None]:
        """One request with retries on 429, 5xx, timeouts and connection failures.

        Returns the status, body and ``Retry-After`` of the last answer; raises
        :class:`ClusterUnavailable` when every attempt failed that way.
        """
        url = f"{self.url}{API_PREFIX}/{endpoint}"
        retry_after: float | None = None
        problem = ""
        status: int | None = None
        for attempt in range(1, self._retry.attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self._retry.delay(attempt - 1, retry_after))
            headers = self._headers() if endpoint != "accessTokens" else {}
            try:
                async with self._session.request(
                    method, url, params=params, json=json_body, headers=headers, allow_redirects=False
                ) as response:
                    raw = await response.read()
                    status = response.status
                    self._on_status(str(status))
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                self._on_status("timeout")
                status, retry_after, problem = None, None, "timed out"
            except aiohttp.ClientSSLError as exc:
                self._on_status("connection")
                raise ClusterProtocolError(self.url, f"{endpoint}: TLS failed: {exc}") from None
            except aiohttp.ClientError as exc:
                self._on_status("connection")
                status, retry_after, problem = None, None, f"connection failed: {exc}"
            else:
                if status != 429 and status < 500:
                    return status, raw, retry_after
                problem = f"{status} {_message(raw)}"
            log.warning(
                "cluster=%s %s %s (attempt %d of %d)", self.name, endpoint, problem, attempt, self._retry.attempts
            )
        raise ClusterUnavailable(self.url, f"{endpoint}: {problem}", status, retry_after)
