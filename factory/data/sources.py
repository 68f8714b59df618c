"""Data sources: resolve a spec's data URIs to verified local files, then stream their rows.

:func:`fetch_sources` validates every URI (:mod:`factory.data.uri`), lists the files of a folder or
S3 prefix, enforces ``quality.max_bytes`` on the listed sizes before anything is read, downloads S3
objects through :mod:`infra.storage` into the content-addressed cache
``<home>/cache/objects/<sha256>`` and records the sha256 of the exact bytes used.
:func:`iter_rows` streams rows with ``datasets`` (``streaming=True``, so a large file never sits in
memory), turns each into text (``text_field`` or ``template``) and enforces ``quality.max_rows``.
Lines that are not UTF-8 are dropped before parsing and counted in the quality report.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from factory.commission import CommissionSpec, DataSource, template_fields
from factory.data.quality import QualityReport
from factory.data.uri import check_local_file, default_roots, parse_data_uri
from factory.hashing import json_sha256
from infra.atomic import atomic_write_bytes, sha256_file
from infra.settings import Settings
from infra.storage import open_store

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "txt",
}
BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv", "txt": "text"}
LINE_FORMATS = ("jsonl", "csv", "txt")


class DataError(ValueError):
    """A problem with the customer's data, named by its spec field."""


@dataclass(frozen=True)
class SourceFile:
    """One file of one source: where it came from, the local bytes read, their sha256."""

    source_index: int
    uri: str
    path: Path
    sha256: str
    size: int
    format: str


def dataset_sha256(files: list[SourceFile]) -> str:
    """sha256 over the sorted sha256s of every file's bytes (content only, not names)."""
    return json_sha256(sorted(f.sha256 for f in files))


def _format_of(name: str, source: DataSource, field: str) -> str | None:
    suffix = Path(name).suffix.lower()
    if source.format is not None:
        wanted = [s for s, f in SUFFIXES.items() if f == source.format]
        return source.format if suffix in wanted or suffix == "" else None
    if suffix not in SUFFIXES:
        return None
    return SUFFIXES[suffix]


def _single_format(found: list[tuple[str, str]], field: str) -> None:
    formats = sorted({fmt for _, fmt in found})
    if len(formats) > 1:
        raise ValueError(f"{field}: files of several formats {formats}; set format")


