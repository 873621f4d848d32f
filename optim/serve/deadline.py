"""A deadline over one exchange that never swallows a cancellation.

`asyncio.wait_for` before Python 3.12 returns the inner result when the awaiting task is cancelled just as the inner
awaitable finishes (CPython gh-86296): a run whose client went away then goes on as if nothing happened, and a
loop that polls (a prompt's /history) polls forever. `asyncio.timeout` (Python 3.11) and async_timeout (its
backport, which aiohttp installs on Python 3.10) raise the cancellation, and turn only their own expiry into
TimeoutError.
"""

import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # pragma: no cover - Python 3.10
    from async_timeout import timeout as deadline

__all__ = ["deadline"]
