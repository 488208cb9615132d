"""What several test modules share: running an async test body with a deadline."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["DEADLINE", "aio_test"]

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
