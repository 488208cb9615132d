"""What several test modules share: running an async test body with a deadline, and buf curl."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["BUF", "DEADLINE", "aio_test", "buf_curl"]

#: Seconds an async test body may take before its event loop cancels it.
DEADLINE = 10.0


def aio_test_within(deadline: float) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """A decorator: run an async test body in a fresh event loop, cancelled after ``deadline`` seconds."""

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            async def bounded() -> None:
                await asyncio.wait_for(fn(*args, **kwargs), deadline)

            asyncio.run(bounded())

        return wrapper

    return decorate


#: Run an async test body in a fresh event loop, cancelled after DEADLINE.
aio_test = aio_test_within(DEADLINE)


def _buf() -> str | None:
    found = shutil.which("buf")
    if found:
        return found
    beside = Path(sys.executable).parent / ("buf.exe" if os.name == "nt" else "buf")
    return str(beside) if beside.exists() else None


#: The buf executable (pip install buf-bin), or None.
BUF = _buf()


async def buf_curl(*args: str) -> tuple[int, str, str]:
    """``buf curl --protocol grpc --http2-prior-knowledge ARGS``: exit status, standard output and error."""
    assert BUF is not None
    process = await asyncio.create_subprocess_exec(
        BUF,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 8)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
