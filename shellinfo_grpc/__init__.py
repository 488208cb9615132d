"""shellinfo-grpc: Cohesity protection-run status as a versioned Protobuf/gRPC contract.

The public surface of the codec: the ``shellinfo.v1`` message and enums, the
adapters to and from the REST dictionary form and the official SDK, binary
framing, and the error hierarchy. Importing this package does not import grpc;
the gRPC service and client live in their own modules.
"""

from __future__ import annotations

from shellinfo_grpc._gen.shellinfo.v1.protection_shell_info_pb2 import (
    ExtraRestKey,
    ProtectionShellInfo,
    RunStatus,
    RunType,
)
from shellinfo_grpc.errors import FramingError, RestDecodeError, ShellInfoError
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_RECORD_SIZE",
    "REST_KEYS",
    "ExtraRestKey",
    "Frame",
    "FramingError",
    "ProtectionShellInfo",
    "RestDecodeError",
    "RunStatus",
    "RunType",
    "ShellInfoError",
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
