"""Object storage: one small interface over a local folder or an S3-compatible bucket.

``open_store("/some/folder")`` or ``open_store("s3://bucket/prefix", endpoint_url=...)`` returns an
:class:`ObjectStore`. Every put records the object's sha256 (S3: object metadata ``sha256``; local:
a sidecar under ``.meta/``); every get verifies size and sha256 and downloads atomically (temp ->
fsync -> rename), so a reader never sees a partial or corrupted file. Failures are typed:
:class:`ObjectNotFound`, :class:`BucketNotFound`, :class:`StorageAccessDenied`,
:class:`StorageUnavailable`, :class:`ChecksumMismatch`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from infra.atomic import atomic_write_bytes, atomic_write_json, fsync_dir, sha256_file

META_DIR = ".meta"


class StorageError(OSError):
    """The object store could not do what was asked (not a problem with the caller's data)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    pass


class BucketNotFound(StorageError):
    pass


class StorageAccessDenied(StorageError, PermissionError):
    pass


class StorageUnavailable(StorageError, ConnectionError):
    pass


class ChecksumMismatch(StorageError):
    pass


class ObjectTooLarge(ValueError):
    """An object is larger than the caller allowed (``get_file(max_bytes=...)``): the data's
    problem, not the store's, so it is a ValueError and not a :class:`StorageError`."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None
    last_modified: datetime


class ObjectStore(Protocol):
    url: str

    def put_file(self, key: str, path: Path) -> ObjectInfo: ...
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...
    def get_file(self, key: str, dest: Path, max_bytes: int | None = None) -> Path: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"object key {key!r}: use a relative key like 'inbox/file.bin'")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"object key {key!r}: no empty, '.' or '..' segments")
    return key


def _copy_capped(key: str, src, dst, max_bytes: int | None) -> None:
    copied = 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        copied += len(chunk)
        if max_bytes is not None and copied > max_bytes:
            raise ObjectTooLarge(f"{key}: larger than the {max_bytes} bytes allowed")
        dst.write(chunk)


def _verify(key: str, path: Path, size: int | None, sha256: str | None) -> str:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise ChecksumMismatch(f"{key}: downloaded {actual_size} bytes, expected {size}")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise ChecksumMismatch(f"{key}: sha256 {digest[:12]}... != recorded {sha256[:12]}...")
    return digest


class LocalStore:
    """Objects as files under ``root``; sha256 and size in ``root/.meta/<key>.json``."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _meta(self, key: str) -> Path:
        return self.root / META_DIR / f"{_check_key(key)}.json"

    def _recorded(self, key: str) -> dict:
        try:
            return json.loads(self._meta(key).read_text())
        except (OSError, ValueError):
            return {}

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        atomic_write_bytes(self._path(key), data)
        sha = hashlib.sha256(data).hexdigest()
        atomic_write_json(self._meta(key), {"sha256": sha, "size": len(data)})
        return self._info(key)

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            sha = _verify(key, Path(tmp), Path(path).stat().st_size, None)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        atomic_write_json(self._meta(key), {"sha256": sha, "size": target.stat().st_size})
        return self._info(key)

    def get_file(self, key: str, dest: Path, max_bytes: int | None = None) -> Path:
        """Copies the object to ``dest`` (temp -> verify -> fsync -> rename)."""
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self.url}")
        recorded = self._recorded(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
                _copy_capped(key, src, dst, max_bytes)
                dst.flush()
                os.fsync(dst.fileno())
            _verify(key, Path(tmp), recorded.get("size"), recorded.get("sha256"))
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self.url}")
        data = source.read_bytes()
        sha = self._recorded(key).get("sha256")
        if sha is not None and hashlib.sha256(data).hexdigest() != sha:
            raise ChecksumMismatch(f"{key}: content does not match its recorded sha256")
        return data

    def _info(self, key: str) -> ObjectInfo:
        stat = self._path(key).stat()
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            sha256=self._recorded(key).get("sha256"),
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every file under the root whose key starts with ``prefix``, symlinks excluded.

        A file whose name is not a valid key (a backslash, say: anyone who can write into an
        inbox folder can create one) is still listed, with its size and time and no sha256, so a
        caller can refuse it by name; it can never be fetched.
        """
        if not self.root.is_dir():
            return []
        infos = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            hidden = rel.startswith(META_DIR + "/") or path.name.startswith(".")
            if hidden or not rel.startswith(prefix) or path.is_symlink() or not path.is_file():
                continue
            try:
                infos.append(self._info(rel))
            except ValueError:
                stat = path.lstat()
                when = datetime.fromtimestamp(stat.st_mtime, UTC)
                infos.append(
                    ObjectInfo(key=rel, size=stat.st_size, sha256=None, last_modified=when)
                )
            except FileNotFoundError:
                continue  # removed while listing
        return infos

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        self._meta(key).unlink(missing_ok=True)


class S3Store:
    """Objects under ``s3://bucket/prefix``; sha256 in the object's user metadata."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        config = Config(
            # Some S3-compatible stores reject the default CRC checksums of boto3 >= 1.36.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = f"s3://{self.bucket}/{self._key(key) if key else self.prefix}"
        try:
            return fn(*args, **kwargs)
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as exc:
            raise StorageUnavailable(
                f"{what} {where}: endpoint {self.endpoint_url or 'AWS'} unreachable ({exc})"
            ) from None
        except NoCredentialsError:
            raise StorageAccessDenied(f"{what} {where}: no credentials configured") from None
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (what == "head bucket" and status == 404):
                raise BucketNotFound(
                    f"{what} {where}: no bucket {self.bucket!r}; create it or fix the url"
                ) from None
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise ObjectNotFound(f"{what} {where}: no such object") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StorageAccessDenied(
                    f"{what} {where}: access denied ({code}); check the credentials"
                ) from None
            raise StorageError(f"{what} {where}: {code} {error.get('Message', '')}") from None

    def _head(self, key: str) -> dict:
        try:
            return self._call(
                "head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key)
            )
        except ObjectNotFound:
            # HEAD carries no error body: tell a missing bucket from a missing object.
            self._call("head bucket", "", self.client.head_bucket, Bucket=self.bucket)
            raise

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, data, hashlib.sha256(data).hexdigest())

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        with open(path, "rb") as fh:
            return self._put(key, fh, sha256_file(Path(path)))

    def _put(self, key: str, body, sha: str) -> ObjectInfo:
        """Uploads ``body`` with its sha256 in the object metadata (checked on every download)."""
        self._call(
            "put",
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=body,
            Metadata={"sha256": sha},
        )
        return self._info(key)

    def get_file(self, key: str, dest: Path, max_bytes: int | None = None) -> Path:
        """Downloads to ``dest``; the size checked is the object's now (HEAD), not at listing,
        and over ``max_bytes`` the download stops (:class:`ObjectTooLarge`)."""
        head = self._head(key)
        if max_bytes is not None and int(head["ContentLength"]) > max_bytes:
            raise ObjectTooLarge(f"{key}: {head['ContentLength']} bytes > {max_bytes} allowed")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                response = self._call(
                    "get", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key)
                )
                # The object may have been replaced between HEAD and GET: the GET's own length
                # and sha256 are the ones the bytes must match.
                size = int(response["ContentLength"])
                sha = response.get("Metadata", head.get("Metadata", {})).get("sha256")
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLarge(f"{key}: {size} bytes > {max_bytes} allowed")
                _copy_capped(key, response["Body"], fh, max_bytes)
                fh.flush()
                os.fsync(fh.fileno())
            _verify(key, Path(tmp), size, sha)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self._call(
                "get", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key)
            )
        except ObjectNotFound:
            self._call("head bucket", "", self.client.head_bucket, Bucket=self.bucket)
            raise
        data = response["Body"].read()
        sha = response.get("Metadata", {}).get("sha256")
        if len(data) != response["ContentLength"]:
            raise ChecksumMismatch(f"{key}: got {len(data)} bytes of {response['ContentLength']}")
        if sha is not None and hashlib.sha256(data).hexdigest() != sha:
            raise ChecksumMismatch(f"{key}: content does not match its recorded sha256")
        return data

    def _info(self, key: str) -> ObjectInfo:
        head = self._head(key)
        return ObjectInfo(
            key=key,
            size=int(head["ContentLength"]),
            sha256=head.get("Metadata", {}).get("sha256"),
            last_modified=head["LastModified"],
        )

    def list(self, prefix: str = "", with_sha256: bool = False) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``; sha256 costs one HEAD per object."""
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        infos = []
        pages = self._call(
            "list", "", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full))
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"][strip:]
                sha = self._info(key).sha256 if with_sha256 else None
                infos.append(ObjectInfo(key, int(item["Size"]), sha, item["LastModified"]))
        return sorted(infos, key=lambda i: i.key)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))


def open_store(url: str | Path, endpoint_url: str | None = None) -> ObjectStore:
    """A local folder path or ``s3://bucket/prefix`` -> an :class:`ObjectStore`."""
    text = str(url)
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"object store url {text!r}: write it as s3://bucket/prefix")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url)
    if "://" in text:
        raise ValueError(f"object store url {text!r}: use a local folder or s3://bucket/prefix")
    return LocalStore(Path(text))
