"""Who is asking: API keys from headers, buyer sessions, signed download links, rate limits.

A signed link is ``<quoted path>?expires=<unix seconds>&sig=<hex>`` where ``sig`` is
HMAC-SHA256(secret, path + "\\n" + expires) over the unquoted path (a name with ``?``, ``#`` or
``%`` is percent-quoted in the link, and the server sees it unquoted again); it is refused once
expired or when any byte of the path or expiry changes. A buyer session cookie is
``<buyer_id>.<expires>.<mac>`` where ``mac`` is
HMAC-SHA256(secret, "session:" + buyer_id + "\n" + expires [+ "\n" + version]); ``version`` is
the buyer's session version in the ledger (0 is left out), so raising it (sign-out, a revoked
key) ends every session signed before. A form that changes state carries a CSRF token,
HMAC-SHA256(secret, "csrf:" + session cookie): a page from another site cannot read it, and it
dies with the session. Before a session exists (sign-up, sign-in) the token is made from a
random pre-session cookie instead, so another site cannot sign a browser into its own account.
Signatures are compared in constant time; a value that is not ASCII never matches (it is
refused, never an error).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import quote

LINK_REFUSALS = ("unsigned", "expired", "bad_signature")


def _mac(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def same(expected: str, presented: str | None) -> bool:
    """Constant-time equality of an ASCII MAC and a presented value; False for non-ASCII (which
    ``hmac.compare_digest`` would raise TypeError on) or a missing value."""
    if not presented or not presented.isascii():
        return False
    return hmac.compare_digest(expected, presented)


def link_signature(secret: bytes, path: str, expires: int) -> str:
    return _mac(secret, path + "\n" + str(expires))


def sign_link(secret: bytes, path: str, expires: int) -> str:
    """The query-carrying link for ``path`` valid until unix time ``expires``."""
    return f"{quote(path, safe='/')}?expires={expires}&sig={link_signature(secret, path, expires)}"


def check_link(
    secret: bytes, path: str, expires: str | None, sig: str | None, now: float | None = None
) -> str | None:
    """None when the link is valid, else a reason from ``LINK_REFUSALS``."""
    if not expires or not sig or not expires.isascii() or not expires.isdigit():
        return "unsigned"
    if not same(_mac(secret, path + "\n" + expires), sig):
        return "bad_signature"
    if int(expires) < (time.time() if now is None else now):
        return "expired"
    return None


def _session_mac(secret: bytes, buyer_id: str, expires: str, version: int) -> str:
    tail = f"\n{version}" if version else ""
    return _mac(secret, "session:" + buyer_id + "\n" + expires + tail)


def session_cookie(secret: bytes, buyer_id: str, expires: int, version: int = 0) -> str:
    """The session cookie value for ``buyer_id`` at session ``version``, valid until unix time
    ``expires``."""
    if "." in buyer_id or "\n" in buyer_id:
        raise ValueError(f"buyer_id: {buyer_id!r} must not contain '.' or a newline")
    return f"{buyer_id}.{expires}.{_session_mac(secret, buyer_id, str(expires), version)}"


def session_buyer(
    secret: bytes,
    cookie: str | None,
    now: float | None = None,
    version_of: Callable[[str], int | None] = lambda _: 0,
) -> str | None:
    """The buyer id a session cookie proves, or None (absent, malformed, tampered, expired, or
    signed at another session version than ``version_of(buyer_id)``; None there: no buyer)."""
    parts = cookie.split(".") if cookie else []
    if len(parts) != 3 or not parts[0] or not parts[1].isascii() or not parts[1].isdigit():
        return None
    buyer_id, expires, mac = parts
    version = version_of(buyer_id)
    if version is None or not same(_session_mac(secret, buyer_id, expires, version), mac):
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
    return same(csrf_token(secret, cookie), token)


def presession_token(secret: bytes, nonce: str) -> str:
    """The sign-up/sign-in form token for a browser's random pre-session cookie ``nonce``."""
    return _mac(secret, "presession:" + nonce)


def check_presession(secret: bytes, nonce: str | None, token: str | None) -> bool:
    return bool(nonce) and same(presession_token(secret, nonce), token)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


class RateLimiter:
    """A token bucket per visitor: ``capacity`` requests, refilled at ``per_minute`` a minute.

    At most ``max_visitors`` buckets are kept (least recently seen dropped first): a dropped
    visitor comes back with a full bucket, which costs at most ``capacity`` extra requests,
    while memory stays bounded however many addresses or accounts a client uses.
    """

    def __init__(
        self,
        per_minute: float,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
        max_visitors: int = 10_000,
    ):
        if per_minute <= 0 or capacity < 1 or max_visitors < 1:
            raise ValueError("rate_per_minute, burst and max_visitors: must be positive")
        self.rate, self.capacity, self.clock = per_minute / 60.0, capacity, clock
        self.max_visitors = max_visitors
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, visitor: str) -> bool:
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.pop(visitor, (float(self.capacity), now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[visitor] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_visitors:
                self._buckets.popitem(last=False)
            return allowed
