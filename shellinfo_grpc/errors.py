"""The one error hierarchy of shellinfo-grpc.

Every error a caller can cause derives from :class:`ShellInfoError`. Errors
about a record name the REST key they concern (``field``) and say why, so that
a command-line tool can print them as one readable line.
"""

from __future__ import annotations

from collections.abc import Sequence

from shellinfo_grpc._status import (
    KEY_HEAD_REVISION,
    KEY_OLDEST_REVISION,
    KEY_REQUESTED_REVISION,
    REASON_HISTORY_EXPIRED,
    REASON_REVISION_IN_FUTURE,
    REASON_STORE_UNAVAILABLE,
)

__all__ = [
    "ClusterAuthError",
    "ClusterError",
    "ClusterProtocolError",
    "ClusterUnavailable",
    "ConfigurationError",
    "FramingError",
    "HistoryExpired",
    "RestDecodeError",
    "RevisionInFuture",
    "RunRejected",
    "ServiceError",
    "ShellInfoError",
    "StoreUnavailable",
]


class ShellInfoError(Exception):
    """Base class of every error raised by shellinfo-grpc."""


class RestDecodeError(ShellInfoError, ValueError):
    """A REST ``ProtectionShellInfo`` object could not be turned into a message.

    ``field`` is the REST key at fault (``"jobRunId"``, ``"status"``, ...), or
    ``None`` when the record as a whole is wrong (not a JSON object, say).
    ``reason`` says what is wrong with it.
    """

    def __init__(self, field: str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field is not None else reason)

    def __reduce__(self) -> tuple[type[RestDecodeError], tuple[str | None, str]]:
        return (type(self), (self.field, self.reason))


class FramingError(ShellInfoError, ValueError):
    """A length-delimited binary stream is truncated or corrupt.

    ``index`` is the zero-based position of the record that could not be read;
    every record before it was read (and delivered) correctly. ``offset`` is the
    byte offset in the stream where that record starts.
    """

    def __init__(self, index: int, offset: int, reason: str) -> None:
        self.index = index
        self.offset = offset
        self.reason = reason
        super().__init__(f"record {index} (byte offset {offset}): {reason}")

    def __reduce__(self) -> tuple[type[FramingError], tuple[int, int, str]]:
        return (type(self), (self.index, self.offset, self.reason))


class ServiceError(ShellInfoError):
    """The run-update service refused or failed a request.

    ``code`` is the name of the gRPC status code (``"INVALID_ARGUMENT"``,
    ``"FAILED_PRECONDITION"``, ``"UNAVAILABLE"``, ...), kept as a string so that
    this module does not import grpc. ``reason`` is the machine-readable reason
    of the google.rpc ErrorInfo detail (``"RUN_FINAL"``, ...), or ``""``;
    ``metadata`` its metadata; ``violations`` the (REST key, description) pairs
    of the BadRequest detail.
    """

    def __init__(
        self,
        code: str,
        reason: str,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.code = code
        self.reason = reason
        self.message = message
        self.violations = tuple(violations)
        self.metadata = dict(metadata or {})
        super().__init__(f"{code}: {message}")

    @property
    def field(self) -> str | None:
        """The first REST key at fault, if the error names one."""
        return self.violations[0][0] if self.violations else None

    def __reduce__(self) -> tuple[type[ServiceError], tuple[object, ...]]:
        return (type(self), (self.code, self.reason, self.message, self.violations, self.metadata))


class RunRejected(ServiceError):
    """An update broke a rule of the service (bad run, final status changed)."""


class HistoryExpired(ServiceError):
    """A watch asked to start before the oldest revision still retained.

    ``oldest_revision`` is the oldest revision a watch can start from now.
    """

    def __init__(self, requested: int, oldest_revision: int) -> None:
        self.requested = requested
        self.oldest_revision = oldest_revision
        super().__init__(
            "OUT_OF_RANGE",
            REASON_HISTORY_EXPIRED,
            f"revision {requested} is no longer retained; the oldest available is {oldest_revision}",
            metadata={KEY_OLDEST_REVISION: str(oldest_revision), KEY_REQUESTED_REVISION: str(requested)},
        )

    def __reduce__(self) -> tuple[type[ServiceError], tuple[object, ...]]:
        return (type(self), (self.requested, self.oldest_revision))


class RevisionInFuture(ServiceError):
    """A watch asked to start beyond the newest revision + 1.

    The store behind the service was replaced or reset, so the revisions the
    watcher waits for would be handed out again for other updates: it must not
    silently start over. ``head_revision`` is the newest revision the service has.
    """

    def __init__(self, requested: int, head_revision: int) -> None:
        self.requested = requested
        self.head_revision = head_revision
        super().__init__(
            "OUT_OF_RANGE",
            REASON_REVISION_IN_FUTURE,
            f"revision {requested} is beyond the newest revision {head_revision} + 1: the store was replaced or reset",
            [("startRevision", f"at most {head_revision + 1}")],
            metadata={KEY_HEAD_REVISION: str(head_revision), KEY_REQUESTED_REVISION: str(requested)},
        )

    def __reduce__(self) -> tuple[type[ServiceError], tuple[object, ...]]:
        return (type(self), (self.requested, self.head_revision))


class StoreUnavailable(ServiceError):
    """The store behind the service cannot be reached now; retry later."""

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", REASON_STORE_UNAVAILABLE, message)

    def __reduce__(self) -> tuple[type[ServiceError], tuple[object, ...]]:
        return (type(self), (self.message,))


class ConfigurationError(ShellInfoError, ValueError):
    """A setting that cannot work: an unknown store URL, a missing TLS file, ..."""


# --- a Cohesity cluster's REST API (the bridge) ---------------------------------------


class ClusterError(ShellInfoError):
    """A request to a cluster failed. ``cluster`` is its base URL; ``status`` the HTTP status, if any."""

    def __init__(self, cluster: str, message: str, status: int | None = None) -> None:
        self.cluster = cluster
        self.status = status
        self.message = message
        super().__init__(f"{cluster}: {message}")


class ClusterAuthError(ClusterError):
    """The cluster refused the credentials (login failed, or a 401 persisted after a new login)."""


class ClusterUnavailable(ClusterError):
    """The cluster kept answering 429 or 5xx, or timing out, through every retry.

    ``retry_after`` is the wait in seconds the cluster last asked for (its
    ``Retry-After``), or ``None``.
    """

    def __init__(self, cluster: str, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(cluster, message, status)
        self.retry_after = retry_after


class ClusterProtocolError(ClusterError):
    """The cluster answered something that is not what the API describes (not JSON, wrong shape, 4xx)."""
