"""The job context of a REST ``ProtectionRunInstance``, as a ``ProtectionJob`` message.

``GET /public/protectionRuns`` answers ``ProtectionRunInstance`` objects: the
run's ``protectionShellInfo`` beside the job it belongs to (``jobId``,
``jobName``, ``jobUid`` = ``{clusterId, clusterIncarnationId, id}``) and keys
this package does not carry (``backupRun``, ``copyRun``, ``viewBoxId``, ...).
:func:`from_run_instance` splits one into the run and its job;
:func:`job_from_rest` and :func:`job_to_rest` convert the job part alone.

As in :mod:`shellinfo_grpc.rest`: ``null`` and an absent key both mean
unset; integers are JSON numbers within int64; a value of the wrong type is a
:class:`~shellinfo_grpc.errors.RestDecodeError` naming the key
(``jobUid.clusterId``, say). Like the rest of the codec, this module imports
neither grpc nor the SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from shellinfo_grpc._gen.shellinfo.v1 import protection_job_pb2 as _job_pb
from shellinfo_grpc._gen.shellinfo.v1 import protection_shell_info_pb2 as _pb
from shellinfo_grpc.errors import RestDecodeError
from shellinfo_grpc.rest import from_rest

__all__ = ["JOB_KEYS", "from_run_instance", "job_from_rest", "job_to_rest"]

#: The keys of a ProtectionRunInstance that make up its job.
JOB_KEYS: Final = ("jobId", "jobName", "jobUid")

_UID_KEYS: Final = (("clusterId", "cluster_id"), ("clusterIncarnationId", "cluster_incarnation_id"), ("id", "id"))
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


def _int(value: Any, key: str) -> int:
    if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
        raise RestDecodeError(key, f"expected an integer within int64, got {value!r}")
    return value


def job_from_rest(data: Mapping[str, Any]) -> _job_pb.ProtectionJob | None:
    """The job of a ``ProtectionRunInstance`` (or any object with its job keys); ``None`` when it has none."""
    if not isinstance(data, Mapping):
        raise RestDecodeError(None, f"expected a JSON object, got {type(data).__name__}")
    job = _job_pb.ProtectionJob()
    job_id = data.get("jobId")
    if job_id is not None:
        job.job_id = _int(job_id, "jobId")
    name = data.get("jobName")
    if name is not None:
        if not isinstance(name, str):
            raise RestDecodeError("jobName", f"expected a string, got {name!r}")
        try:
            job.job_name = name
        except ValueError:
            raise RestDecodeError("jobName", "is not valid Unicode text") from None
    uid = data.get("jobUid")
    if uid is not None:
        if not isinstance(uid, Mapping):
            raise RestDecodeError("jobUid", f"expected an object, got {uid!r}")
        job.job_uid.SetInParent()
        for key, attr in _UID_KEYS:
            value = uid.get(key)
            if value is not None:
                setattr(job.job_uid, attr, _int(value, f"jobUid.{key}"))
    return job if job.ListFields() else None


def job_to_rest(job: _job_pb.ProtectionJob) -> dict[str, Any]:
    """The REST keys of a job (``jobId``, ``jobName``, ``jobUid``), set fields only."""
    out: dict[str, Any] = {}
    if job.HasField("job_id"):
        out["jobId"] = job.job_id
    if job.HasField("job_name"):
        out["jobName"] = job.job_name
    if job.HasField("job_uid"):
        uid = job.job_uid
        out["jobUid"] = {key: getattr(uid, attr) for key, attr in _UID_KEYS if uid.HasField(attr)}  # type: ignore[arg-type]
    return out


def from_run_instance(
    data: Mapping[str, Any], *, strict: bool = False
) -> tuple[_pb.ProtectionShellInfo, _job_pb.ProtectionJob | None]:
    """Split a ``ProtectionRunInstance`` into its run (``protectionShellInfo``) and its job.

    The run goes through :func:`~shellinfo_grpc.rest.from_rest` (``strict``
    as there; errors name the key inside ``protectionShellInfo``). Keys of
    the instance other than the job's and ``protectionShellInfo`` are ignored.
    """
    if not isinstance(data, Mapping):
        raise RestDecodeError(None, f"expected a JSON object, got {type(data).__name__}")
    info = data.get("protectionShellInfo")
    if not isinstance(info, Mapping):
        raise RestDecodeError("protectionShellInfo", "is missing: ask with onlyReturnShellInfo=true")
    return from_rest(info, strict=strict), job_from_rest(data)
