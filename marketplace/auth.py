"""Who is asking: API keys from headers, buyer sessions, signed download links, rate limits.

A signed link is ``<path>?expires=<unix seconds>&sig=<hex>`` where ``sig`` is
HMAC-SHA256(secret, path + "\\n" + expires); it is refused once expired or when any byte of the
path or expiry changes. A buyer session cookie is ``<buyer_id>.<HMAC(secret, "session:" +
buyer_id)>``. Signatures are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable

LINK_REFUSALS = ("unsigned", "expired", "bad_signature")


def _mac(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_link(secret: bytes, path: str, expires: int) -> str:
    """The query-carrying link for ``path`` valid until unix time ``expires``."""
    sig = _mac(secret, path + "\n" + str(expires))
    return f"{path}?expires={expires}&sig={sig}"


def check_link(
    secret: bytes, path: str, expires: str | None, sig: str | None, now: float | None = None
) -> str | None:
    """None when the link is valid, else a reason from ``LINK_REFUSALS``."""
    if not expires or not sig or not expires.isdigit():
        return "unsigned"
    if not hmac.compare_digest(_mac(secret, path + "\n" + expires), sig):
        return "bad_signature"
    if int(expires) < (time.time() if now is None else now):
        return "expired"
    return None


def session_cookie(secret: bytes, buyer_id: str) -> str:
    return f"{buyer_id}.{_mac(secret, 'session:' + buyer_id)}"


def session_buyer(secret: bytes, cookie: str | None) -> str | None:
    """The buyer id a session cookie proves, or None."""
    if not cookie or "." not in cookie:
        return None
    buyer_id, mac = cookie.rsplit(".", 1)
    return buyer_id if hmac.compare_digest(_mac(secret, "session:" + buyer_id), mac) else None


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


class RateLimiter:
    """A token bucket per visitor: ``capacity`` requests, refilled at ``per_minute`` a minute."""

    def __init__(
        self, per_minute: float, capacity: int, clock: Callable[[], float] = time.monotonic
    ):
        if per_minute <= 0 or capacity < 1:
            raise ValueError("demo_rate_per_minute and demo_burst: must be positive")
        self.rate, self.capacity, self.clock = per_minute / 60.0, capacity, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, visitor: str) -> bool:
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(visitor, (float(self.capacity), now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[visitor] = (tokens - 1.0 if allowed else tokens, now)
            return allowed
