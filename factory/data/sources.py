"""Data sources: resolve a spec's data URIs to verified local files, then stream their rows.

:func:`fetch_sources` validates every URI (:mod:`factory.data.uri`: data roots, never the factory's
home or system paths, no special files), lists the files of a folder or S3 prefix, enforces
``quality.max_bytes`` on the listed sizes before anything is read and again on the bytes actually
read, and snapshots every file (:mod:`factory.data.snapshot`) into ``<home>/cache/objects/<sha256>``
(S3 objects through :mod:`infra.storage`; local files opened with ``O_NOFOLLOW``, checked to be
the regular file that was validated, and copied while hashing), so every later step reads exactly
the bytes whose sha256 is recorded, even if the customer's file changes or is swapped for a link.
:func:`iter_rows` streams rows with ``datasets`` (``streaming=True``, so a large file never sits in
memory), turns each into text (``text_field`` or ``template``) and enforces ``quality.max_rows``.
Lines that are not UTF-8 are dropped before parsing and counted in the quality report.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from factory.commission import CommissionSpec, DataSource, template_fields
from factory.data.quality import QualityReport
from factory.data.snapshot import cached_download, over_budget, snapshot_local
from factory.data.uri import (
    UriRejected,
    check_local_file,
    default_roots,
    parse_data_uri,
)
from factory.hashing import json_sha256
from infra.atomic import atomic_write_bytes
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


def _parse(index: int, source: DataSource, spec: CommissionSpec, settings: Settings):
    return parse_data_uri(
        source.uri,
        default_roots(settings.data_roots, spec.spec_dir),
        settings.s3_bucket_allowlist,
        field=f"data.{index}.uri",
        home=settings.home,
    )


def _local_files(
    index: int, source: DataSource, spec: CommissionSpec, settings: Settings
) -> list[tuple[str, Path, Path, str]]:
    """(uri, resolved path, root, format) of each file of a local source."""
    field = f"data.{index}.uri"
    parsed = _parse(index, source, spec, settings)
    assert parsed.path is not None and parsed.root is not None
    if parsed.path.is_file():
        fmt = source.format or SUFFIXES.get(parsed.path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"data.{index}.format: cannot infer it from {parsed.path.name}; set it"
            )
        return [(source.uri, parsed.path, parsed.root, fmt)]
    if not parsed.path.is_dir():
        raise ValueError(f"{field}: no such file or folder {source.uri}; check the path")
    found = []
    for path in sorted(parsed.path.rglob("*")):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.is_file() and not path.is_symlink():
            # A FIFO, device or socket inside the folder: refused, never opened (a dangling
            # link is not one; check_local_file reports where it points).
            raise UriRejected("special_file", f"{source.uri} -> {path}", field)
        fmt = _format_of(path.name, source, field)
        if fmt is not None:
            found.append((str(path), fmt))
    _single_format(found, field)
    return [
        (uri, check_local_file(Path(uri), parsed.root, source.uri, field, settings.home),
         parsed.root, fmt)
        for uri, fmt in found
    ]  # fmt: skip


def _s3_files(index: int, source: DataSource, spec: CommissionSpec, settings: Settings):
    field = f"data.{index}.uri"
    parsed = _parse(index, source, spec, settings)
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


def fetch_sources(spec: CommissionSpec, settings: Settings) -> list[SourceFile]:
    """Every file of every source, snapshotted and verified, in source order then name order."""
    planned: list[tuple[int, str, object, str, int]] = []
    remote: dict[int, tuple] = {}
    for index, source in enumerate(spec.data):
        if source.uri.startswith("s3://"):
            store, bucket, found = _s3_files(index, source, spec, settings)
            remote[index] = (store, bucket)
            items = [(index, f"s3://{bucket}/{i.key}", i, fmt, i.size) for i, fmt in found]
        else:
            items = [
                (index, uri, (path, root), fmt, path.stat().st_size)
                for uri, path, root, fmt in _local_files(index, source, spec, settings)
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
    files, read = [], 0
    for index, uri, where, fmt, _listed in planned:
        budget = spec.quality.max_bytes - read
        if isinstance(where, tuple):
            local, root = where
            path, sha, size = snapshot_local(
                local, root, uri, f"data.{index}.uri", settings.home, cache, budget
            )
        else:
            store, _ = remote[index]
            path, sha = cached_download(store, where.key, cache, where.sha256, budget)
            size = path.stat().st_size
        read += size
        if read > spec.quality.max_bytes:
            raise over_budget(read, spec.quality.max_bytes)
        files.append(SourceFile(index, uri, path, sha, size, fmt))
    return files


def _utf8_clean(file: SourceFile, cache: Path, report: QualityReport) -> Path:
    """The file itself, or a cached copy without its non-UTF-8 lines (each one reported)."""
    if file.format not in LINE_FORMATS:
        return file.path
    kept, bad = [], 0
    with open(file.path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
                # Where, not what: a line that could not be read is not echoed into a report.
                report.note("non_utf8", f"{Path(file.uri).name} line {number} ({len(line)} bytes)")
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
    """Yields (source_index, text) for every row; raises past ``quality.max_rows`` rows, and
    past ``quality.max_bytes`` decoded bytes (a parquet file's compressed size says little: 5 KB
    may decode to 64 MiB, so its record batches are counted as they are decoded)."""
    from datasets import load_dataset

    cache = settings.home / "cache" / "clean"
    count = 0
    budget = _DecodeBudget(spec.quality.max_bytes)
    for file in files:
        source = spec.data[file.source_index]
        path = _utf8_clean(file, cache, report)
        if path.stat().st_size == 0:
            continue  # datasets cannot infer a schema from no bytes; an empty file has no rows
        try:
            if file.format == "parquet":
                rows = _parquet_rows(path, file.uri, budget, spec.quality.max_rows - count)
            else:
                budget.spend(file.size)
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
            # Only the error's kind: parser messages quote the offending bytes (a CSV row, a JSON
            # fragment), and a file that cannot be read is never echoed into a report.
            raise DataError(
                f"data.{file.source_index}: cannot read {file.uri} as {file.format} "
                f"({_error_kind(exc)}); fix the file or set format"
            ) from None


class _DecodeBudget:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.used = max_bytes, 0

    def spend(self, num_bytes: int) -> None:
        self.used += num_bytes
        if self.used > self.max_bytes:
            raise DataError(
                f"quality.max_bytes: the data decodes to more than {self.max_bytes} bytes; "
                "use less data or raise quality.max_bytes"
            )


def _parquet_rows(path: Path, uri: str, budget: _DecodeBudget, rows_left: int) -> Iterator[dict]:
    """A parquet file's rows, one record batch at a time, refused before decoding when its own
    metadata already says it is too large, and as soon as the decoded batches are."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        meta = parquet.metadata
        if meta.num_rows > rows_left:
            raise DataError(
                f"quality.max_rows: {Path(uri).name} alone holds {meta.num_rows} rows, more than "
                "the rows left; use less data or raise quality.max_rows"
            )
        declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if budget.used + declared > budget.max_bytes:
            budget.spend(declared)  # raises: the file says it decodes past the budget
        for batch in parquet.iter_batches(batch_size=256):
            budget.spend(batch.nbytes)  # what was decoded, whatever the metadata claimed
            yield from batch.to_pylist()


def _error_kind(exc: Exception) -> str:
    message = str(exc)
    head = message.split(":", 1)[0].strip() if ":" in message else ""
    # "JSON parse error", "CSV parse error" and the like carry no content before their colon.
    if head and len(head) <= 40 and all(c.isalpha() or c in " _-" for c in head):
        return head
    return type(exc).__name__
