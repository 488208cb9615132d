"""What several test modules share: running an async test body with a deadline, finding buf."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["BUF", "DEADLINE", "aio_test"]

#: Seconds an async test body may take before its event loop cancels it.
DEADLINE = 10.0


def aio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop, cancelled after DEADLINE."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            await asyncio.wait_for(fn(*args, **kwargs), DEADLINE)

        asyncio.run(bounded())

    return wrapper


def _buf() -> str | None:
    found = shutil.which("buf")
    if found:
        return found
    beside = Path(sys.executable).parent / ("buf.exe" if os.name == "nt" else "buf")
    return str(beside) if beside.exists() else None


#: The buf executable (pip install buf-bin), or None.
BUF = _buf()
