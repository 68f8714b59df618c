"""Who is asking: API keys from headers, buyer sessions, signed download links, rate limits.

A signed link is ``<path>?expires=<unix seconds>&sig=<hex>`` where ``sig`` is
HMAC-SHA256(secret, path + "\\n" + expires); it is refused once expired or when any byte of the
path or expiry changes. A buyer session cookie is ``<buyer_id>.<expires>.<mac>`` where ``mac`` is
HMAC-SHA256(secret, "session:" + buyer_id + "\n" + expires); it is refused once expired or when
any byte of the buyer id or expiry changes. A form that changes state carries a CSRF token,
HMAC-SHA256(secret, "csrf:" + session cookie): a page from another site cannot read it, and it
dies with the session. Signatures are compared in constant time.
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


def _session_mac(secret: bytes, buyer_id: str, expires: str) -> str:
    return _mac(secret, "session:" + buyer_id + "\n" + expires)


def session_cookie(secret: bytes, buyer_id: str, expires: int) -> str:
    """The session cookie value for ``buyer_id``, valid until unix time ``expires``."""
    if "." in buyer_id or "\n" in buyer_id:
        raise ValueError(f"buyer_id: {buyer_id!r} must not contain '.' or a newline")
    return f"{buyer_id}.{expires}.{_session_mac(secret, buyer_id, str(expires))}"


def session_buyer(secret: bytes, cookie: str | None, now: float | None = None) -> str | None:
    """The buyer id a session cookie proves, or None (absent, malformed, tampered, expired)."""
    parts = cookie.split(".") if cookie else []
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit():
        return None
    buyer_id, expires, mac = parts
    if not hmac.compare_digest(_session_mac(secret, buyer_id, expires), mac):
        return None
    if int(expires) < (time.time() if now is None else now):
        return None
    return buyer_id


def csrf_token(secret: bytes, cookie: str) -> str:
    """The token a state-changing form of this session must carry."""
    return _mac(secret, "csrf:" + cookie)


def check_csrf(secret: bytes, cookie: str | None, token: str | None) -> bool:
    """True when ``token`` was issued for this session cookie."""
    if not cookie or not token:
        return False
    return hmac.compare_digest(csrf_token(secret, cookie), token)


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
