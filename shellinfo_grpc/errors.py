"""The one error hierarchy of shellinfo-grpc.

Every error a caller can cause derives from :class:`ShellInfoError`. Errors
about a record name the REST key they concern (``field``) and say why, so that
a command-line tool can print them as one readable line.
"""

from __future__ import annotations

__all__ = ["FramingError", "RestDecodeError", "ShellInfoError"]


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
