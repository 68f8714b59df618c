"""Object storage against a local folder and a real loopback S3 endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import boto3
import pytest
from conftest import free_port, start_moto_server

from infra.storage import (
    BucketNotFound,
    ChecksumMismatch,
    LocalStore,
    ObjectNotFound,
    S3Store,
    StorageAccessDenied,
    StorageUnavailable,
    open_store,
)

PAYLOAD = b"alpha\nbeta\ngamma\n" * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _bucket(endpoint: str, name: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


@pytest.fixture
def s3_store(s3_endpoint):
    _bucket(s3_endpoint, "store-test")
    return open_store("s3://store-test/run", endpoint_url=s3_endpoint)


def _roundtrip(store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    info = store.put_file("inbox/a.bin", src)
    assert (info.key, info.size, info.sha256) == ("inbox/a.bin", len(PAYLOAD), PAYLOAD_SHA)
    store.put_bytes("inbox/b.bin", b"xyz")
    store.put_bytes("other/c.bin", b"123456")
    dest = store.get_file("inbox/a.bin", tmp_path / "out" / "a.bin")
    assert dest.read_bytes() == PAYLOAD
    assert store.get_bytes("inbox/b.bin") == b"xyz"
    listed = store.list("inbox/")
    assert [(i.key, i.size) for i in listed] == [("inbox/a.bin", 1700), ("inbox/b.bin", 3)]
    assert store.exists("other/c.bin") and not store.exists("other/none.bin")
    store.delete("other/c.bin")
    assert not store.exists("other/c.bin")
    with pytest.raises(ObjectNotFound):
        store.get_file("inbox/missing.bin", tmp_path / "m.bin")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("inbox/missing.bin")
    assert not (tmp_path / "m.bin").exists()
    assert not list((tmp_path).glob(".m.bin*"))


def test_local_store_roundtrip_and_missing(tmp_path):
    store = open_store(tmp_path / "objects")
    assert isinstance(store, LocalStore)
    _roundtrip(store, tmp_path)


def test_local_store_detects_corruption(tmp_path):
    store = open_store(tmp_path / "objects")
    store.put_bytes("x/model.bin", PAYLOAD)
    (tmp_path / "objects" / "x" / "model.bin").write_bytes(PAYLOAD[:-1] + b"!")
    with pytest.raises(ChecksumMismatch):
        store.get_file("x/model.bin", tmp_path / "dest.bin")
    with pytest.raises(ChecksumMismatch):
        store.get_bytes("x/model.bin")
    assert not (tmp_path / "dest.bin").exists()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a\\b", "a//b", "./a"])
def test_bad_keys_are_refused(tmp_path, key):
    with pytest.raises(ValueError):
        open_store(tmp_path).put_bytes(key, b"1")


def test_s3_roundtrip_and_missing(s3_store, tmp_path):
    assert isinstance(s3_store, S3Store)
    _roundtrip(s3_store, tmp_path)
    assert s3_store.list("inbox/", with_sha256=True)[0].sha256 == PAYLOAD_SHA


def test_s3_checksum_mismatch_is_refused(s3_endpoint, s3_store, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    wrong = hashlib.sha256(b"something else").hexdigest()
    client.put_object(
        Bucket="store-test", Key="run/bad.bin", Body=PAYLOAD, Metadata={"sha256": wrong}
    )
    with pytest.raises(ChecksumMismatch, match="sha256"):
        s3_store.get_file("bad.bin", tmp_path / "bad.bin")
    with pytest.raises(ChecksumMismatch):
        s3_store.get_bytes("bad.bin")
    assert not (tmp_path / "bad.bin").exists()
    assert list(tmp_path.iterdir()) == []


def test_s3_missing_bucket(s3_endpoint, tmp_path):
    store = open_store("s3://no-such-bucket-here/x", endpoint_url=s3_endpoint)
    with pytest.raises(BucketNotFound, match="no-such-bucket-here"):
        store.get_file("a.bin", tmp_path / "a.bin")
    with pytest.raises(BucketNotFound):
        store.list()


def test_s3_unreachable_endpoint(tmp_path):
    store = open_store("s3://some-bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    started = time.time()
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.get_bytes("a.bin")
    assert time.time() - started < 30


@pytest.fixture(scope="module")
def auth_s3_endpoint():
    """A second moto server that enforces credentials (only IAM-created keys are accepted)."""
    server, url = start_moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_s3_denied_credentials(auth_s3_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store("s3://locked-bucket", endpoint_url=auth_s3_endpoint)
    with pytest.raises(StorageAccessDenied, match="access denied"):
        store.put_bytes("a.bin", b"1")
    with pytest.raises(StorageAccessDenied):
        store.list()


def test_open_store_rejects_other_schemes():
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_store("http://example.com/x")


def test_sizes_are_checked_at_download_not_at_listing(s3_store, tmp_path):
    from infra.storage import ObjectTooLarge

    s3_store.put_bytes("grow.bin", b"abc")
    (listed,) = s3_store.list("grow.bin")
    assert listed.size == 3
    s3_store.put_bytes("grow.bin", b"x" * 4096)  # replaced after it was listed
    with pytest.raises(ObjectTooLarge, match="4096 bytes > 100 allowed"):
        s3_store.get_file("grow.bin", tmp_path / "g.bin", max_bytes=100)
    assert list(tmp_path.iterdir()) == []
    assert s3_store.get_file("grow.bin", tmp_path / "g.bin").read_bytes() == b"x" * 4096


def test_local_get_file_is_capped_and_listing_survives_odd_names(tmp_path):
    from infra.storage import ObjectTooLarge

    store = LocalStore(tmp_path / "objects")
    store.put_bytes("inbox/big.bin", b"y" * 1000)
    with pytest.raises(ObjectTooLarge, match="larger than the 10 bytes allowed"):
        store.get_file("inbox/big.bin", tmp_path / "out" / "big.bin", max_bytes=10)
    assert not list((tmp_path / "out").iterdir())
    (tmp_path / "objects" / "inbox" / "a\\b.bin").write_bytes(b"z")
    (tmp_path / "objects" / "inbox" / "link.bin").symlink_to(
        tmp_path / "objects" / "inbox" / "big.bin"
    )
    listed = {i.key: (i.size, i.sha256) for i in store.list("inbox/")}
    assert listed == {
        "inbox/a\\b.bin": (1, None),
        "inbox/big.bin": (1000, store._info("inbox/big.bin").sha256),
    }
    with pytest.raises(ValueError, match="object key"):
        store.get_file("inbox/a\\b.bin", tmp_path / "x.bin")