def _local_files(index: int, source: DataSource, settings: Settings) -> list[tuple[str, Path, str]]:
    field = f"data.{index}.uri"
    parsed = parse_data_uri(
        source.uri,
        default_roots(settings.data_roots, settings.home),
        settings.s3_bucket_allowlist,
        field=field,
    )
    assert parsed.path is not None and parsed.root is not None
    if parsed.path.is_file():
        fmt = source.format or SUFFIXES.get(parsed.path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"data.{index}.format: cannot infer it from {parsed.path.name}; set it"
            )
        return [(source.uri, parsed.path, fmt)]
    if not parsed.path.is_dir():
        raise ValueError(f"{field}: no such file or folder {source.uri}; check the path")
    found = []
    for path in sorted(parsed.path.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        fmt = _format_of(path.name, source, field)
        if fmt is not None:
            found.append((str(path), fmt))
    _single_format(found, field)
    return [
        (uri, check_local_file(Path(uri), parsed.root, source.uri, field), fmt)
        for uri, fmt in found
    ]


def _s3_files(index: int, source: DataSource, settings: Settings):
    field = f"data.{index}.uri"
    parsed = parse_data_uri(
        source.uri,
        default_roots(settings.data_roots, settings.home),
        settings.s3_bucket_allowlist,
        field=field,
    )
    store = open_store(parsed.store_url, endpoint_url=settings.s3_endpoint_url)
    listed = [i for i in store.list(parsed.prefix) if not Path(i.key).name.startswith(".")]
    exact = [i for i in listed if i.key == parsed.prefix]
    if not exact and parsed.prefix and not parsed.prefix.endswith("/"):
        listed = [i for i in listed if i.key.startswith(parsed.prefix + "/")]
    infos = exact or listed
    found = []
    for info in infos:
        fmt = _format_of(info.key, source, field)
        if fmt is not None:
            found.append((info, fmt))
    _single_format([(i.key, fmt) for i, fmt in found], field)
    return store, parsed.bucket, found


def _cached_download(store, key: str, cache: Path, expected_sha: str | None) -> tuple[Path, str]:
    if expected_sha is not None:
        cached = cache / expected_sha
        if cached.is_file() and sha256_file(cached) == expected_sha:
            return cached, expected_sha
    cache.mkdir(parents=True, exist_ok=True)
    fd, incoming = tempfile.mkstemp(dir=cache, prefix=".incoming-")
    os.close(fd)
    try:
        store.get_file(key, Path(incoming))  # verifies size and the recorded sha256
        sha = sha256_file(Path(incoming))
        os.replace(incoming, cache / sha)
    except BaseException:
        Path(incoming).unlink(missing_ok=True)
        raise
    return cache / sha, sha


def fetch_sources(spec: CommissionSpec, settings: Settings) -> list[SourceFile]:
    """Every file of every source, local and verified, in source order then name order."""
    planned: list[tuple[int, str, object, str, int]] = []
    remote: dict[int, tuple] = {}
    for index, source in enumerate(spec.data):
        if source.uri.startswith("s3://"):
            store, bucket, found = _s3_files(index, source, settings)
            remote[index] = (store, bucket)
            items = [(index, f"s3://{bucket}/{i.key}", i, fmt, i.size) for i, fmt in found]
        else:
            items = [
                (index, uri, path, fmt, path.stat().st_size)
                for uri, path, fmt in _local_files(index, source, settings)
            ]
        if not items:
            raise ValueError(
                f"data.{index}.uri: no data files found at {source.uri}; "
                f"check the path or set format"
            )
        planned.extend(items)
    total = sum(size for *_, size in planned)
    if total > spec.quality.max_bytes:
        raise ValueError(
            f"quality.max_bytes: the data holds {total} bytes > {spec.quality.max_bytes}; "
            "use less data or raise quality.max_bytes"
        )
    cache = settings.home / "cache" / "objects"
    files = []
    for index, uri, where, fmt, size in planned:
        if isinstance(where, Path):
            path, sha = where, sha256_file(where)
        else:
            store, _ = remote[index]
            path, sha = _cached_download(store, where.key, cache, where.sha256)
        files.append(SourceFile(index, uri, path, sha, size, fmt))
    return files


def _utf8_clean(file: SourceFile, cache: Path, report: QualityReport) -> Path:
    """The file itself, or a cached copy without its non-UTF-8 lines (each one reported)."""
    if file.format not in LINE_FORMATS:
        return file.path
    kept, bad = [], 0
    with open(file.path, "rb") as fh:
        for line in fh:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
                report.note("non_utf8", repr(line[:80]))
                continue
            kept.append(line)
    if bad == 0:
        return file.path
    clean = cache / f"{file.sha256}.utf8.{file.format}"
    if not clean.is_file():
        atomic_write_bytes(clean, b"".join(kept))
    return clean


def _row_text(row: dict, source: DataSource, index: int, uri: str, first: bool) -> str:
    fields = sorted(row)
    if source.template is not None:
        if first:
            missing = [p for p in template_fields(source.template) if p not in row]
            if missing:
                raise DataError(
                    f"data.{index}.template: placeholder {{{missing[0]}}} not in the data of "
                    f"{uri} (fields: {', '.join(fields)}); fix the template"
                )
        values = {k: "" if v is None else v for k, v in row.items()}
        return source.template.format_map(values)
    if first and source.text_field not in row:
        raise DataError(
            f"data.{index}.text_field: no field {source.text_field!r} in {uri} "
            f"(fields: {', '.join(fields)}); set text_field or template"
        )
    value = row.get(source.text_field)
    return "" if value is None else str(value)


def iter_rows(
    spec: CommissionSpec, files: list[SourceFile], settings: Settings, report: QualityReport
) -> Iterator[tuple[int, str]]:
    """Yields (source_index, text) for every row; raises past ``quality.max_rows``."""
    from datasets import load_dataset

    cache = settings.home / "cache" / "clean"
    count = 0
    for file in files:
        source = spec.data[file.source_index]
        path = _utf8_clean(file, cache, report)
        if path.stat().st_size == 0:
            continue  # datasets cannot infer a schema from no bytes; an empty file has no rows
        try:
            rows = load_dataset(
                BUILDERS[file.format], data_files=str(path), split="train", streaming=True
            )
            first = True
            for row in rows:
                count += 1
                if count > spec.quality.max_rows:
                    raise DataError(
                        f"quality.max_rows: the data holds more than {spec.quality.max_rows} "
                        "rows; use less data or raise quality.max_rows"
                    )
                yield file.source_index, _row_text(row, source, file.source_index, file.uri, first)
                first = False
        except DataError:
            raise
        except Exception as exc:  # a parser error names the file, not our traceback
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"data.{file.source_index}: cannot read {file.uri} as {file.format} "
                f"({message}); fix the file or set format"
            ) from None
