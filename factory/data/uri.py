"""The one validator for data URIs a customer may name: local paths under data roots, or S3.

Allowed: an absolute local path (file or folder) inside one of the configured data roots
(``Settings.data_roots``; when none is configured, the working directory and ``<home>/data``), or
``s3://bucket/prefix`` with the bucket in ``Settings.s3_bucket_allowlist`` when that list is set.
Everything else raises :class:`UriRejected` with a reason from :data:`REASONS`; nothing is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

REASONS = (
    "empty",
    "too_long",
    "nul_byte",
    "control_character",
    "backslash",
    "traversal",
    "percent_encoded",
    "scheme_not_allowed",
    "relative_path",
    "outside_roots",
    "symlink_escape",
    "s3_malformed",
    "bucket_not_allowed",
)
MAX_URI_CHARS = 1024
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# S3 bucket naming rules: 3-63 chars, lowercase letters, digits, dots and hyphens.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_FIXES = {
    "empty": "give a path or s3://bucket/prefix",
    "too_long": f"use a URI of at most {MAX_URI_CHARS} characters",
    "nul_byte": "remove the NUL byte",
    "control_character": "remove control characters and surrounding whitespace",
    "backslash": "use forward slashes",
    "traversal": "name the data directly, without '..' segments",
    "percent_encoded": "write the path without %-escapes",
    "scheme_not_allowed": "use a local path under a data root or s3://bucket/prefix",
    "relative_path": "use an absolute path (relative paths in a spec file are resolved for you)",
    "outside_roots": "move the data under a data root or add one to TAAS_DATA_ROOTS",
    "symlink_escape": "copy the data into the data root instead of linking to it",
    "s3_malformed": "write it as s3://bucket/prefix (no credentials, port, query or fragment)",
    "bucket_not_allowed": "use an allowed bucket or add it to TAAS_S3_BUCKET_ALLOWLIST",
}


class UriRejected(ValueError):
    """A data URI refused before anything is read; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, uri: str, field: str = "uri"):
        assert reason in REASONS, reason
        self.reason = reason
        self.uri = uri
        shown = uri if len(uri) <= 120 else uri[:117] + "..."
        super().__init__(f"{field}: data URI rejected ({reason}): {shown!r}; {_FIXES[reason]}")


@dataclass(frozen=True)
class DataUri:
    """A validated data URI: ``kind`` local (``path``, ``root``) or s3 (``bucket``, ``prefix``)."""

    raw: str
    kind: Literal["local", "s3"]
    path: Path | None = None
    root: Path | None = None
    bucket: str | None = None
    prefix: str = ""

    @property
    def store_url(self) -> str:
        """The object-store URL of the bucket (for :func:`infra.storage.open_store`)."""
        return f"s3://{self.bucket}"


def parse_data_uri(
    uri: str,
    data_roots: Sequence[Path],
    bucket_allowlist: Sequence[str] = (),
    field: str = "uri",
) -> DataUri:
    """Validates ``uri``; returns a :class:`DataUri` or raises :class:`UriRejected`."""

    def reject(reason: str) -> UriRejected:
        return UriRejected(reason, uri, field)

    if not isinstance(uri, str) or not uri.strip():
        raise reject("empty")
    if len(uri) > MAX_URI_CHARS:
        raise reject("too_long")
    decoded = uri
    for _ in range(3):  # double-encoded forms (%252e) decode in two rounds
        decoded = unquote(decoded)
    if "\x00" in uri or "\x00" in decoded:
        raise reject("nul_byte")
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded) or decoded != decoded.strip():
        raise reject("control_character")
    if "\\" in decoded:
        raise reject("backslash")
    if ".." in decoded.split("/"):
        raise reject("traversal")
    if re.search(r"%[0-9A-Fa-f]{2}", uri):
        raise reject("percent_encoded")
    scheme = _SCHEME.match(uri)
    if scheme:
        if scheme.group(1) != "s3":
            raise reject("scheme_not_allowed")
        return _parse_s3(uri, bucket_allowlist, reject)
    return _parse_local(uri, data_roots, reject)


def _parse_s3(uri: str, allowlist: Sequence[str], reject) -> DataUri:
    if not uri.startswith("s3://"):
        raise reject("s3_malformed")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if any(c in rest for c in "?#@") or ":" in bucket or not _BUCKET.match(bucket):
        raise reject("s3_malformed")
    if ".." in bucket or "//" in prefix or prefix.startswith("/"):
        raise reject("s3_malformed")
    if allowlist and bucket not in allowlist:
        raise reject("bucket_not_allowed")
    return DataUri(raw=uri, kind="s3", bucket=bucket, prefix=prefix)


def _parse_local(uri: str, data_roots: Sequence[Path], reject) -> DataUri:
    path = Path(uri)
    if not path.is_absolute():
        raise reject("relative_path")
    roots = [Path(r).expanduser().absolute() for r in data_roots]
    lexical_root = next((r for r in roots if _is_within(path, r)), None)
    if lexical_root is None:
        # A root may itself be reached through a link (e.g. /tmp -> /private/tmp).
        lexical_root = next((r for r in roots if _is_within(path, r.resolve())), None)
        if lexical_root is None:
            raise reject("outside_roots")
    resolved = path.resolve()
    if not _is_within(resolved, lexical_root.resolve()):
        raise reject("symlink_escape")
    return DataUri(raw=uri, kind="local", path=resolved, root=lexical_root.resolve())


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_local_file(file: Path, root: Path, uri: str, field: str = "uri") -> Path:
    """A file found inside a validated folder must still resolve inside its root."""
    resolved = Path(file).resolve()
    if not _is_within(resolved, Path(root).resolve()):
        raise UriRejected("symlink_escape", f"{uri} -> {file}", field)
    return resolved


def default_roots(data_roots: Sequence[Path], home: Path) -> list[Path]:
    """The configured data roots, or the working directory and ``<home>/data`` when none are."""
    if data_roots:
        return [Path(r) for r in data_roots]
    return [Path.cwd(), Path(home) / "data"]
