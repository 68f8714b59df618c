"""The one validator for data URIs a customer may name: local paths under data roots, or S3.

Allowed: an absolute local path (file or folder) inside one of the data roots, or
``s3://bucket/prefix`` with the bucket in ``Settings.s3_bucket_allowlist`` (an empty allowlist
allows no bucket: the factory's credentials read nothing a customer names unless an operator said
so). Everything else raises :class:`UriRejected` with a reason from :data:`REASONS`; nothing is
read.

Data roots (:func:`default_roots`): ``TAAS_DATA_ROOTS`` when set; otherwise only the folder of the
spec file itself. Whatever the roots, two kinds of place are never data:

- the factory's own home (``Settings.home``: the marketplace secret, the databases, other
  customers' prepared data) -- unless the matching root was configured *inside* the home on
  purpose (the demo's ``<home>/demo``), so a root that merely contains the home (the working
  directory, ``/``) never reaches into it;
- system paths (:data:`SYSTEM_PATHS`: ``/proc``, ``/sys``, ``/dev``, ``/etc`` ...), whose files
  report size 0 and would slip past ``quality.max_bytes``.

A path that resolves to anything but a regular file or a folder (a FIFO, a device, a socket) is
refused, so intake never blocks on a pipe or reads a device.
"""

from __future__ import annotations

import os
import re
import stat
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
    "system_path",
    "factory_home",
    "special_file",
)
# Never data, whatever the roots: kernel and device views, host configuration and run state.
SYSTEM_PATHS = tuple(
    Path(p) for p in ("/proc", "/sys", "/dev", "/etc", "/run", "/boot", "/var/run", "/var/lib")
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
    "system_path": "system folders are never data; copy the data under a data root",
    "factory_home": "the factory's home is never data; copy the data under a data root",
    "special_file": "name a regular file or a folder (not a pipe, device or socket)",
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
    home: Path | None = None,
) -> DataUri:
    """Validates ``uri``; returns a :class:`DataUri` or raises :class:`UriRejected`.

    ``home``: the factory's home, refused unless the matching root lies inside it.
    """

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
    return _parse_local(uri, data_roots, reject, home)


def _parse_s3(uri: str, allowlist: Sequence[str], reject) -> DataUri:
    if not uri.startswith("s3://"):
        raise reject("s3_malformed")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if any(c in rest for c in "?#@") or ":" in bucket or not _BUCKET.match(bucket):
        raise reject("s3_malformed")
    if ".." in bucket or "//" in prefix or prefix.startswith("/"):
        raise reject("s3_malformed")
    if bucket not in allowlist:
        raise reject("bucket_not_allowed")
    return DataUri(raw=uri, kind="s3", bucket=bucket, prefix=prefix)


def _parse_local(uri: str, data_roots: Sequence[Path], reject, home: Path | None) -> DataUri:
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
    for candidate in (path, resolved):
        if any(_is_within(candidate, system) for system in _system_paths()):
            raise reject("system_path")
    if not _is_within(resolved, lexical_root.resolve()):
        raise reject("symlink_escape")
    if home is not None and in_home(resolved, lexical_root.resolve(), home):
        raise reject("factory_home")
    if is_special(resolved):
        raise reject("special_file")
    return DataUri(raw=uri, kind="local", path=resolved, root=lexical_root.resolve())


def _system_paths() -> list[Path]:
    # Both spellings: /var/run is a link to /run on most systems, /etc may be reached by a link.
    return [*SYSTEM_PATHS, *(p.resolve() for p in SYSTEM_PATHS)]


def in_home(resolved: Path, root: Path, home: Path) -> bool:
    """True when ``resolved`` lies in the factory's home and ``root`` was not set strictly inside
    it (a root equal to the home, or above it, never opens the home)."""
    home = Path(home).resolve()
    return _is_within(resolved, home) and home not in Path(root).resolve().parents


def is_special(resolved: Path) -> bool:
    """True for an existing path that is neither a regular file nor a folder (stat follows links:
    the target decides)."""
    try:
        mode = os.stat(resolved).st_mode
    except OSError:
        return False  # missing: the caller reports "no such file"
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_local_file(
    file: Path, root: Path, uri: str, field: str = "uri", home: Path | None = None
) -> Path:
    """A file found inside a validated folder must still resolve inside its root, outside the
    home and system paths, to a regular file."""
    resolved = Path(file).resolve()
    shown = f"{uri} -> {file}"
    if not _is_within(resolved, Path(root).resolve()):
        raise UriRejected("symlink_escape", shown, field)
    if any(_is_within(resolved, system) for system in _system_paths()):
        raise UriRejected("system_path", shown, field)
    if home is not None and in_home(resolved, root, home):
        raise UriRejected("factory_home", shown, field)
    if is_special(resolved):
        raise UriRejected("special_file", shown, field)
    return resolved


def default_roots(data_roots: Sequence[Path], spec_dir: Path | None) -> list[Path]:
    """The configured data roots (``TAAS_DATA_ROOTS``); when none are, only the folder of the spec
    file (none at all for a spec that came from no file)."""
    if data_roots:
        return [Path(r) for r in data_roots]
    return [Path(spec_dir)] if spec_dir is not None else []
