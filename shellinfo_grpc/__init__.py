"""shellinfo-grpc: Cohesity protection-run status as a versioned Protobuf/gRPC contract.

The public surface of the codec: the ``shellinfo.v1`` message and enums, the
adapters to and from the REST dictionary form and the official SDK, binary
framing, and the error hierarchy; and, loaded on first use so that importing
the codec never imports grpc, the run-update client (``RunUpdateClient``,
``AsyncRunUpdateClient``). The server lives in :mod:`shellinfo_grpc.server`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import (
    ExtraRestKey,
    ProtectionShellInfo,
    RunStatus,
    RunType,
)
from shellinfo_grpc.errors import (
    ClusterAuthError,
    ClusterError,
    ClusterProtocolError,
    ClusterUnavailable,
    ConfigurationError,
    FramingError,
    HistoryExpired,
    RestDecodeError,
    RevisionInFuture,
    RunRejected,
    ServiceError,
    ShellInfoError,
    StoreUnavailable,
)
from shellinfo_grpc.framing import (
    DEFAULT_MAX_RECORD_SIZE,
    Frame,
    encode_delimited,
    iter_delimited,
    iter_frames,
    read_delimited,
    write_delimited,
)
from shellinfo_grpc.rest import REST_KEYS, from_rest, from_sdk, to_rest, to_sdk

if TYPE_CHECKING:
    from shellinfo_grpc.client import AsyncRunUpdateClient, PublishResult, RunUpdateClient, WatchEvent

__version__ = "0.1.0"

# Names served by the client module, imported (with grpc) only when first used.
_CLIENT_NAMES = frozenset({"AsyncRunUpdateClient", "PublishResult", "RunUpdateClient", "WatchEvent"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from shellinfo_grpc import client  # noqa: PLC0415 - deferred: it imports grpc

        return getattr(client, name)
    raise AttributeError(f"module 'shellinfo_grpc' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_RECORD_SIZE",
    "REST_KEYS",
    "AsyncRunUpdateClient",
    "ClusterAuthError",
    "ClusterError",
    "ClusterProtocolError",
    "ClusterUnavailable",
    "ConfigurationError",
    "ExtraRestKey",
    "Frame",
    "FramingError",
    "HistoryExpired",
    "ProtectionShellInfo",
    "PublishResult",
    "RestDecodeError",
    "RevisionInFuture",
    "RunRejected",
    "RunStatus",
    "RunType",
    "RunUpdateClient",
    "ServiceError",
    "ShellInfoError",
    "StoreUnavailable",
    "WatchEvent",
    "__version__",
    "encode_delimited",
    "from_rest",
    "from_sdk",
    "iter_delimited",
    "iter_frames",
    "read_delimited",
    "to_rest",
    "to_sdk",
    "write_delimited",
]
