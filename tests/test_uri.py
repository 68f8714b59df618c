"""The data URI validator: a table of hostile inputs, each with its reason, and legitimate ones."""

from __future__ import annotations

import os

import pytest

from factory.data.uri import REASONS, UriRejected, parse_data_uri

ALLOW = ["commission-data", "team.data-2"]


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "legal" / "sub").mkdir(parents=True)
    (root / "legal" / "a.jsonl").write_text("{}\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    os.symlink(outside / "secret.txt", root / "escape.txt")
    os.symlink(outside, root / "escape_dir")
    os.symlink(root / "legal" / "a.jsonl", root / "inside_link.jsonl")
    other = tmp_path / "root2"
    other.mkdir()
    (root / "home").mkdir()
    (root / "home" / "taas.db").write_text("db")
    os.mkfifo(root / "pipe.jsonl")
    os.symlink("/proc", root / "proc")
    return root, tmp_path


HOSTILE = [
    ("", "empty"),
    ("   ", "empty"),
    ("R/" + "a" * 1100, "too_long"),
    ("R/legal/a\x00.jsonl", "nul_byte"),
    ("R/legal/a%00.jsonl", "nul_byte"),
    ("R/legal/a.jsonl%2500", "nul_byte"),
    ("R/legal/\na.jsonl", "control_character"),
    ("R/legal/a.jsonl\r", "control_character"),
    ("R/legal/\ta.jsonl", "control_character"),
    (" R/legal/a.jsonl", "control_character"),
    ("R/legal/a.jsonl ", "control_character"),
    ("R/legal/a%0a.jsonl", "control_character"),
    ("R/legal/\x7f.jsonl", "control_character"),
    ("R\\legal\\a.jsonl", "backslash"),
    ("R/legal\\..\\..\\etc", "backslash"),
    ("R/legal%5ca.jsonl", "backslash"),
    ("R/../outside/secret.txt", "traversal"),
    ("R/legal/../../outside", "traversal"),
    ("R/..", "traversal"),
    ("R/%2e%2e/outside", "traversal"),
    ("R/%2E%2E/outside", "traversal"),
    ("R/.%2e/outside", "traversal"),
    ("R/%252e%252e/outside", "traversal"),
    ("R/legal%2f..%2f..%2foutside", "traversal"),
    ("s3://commission-data/../x", "traversal"),
    ("R/legal/a%20b.jsonl", "percent_encoded"),
    ("R/legal/%41.jsonl", "percent_encoded"),
    ("http://example.com/data.jsonl", "scheme_not_allowed"),
    ("https://example.com/data.jsonl", "scheme_not_allowed"),
    ("file:///etc/passwd", "scheme_not_allowed"),
    ("ftp://example.com/x", "scheme_not_allowed"),
    ("gs://bucket/x", "scheme_not_allowed"),
    ("hdfs://nn/x", "scheme_not_allowed"),
    ("s3a://commission-data/x", "scheme_not_allowed"),
    ("S3://commission-data/x", "scheme_not_allowed"),
    ("javascript:alert(1)", "scheme_not_allowed"),
    ("data:text/plain,hello", "scheme_not_allowed"),
    ("C:/data/x.jsonl", "scheme_not_allowed"),
    ("legal/a.jsonl", "relative_path"),
    ("./legal/a.jsonl", "relative_path"),
    ("~/data.jsonl", "relative_path"),
    ("/etc/passwd", "outside_roots"),
    ("T/outside/secret.txt", "outside_roots"),
    ("/", "outside_roots"),
    ("R/escape.txt", "symlink_escape"),
    ("R/escape_dir/secret.txt", "symlink_escape"),
    ("s3://", "s3_malformed"),
    ("s3:///x", "s3_malformed"),
    ("s3:commission-data/x", "s3_malformed"),
    ("s3://ab/x", "s3_malformed"),
    ("s3://Commission-Data/x", "s3_malformed"),
    ("s3://user:pass@commission-data/x", "s3_malformed"),
    ("s3://commission-data:9000/x", "s3_malformed"),
    ("s3://commission-data/x?versionId=1", "s3_malformed"),
    ("s3://commission-data/x#frag", "s3_malformed"),
    ("s3://commission-data//x", "s3_malformed"),
    ("s3://bad_bucket/x", "s3_malformed"),
    ("s3://other-bucket/x", "bucket_not_allowed"),
    ("s3://commission-data-2/x", "bucket_not_allowed"),
    ("R/proc", "system_path"),
    ("R/home/taas.db", "factory_home"),
    ("R/pipe.jsonl", "special_file"),
]

LEGITIMATE = [
    "R/legal/a.jsonl",
    "R/legal",
    "R/legal/",
    "R/legal/sub",
    "R",
    "R/./legal/a.jsonl",
    "R//legal/a.jsonl",
    "R/legal/not-yet-there.jsonl",
    "R/inside_link.jsonl",
    "R/legal/a b.jsonl",
    "R/legal/ünïcode-данные.jsonl",
    "R/legal/a..b.jsonl",
    "R2/x.parquet",
    "s3://commission-data",
    "s3://commission-data/",
    "s3://commission-data/legal",
    "s3://commission-data/legal/part-0.jsonl",
    "s3://team.data-2/a/b/c.csv",
]


def _expand(uri: str, root, base) -> str:
    if uri.startswith("R2/"):
        return str(base / "root2") + uri[2:]
    if uri.startswith("R"):
        return str(root) + uri[1:]
    if uri.startswith("T/"):
        return str(base) + uri[1:]
    return uri


def test_table_sizes_and_every_reason_is_exercised():
    assert len(HOSTILE) >= 40 and len(LEGITIMATE) >= 15
    assert {reason for _, reason in HOSTILE} == set(REASONS)


@pytest.mark.parametrize("uri,reason", HOSTILE, ids=[repr(u)[:40] for u, _ in HOSTILE])
def test_hostile_uri_is_rejected_with_its_reason(roots, uri, reason):
    root, base = roots
    with pytest.raises(UriRejected) as info:
        parse_data_uri(
            _expand(uri, root, base), [root, base / "root2"], ALLOW, "data.0.uri", root / "home"
        )
    assert info.value.reason == reason
    assert str(info.value).startswith(f"data.0.uri: data URI rejected ({reason})")
    assert "\n" not in str(info.value)  # one line, even for a URI holding a newline


@pytest.mark.parametrize("uri", LEGITIMATE)
def test_legitimate_uri_is_accepted(roots, uri):
    root, base = roots
    parsed = parse_data_uri(_expand(uri, root, base), [root, base / "root2"], ALLOW)
    if uri.startswith("s3://"):
        assert parsed.kind == "s3" and parsed.bucket in ALLOW
        assert parsed.prefix == uri.split("/", 3)[3] if uri.count("/") >= 3 else parsed.prefix == ""
    else:
        assert parsed.kind == "local"
        assert parsed.root in (root.resolve(), (base / "root2").resolve())
        assert parsed.path is not None and parsed.root in (parsed.path, *parsed.path.parents)


def test_an_empty_allowlist_allows_no_bucket(tmp_path):
    # Before: any well-formed bucket was read with the factory's credentials.
    with pytest.raises(UriRejected) as info:
        parse_data_uri("s3://any-bucket/x", [tmp_path])
    assert info.value.reason == "bucket_not_allowed"
