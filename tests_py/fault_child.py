"""Child process of the fault tests: a semaphore holder that the test stops and continues.

Usage: fault_child.py URL NAME EXPIRY. The child enters a semaphore of capacity 1, prints
"holding", keeps the slot until it reads a line on stdin, leaves the block, and then prints one
line of JSON: {"warnings": [messages of the self_limiters logger at WARNING or above],
"error": the exception that the block raised on entry or exit, or null}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def hold_until_told(url: str, name: str, expiry: str) -> None:
    from self_limiters import Semaphore

    collector = _Collector()
    logging.getLogger("self_limiters").addHandler(collector)

    error = None
    try:
        async with Semaphore(name, 1, expiry=float(expiry), redis_url=url):
            print("holding", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
    except Exception as exc:  # reported to the test, which decides
        error = f"{type(exc).__name__}: {exc}"
    # The exit does not wait for the release; a lost lease is logged once its outcome arrives.
    for _ in range(200):
        if collector.messages:
            break
        await asyncio.sleep(0.01)
    print(json.dumps({"warnings": collector.messages, "error": error}), flush=True)


if __name__ == "__main__":
    asyncio.run(hold_until_told(*sys.argv[1:]))
