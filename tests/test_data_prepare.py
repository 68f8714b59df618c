"""prepare_data end to end on the tiny base model: folder contract, caching, errors, caps, S3."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import boto3
import pytest
import torch

from factory.commission import parse_spec
from factory.data.prepare import PreparedData, prepare_data
from infra.atomic import verify_committed
from infra.settings import get_settings
from infra.storage import BucketNotFound, ChecksumMismatch

WORDS = (
    "the court held that each contract party shall give notice of breach and damages under "
    "clause seven of the agreement while statute law on appeal limits the remedy"
).split()
SEQ_LEN = 32


def make_rows(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 30))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def env(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    settings = get_settings(home=tmp_path / "home", data_roots=[data])
    return data, settings


def spec_for(sources: list[dict], **overrides) -> object:
    body = {
        "version": 1,
        "customer": "acme",
        "domain": "legal",
        "data": sources,
        "budget": {"seq_len": SEQ_LEN},
        "heldout": {"fraction": 0.2, "min_tokens": 100},
    }
    body.update(overrides)
    return parse_spec(body)


def test_prepare_writes_the_contract_and_caches(env, tiny_base, tmp_path):
    data, settings = env
    rows = make_rows(200)
    dirty = rows + ["", "   ", "too short", rows[0], rows[1], rows[2]]
    jsonl = data / "a.jsonl"
    jsonl.write_bytes(
        "".join(json.dumps({"text": r}) + "\n" for r in dirty).encode() + b'{"text": "\xff\xfe"}\n'
    )
    csv_rows = make_rows(60, seed=1)
    csv = data / "qa.csv"
    csv.write_text("question,answer\n" + "".join(f"{r[:40]},{r[40:]}\n" for r in csv_rows))
    spec = spec_for(
        [
            {"uri": str(jsonl), "weight": 0.75},
            {"uri": str(csv), "template": "Q: {question}\nA: {answer}", "weight": 0.25},
        ]
    )
    out = tmp_path / "out"
    prepared = prepare_data(spec, tiny_base.path, out, settings)

    assert verify_committed(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "COMMITTED.json", "data.json", "heldout", "heldout.jsonl", "train", "train.jsonl"
    ]  # fmt: skip
    meta = json.loads((out / "data.json").read_text())
    assert meta["file_sha256"] == {
        str(jsonl): hashlib.sha256(jsonl.read_bytes()).hexdigest(),
        str(csv): hashlib.sha256(csv.read_bytes()).hexdigest(),
    }
    checks = meta["quality"]["checks"]
    assert {k: v["count"] for k, v in checks.items()} == {
        "non_utf8": 1, "empty": 2, "too_short": 1, "duplicate": 3, "duplicate_prefix": 0
    }  # fmt: skip
    assert meta["quality"]["rows_in"] == 266 and meta["quality"]["rows_kept"] == 260
    train_text = [json.loads(x)["text"] for x in prepared.train_jsonl.read_text().splitlines()]
    held_text = [json.loads(x)["text"] for x in prepared.heldout_jsonl.read_text().splitlines()]
    assert len(train_text) + len(held_text) == 260
    assert not set(train_text) & set(held_text)
    assert any(t.startswith("Q: ") and "\nA: " in t for t in train_text + held_text)
    # 20% held out, within sampling noise for 260 rows.
    assert 0.12 < len(held_text) / 260 < 0.28
    train, held = prepared.train_blocks(), prepared.heldout_blocks()
    assert train.dtype == torch.long and held.dtype == torch.long
    assert train.shape == (meta["num_train_blocks"], SEQ_LEN) and train.shape[0] > 50
    assert held.shape == (meta["num_heldout_blocks"], SEQ_LEN)
    assert prepared.heldout_tokens == meta["heldout_tokens"] >= held.numel()
    assert meta["seq_len"] == SEQ_LEN and not prepared.cache_hit

    again = prepare_data(spec, tiny_base.path, tmp_path / "out2", settings)
    assert again.cache_hit  # packed blocks reused: no tokenization on the rerun
    assert torch.equal(again.train_blocks(), train)
    assert again.dataset_sha256 == prepared.dataset_sha256
    assert PreparedData.load(out).num_train_blocks == prepared.num_train_blocks


def test_token_cap_truncates_training_blocks(env, tiny_base, tmp_path):
    data, settings = env
    jsonl = write_jsonl(data / "a.jsonl", [{"text": r} for r in make_rows(150)])
    spec = spec_for([{"uri": str(jsonl)}], budget={"seq_len": SEQ_LEN, "token_cap": 10 * SEQ_LEN})
    prepared = prepare_data(spec, tiny_base.path, tmp_path / "out", settings)
    assert prepared.num_train_blocks == 10
    assert prepared.train_blocks().shape == (10, SEQ_LEN)


def _fails(spec, settings, tiny_base, out: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prepare_data(spec, tiny_base.path, out, settings)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_errors_are_named_and_nothing_is_written(env, tiny_base, tmp_path):
    data, settings = env
    out = tmp_path / "out"
    other = write_jsonl(data / "other.jsonl", [{"body": r, "id": 1} for r in make_rows(5)])
    _fails(spec_for([{"uri": str(other)}]), settings, tiny_base, out,
           r"data\.0\.text_field: no field 'text' .*fields: body, id")  # fmt: skip
    _fails(spec_for([{"uri": str(other), "template": "{body} {title}"}]), settings, tiny_base,
           out, r"data\.0\.template: placeholder \{title\} not in the data")  # fmt: skip
    empty = data / "empty.jsonl"
    empty.write_text("")
    _fails(spec_for([{"uri": str(empty)}]), settings, tiny_base, out, "hold no rows")
    short = write_jsonl(data / "short.jsonl", [{"text": "tiny"}, {"text": ""}])
    _fails(spec_for([{"uri": str(short)}]), settings, tiny_base, out,
           r"every row was filtered out \(empty: 1, too_short: 1\)")  # fmt: skip
    few = write_jsonl(data / "few.jsonl", [{"text": r} for r in make_rows(40)])
    _fails(spec_for([{"uri": str(few)}], heldout={"fraction": 0.1, "min_tokens": 5000}),
           settings, tiny_base, out,
           r"held-out too small for Proof-of-Loss: \d+ tokens < 5000; add data or raise "
           r"heldout\.fraction")  # fmt: skip
    _fails(spec_for([{"uri": str(data / "absent.jsonl")}]), settings, tiny_base, out,
           r"data\.0\.uri: no such file or folder")  # fmt: skip
    _fails(spec_for([{"uri": "/etc/passwd", "format": "txt"}]), settings, tiny_base, out,
           r"data\.0\.uri: data URI rejected \(outside_roots\)")  # fmt: skip


def test_size_caps_are_enforced(env, tiny_base, tmp_path):
    data, settings = env
    jsonl = write_jsonl(data / "a.jsonl", [{"text": r} for r in make_rows(300)])
    size = jsonl.stat().st_size
    out = tmp_path / "out"
    _fails(spec_for([{"uri": str(jsonl)}], quality={"max_bytes": size - 1}), settings,
           tiny_base, out, rf"quality\.max_bytes: the data holds {size} bytes")  # fmt: skip
    _fails(spec_for([{"uri": str(jsonl)}], quality={"max_rows": 100}), settings, tiny_base, out,
           r"quality\.max_rows: the data holds more than 100 rows")  # fmt: skip


def test_folder_source_reads_every_matching_file(env, tiny_base, tmp_path):
    data, settings = env
    write_jsonl(data / "docs" / "a.jsonl", [{"text": r} for r in make_rows(80, 2)])
    write_jsonl(data / "docs" / "b" / "c.jsonl", [{"text": r} for r in make_rows(80, 3)])
    (data / "docs" / "README.md").write_text("ignored: not a data suffix")
    spec = spec_for([{"uri": str(data / "docs")}])
    prepared = prepare_data(spec, tiny_base.path, tmp_path / "out", settings)
    assert sorted(prepared.file_sha256) == [
        str(data / "docs" / "a.jsonl"), str(data / "docs" / "b" / "c.jsonl")
    ]  # fmt: skip
    assert prepared.num_train_rows + prepared.num_heldout_rows == 160


def test_s3_source_through_the_object_cache(s3_endpoint, env, tiny_base, tmp_path):
    data, _ = env
    settings = get_settings(
        home=tmp_path / "home", data_roots=[data], s3_endpoint_url=s3_endpoint,
        s3_bucket_allowlist=["commission-data"],
    )  # fmt: skip
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="commission-data")
    body = "".join(json.dumps({"text": r}) + "\n" for r in make_rows(150, 4)).encode()
    sha = hashlib.sha256(body).hexdigest()
    client.put_object(Bucket="commission-data", Key="legal/part-0.jsonl", Body=body,
                      Metadata={"sha256": sha})  # fmt: skip
    prepared = prepare_data(spec_for([{"uri": "s3://commission-data/legal"}]), tiny_base.path,
                            tmp_path / "out", settings)  # fmt: skip
    assert prepared.file_sha256 == {"s3://commission-data/legal/part-0.jsonl": sha}
    assert (settings.home / "cache" / "objects" / sha).read_bytes() == body

    client.put_object(Bucket="commission-data", Key="tampered/part-0.jsonl", Body=body,
                      Metadata={"sha256": "0" * 64})  # fmt: skip
    with pytest.raises(ChecksumMismatch):
        prepare_data(spec_for([{"uri": "s3://commission-data/tampered/"}]), tiny_base.path,
                     tmp_path / "bad", settings)  # fmt: skip
    assert not (tmp_path / "bad").exists()
    assert not list((settings.home / "cache" / "objects").glob(".incoming-*"))
    with pytest.raises(ValueError, match="bucket_not_allowed"):
        prepare_data(spec_for([{"uri": "s3://other-bucket/x"}]), tiny_base.path,
                     tmp_path / "bad", settings)  # fmt: skip
    open_settings = get_settings(
        home=tmp_path / "home", s3_endpoint_url=s3_endpoint, s3_bucket_allowlist=["missing-bucket"]
    )
    with pytest.raises(BucketNotFound):
        prepare_data(spec_for([{"uri": "s3://missing-bucket/x"}]), tiny_base.path,
                     tmp_path / "bad", open_settings)  # fmt: skip


def test_contaminated_rows_are_removed_before_the_split(env, tiny_base, tmp_path):
    data, settings = env
    rows = make_rows(150, seed=6)
    jsonl = write_jsonl(data / "a.jsonl", [{"text": r} for r in rows])
    items = [rows[3], "question: " + " ".join(rows[10].split()[:13]) + " answer: yes"]
    prepared = prepare_data(
        spec_for([{"uri": str(jsonl)}]), tiny_base.path, tmp_path / "out", settings,
        benchmark_items=items,
    )  # fmt: skip
    kept = prepared.train_jsonl.read_text() + prepared.heldout_jsonl.read_text()
    assert json.dumps(rows[3]) not in kept and json.dumps(rows[10]) not in kept
    assert json.dumps(rows[4]) in kept
    report = prepared.contamination
    assert (report["rows_removed"], report["exact_matches"], report["items_hit"]) == (
        report["exact_matches"] + report["ngram_matches"], 1, 2
    )  # fmt: skip
    assert prepared.num_train_rows + prepared.num_heldout_rows == 150 - report["rows_removed"]


def test_kept_rows_stream_to_disk_not_memory(tmp_path):
    """Quality checks, dedupe, decontamination and the split hold digests and offsets, not the
    rows: 80 MB of distinct rows pass through with a Python peak far below their size, and
    the spooled files hold every row once, on its side of the hashed split."""
    import tracemalloc

    from factory.data.contamination import ContaminationCheck
    from factory.data.packing import jsonl_texts
    from factory.data.prepare import _spool_rows
    from factory.data.quality import QualityReport, iter_clean_rows
    from factory.data.split import is_heldout

    spec = spec_for([{"uri": "a.jsonl"}, {"uri": "b.jsonl"}])
    n, width = 20_000, 4000
    poisoned = " ".join(["benchmark item words"] * 6)

    def rows():
        for i in range(n):
            text = f"row {i:06d} " + ("lorem ipsum dolor " * (width // 18))[: width - 11]
            yield i % 2, poisoned if i == 7 else text

    report = QualityReport()
    check = ContaminationCheck([poisoned])
    tracemalloc.start()
    split = _spool_rows(iter_clean_rows(rows(), 20, report), check, spec, tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.rows_kept == n and check.report().flagged == frozenset({7})
    assert peak < 16_000_000, f"{peak} bytes held for {n * width} bytes of rows"
    held = list(jsonl_texts(tmp_path / "heldout.jsonl"))
    train = list(jsonl_texts(tmp_path / "train.jsonl"))
    assert len(held) + len(train) == n - 1 == split.train_rows + split.heldout_rows
    assert all(is_heldout(t, spec.seed, 0.2) for t in held[:50])
    assert not any(is_heldout(t, spec.seed, 0.2) for t in train[:50])
    assert [len(offsets) for offsets in split.train_offsets] == [
        sum(1 for t in train if int(t[4:10]) % 2 == source) for source in (0, 1)
    ]
