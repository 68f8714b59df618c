"""Intake reads only under its data roots: never the factory's home, system paths or special files.

Each test is an attack that worked before the data roots were enforced: a spec naming the
marketplace secret under ``.taas`` (shown back as a "too_short" example), another customer's
prepared data, /proc/self/environ and /etc/passwd with roots at ``/``, a FIFO that blocks intake,
a file swapped for a link between validation and reading, a file that grows past max_bytes after
it was listed, and any S3 bucket read with the factory's credentials.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from cli.main import main
from factory.commission import load_spec, parse_spec
from factory.data.snapshot import snapshot_local
from factory.data.sources import fetch_sources
from factory.data.uri import UriRejected, parse_data_uri
from infra.settings import get_settings

SECRET = "mkt-secret-5f3a9c0e71d24b88"
WORDS = "the tenant shall pay rent monthly and the landlord shall repair the roof".split()


def _rows(n: int) -> str:
    rng = random.Random(3)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 30))) for _ in range(n)]
    return "".join(json.dumps({"text": t}) + "\n" for t in lines)


@pytest.fixture
def factory_cwd(tmp_path, monkeypatch, tiny_base):
    """A working directory holding the factory's home (.taas) and a customer's spec; no roots."""
    work = tmp_path / "work"
    home = work / ".taas"
    (home / "marketplace").mkdir(parents=True)
    (home / "marketplace" / "secret").write_text(SECRET + "\n")
    other = home / "commissions" / "c-other" / "data"
    other.mkdir(parents=True)
    (other / "train.jsonl").write_text(json.dumps({"text": "OTHER-CUSTOMER-ROW " * 5}) + "\n")
    (work / "data").mkdir()
    (work / "data" / "leases.jsonl").write_text(_rows(200))
    monkeypatch.chdir(work)
    monkeypatch.setenv("TAAS_HOME", str(home))
    monkeypatch.delenv("TAAS_DATA_ROOTS", raising=False)
    monkeypatch.setenv("TAAS_BASE_MODEL_DIR", str(tiny_base.path))
    return work, home


def _spec(work: Path, uri: str, fmt: str = "txt") -> Path:
    spec = work / "spec.yaml"
    spec.write_text(
        f"version: 1\ncustomer: mallory\ndomain: leases\ndata:\n  - {{uri: {uri}, format: {fmt}}}\n"
        "base_model: {preset: tiny}\nbudget: {seq_len: 32}\nquality: {min_chars: 1000}\n"
        "heldout: {fraction: 0.2, min_tokens: 10}\n"
    )
    return spec


@pytest.mark.parametrize(
    "uri,fmt",
    [(".taas/marketplace/secret", "txt"), (".taas/commissions", "jsonl"), (".taas", "txt")],
)
def test_validate_refuses_the_factory_home_and_never_echoes_it(factory_cwd, capsys, uri, fmt):
    work, _ = factory_cwd
    assert main(["commission", "validate", str(_spec(work, uri, fmt))]) == 2
    captured = capsys.readouterr()
    assert "data URI rejected (factory_home)" in captured.err
    assert captured.err.count("\n") == 1
    for leaked in (SECRET, "OTHER-CUSTOMER-ROW"):
        assert leaked not in captured.out + captured.err


def test_unset_roots_mean_the_spec_folder_only(factory_cwd, tmp_path, capsys):
    work, _ = factory_cwd
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(_rows(10))
    assert main(["commission", "validate", str(_spec(work, str(outside), "jsonl"))]) == 2
    assert "data URI rejected (outside_roots)" in capsys.readouterr().err
    # The customer's own data next to the spec is read as before.
    spec = work / "ok.yaml"
    spec.write_text(
        "version: 1\ncustomer: acme\ndomain: leases\ndata:\n  - uri: data/leases.jsonl\n"
        "base_model: {preset: tiny}\nbudget: {seq_len: 32}\n"
        "heldout: {fraction: 0.2, min_tokens: 200}\n"
    )
    assert main(["commission", "validate", str(spec)]) == 0
    assert "quality: 200 rows in, 200 kept" in capsys.readouterr().out
    # A spec that came from no file has no folder, so no local data at all without roots.
    body = {"version": 1, "customer": "a", "domain": "leases", "data": [{"uri": str(outside)}]}
    with pytest.raises(UriRejected) as info:
        fetch_sources(parse_spec(body), get_settings())
    assert info.value.reason == "outside_roots"


@pytest.mark.parametrize("uri", ["/proc/self/environ", "/etc/passwd", "/sys/kernel", "/dev/zero"])
def test_system_paths_are_refused_even_with_root_slash(uri, tmp_path):
    with pytest.raises(UriRejected) as info:
        parse_data_uri(uri, [Path("/")], home=tmp_path / "home")
    assert info.value.reason == "system_path"


def test_a_root_above_the_home_never_opens_it_but_one_inside_does(tmp_path):
    home = tmp_path / "home"
    (home / "demo").mkdir(parents=True)
    (home / "demo" / "a.jsonl").write_text("{}\n")
    (home / "taas.db").write_text("db")
    for root in (tmp_path, home):
        with pytest.raises(UriRejected) as info:
            parse_data_uri(str(home / "taas.db"), [root], home=home)
        assert info.value.reason == "factory_home"
    # An operator's root inside the home (the demo's <home>/demo) is theirs to name.
    parsed = parse_data_uri(str(home / "demo" / "a.jsonl"), [home / "demo"], home=home)
    assert parsed.path == (home / "demo" / "a.jsonl").resolve()
    # A link from a root into the home is refused as well (it resolves there).
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(home / "taas.db", data / "db.txt")
    with pytest.raises(UriRejected) as info:
        parse_data_uri(str(data / "db.txt"), [tmp_path], home=home)
    assert info.value.reason == "factory_home"


def test_special_files_are_refused_before_anything_opens_them(tmp_path):
    data = tmp_path / "data"
    (data / "folder").mkdir(parents=True)
    os.mkfifo(data / "pipe.jsonl")
    os.mkfifo(data / "folder" / "part-1.jsonl")
    (data / "folder" / "part-0.jsonl").write_text(_rows(5))
    with pytest.raises(UriRejected) as info:
        parse_data_uri(str(data / "pipe.jsonl"), [data], home=tmp_path / "home")
    assert info.value.reason == "special_file"
    settings = get_settings(home=tmp_path / "home", data_roots=[data])
    for uri in (data / "pipe.jsonl", data / "folder"):
        body = {"version": 1, "customer": "a", "domain": "leases", "data": [{"uri": str(uri)}]}
        with pytest.raises(UriRejected) as info:
            fetch_sources(parse_spec(body), settings)  # would block forever on open
        assert info.value.reason == "special_file"


def test_a_file_swapped_for_a_link_after_validation_is_not_followed(tmp_path):
    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    (tmp_path / "outside.txt").write_text(SECRET)
    target = data / "a.txt"
    target.write_text("customer text")
    parse_data_uri(str(target), [data], home=home)  # validated as a regular file ...
    target.unlink()
    os.symlink(tmp_path / "outside.txt", target)  # ... then swapped for a link
    with pytest.raises(ValueError, match=r"data\.0\.uri: cannot open .*a\.txt") as info:
        snapshot_local(target, data, str(target), "data.0.uri", home, home / "cache", 1 << 20)
    assert SECRET not in str(info.value)
    assert not list((home / "cache").glob(".incoming-*"))


def test_max_bytes_holds_for_the_bytes_read_not_the_size_listed(tmp_path):
    data, home = tmp_path / "data", tmp_path / "home"
    data.mkdir()
    grown = data / "a.jsonl"
    grown.write_text(_rows(50))
    size = grown.stat().st_size
    with pytest.raises(ValueError, match=r"quality\.max_bytes: the data holds more than 100 "):
        snapshot_local(grown, data, str(grown), "data.0.uri", home, home / "cache", 100)
    copy, sha, got = snapshot_local(grown, data, str(grown), "data.0.uri", home, home / "c", size)
    assert got == size and copy.read_bytes() == grown.read_bytes() and copy.name == sha


def test_a_parser_error_does_not_quote_the_file(tmp_path, tiny_base):
    from factory.data.prepare import prepare_data

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text(f"text\nok\n{SECRET},extra,columns\n")
    settings = get_settings(home=tmp_path / "home", data_roots=[data])
    body = {"version": 1, "customer": "a", "domain": "leases", "data": [{"uri": str(data)}]}
    with pytest.raises(ValueError, match=r"data\.0: cannot read .*a\.csv as csv") as info:
        prepare_data(parse_spec(body), tiny_base.path, tmp_path / "out", settings)
    assert SECRET not in str(info.value)


def test_non_utf8_lines_are_reported_by_place_not_content(tmp_path, tiny_base):
    from factory.data.prepare import prepare_data

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(
        _rows(200).encode() + b'{"text": "' + SECRET.encode() + b'\xff\xfe"}\n'
    )
    settings = get_settings(home=tmp_path / "home", data_roots=[data])
    spec = parse_spec(
        {"version": 1, "customer": "a", "domain": "leases", "data": [{"uri": str(data)}],
         "budget": {"seq_len": 32}, "heldout": {"fraction": 0.2, "min_tokens": 100}}
    )  # fmt: skip
    prepared = prepare_data(spec, tiny_base.path, tmp_path / "out", settings)
    found = prepared.quality["checks"]["non_utf8"]
    assert found["count"] == 1
    assert found["examples"] == ["a.jsonl line 201 (42 bytes)"]  # 10 + 26 + 2 + 3 + 1


def test_load_spec_records_its_folder(factory_cwd):
    work, _ = factory_cwd
    assert load_spec(_spec(work, "data/leases.jsonl", "jsonl")).spec_dir == work


def _parquet(path: Path, texts: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path)
    return path


def test_a_parquet_bomb_is_refused_by_its_decoded_size(tmp_path, tiny_base):
    from factory.data.prepare import prepare_data

    data = tmp_path / "data"
    data.mkdir()
    bomb = _parquet(data / "bomb.parquet", ["a" * 20_000] * 1_000)  # 20 MB of text decoded
    assert bomb.stat().st_size < 50_000  # ... in a few kilobytes on disk
    settings = get_settings(home=tmp_path / "home", data_roots=[data])
    spec = parse_spec(
        {"version": 1, "customer": "a", "domain": "leases", "data": [{"uri": str(bomb)}],
         "quality": {"max_bytes": 1_000_000}}
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"quality\.max_bytes: the data decodes to more than "):
        prepare_data(spec, tiny_base.path, tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def test_a_plain_parquet_source_is_read_in_batches(tmp_path, tiny_base):
    from factory.data.prepare import prepare_data

    data = tmp_path / "data"
    data.mkdir()
    texts = [json.loads(line)["text"] for line in _rows(300).splitlines()]
    _parquet(data / "part-0.parquet", texts)
    settings = get_settings(home=tmp_path / "home", data_roots=[data])
    spec = parse_spec(
        {"version": 1, "customer": "a", "domain": "leases", "data": [{"uri": str(data)}],
         "budget": {"seq_len": 32}, "heldout": {"fraction": 0.2, "min_tokens": 100}}
    )  # fmt: skip
    prepared = prepare_data(spec, tiny_base.path, tmp_path / "out", settings)
    assert prepared.quality["rows_in"] == 300
    with pytest.raises(ValueError, match=r"quality\.max_rows: part-0\.parquet alone holds 300"):
        prepare_data(
            spec.model_copy(update={"quality": spec.quality.model_copy(update={"max_rows": 299})}),
            tiny_base.path, tmp_path / "out2", settings,
        )  # fmt: skip


def test_the_validate_report_names_dropped_rows_by_place_not_content(factory_cwd, capsys):
    work, _ = factory_cwd
    (work / "data" / "leases.jsonl").write_text(
        _rows(200) + json.dumps({"text": SECRET}) + "\n" + json.dumps({"text": "   "}) + "\n"
    )
    spec = work / "ok.yaml"
    spec.write_text(
        "version: 1\ncustomer: acme\ndomain: leases\ndata:\n  - uri: data/leases.jsonl\n"
        "base_model: {preset: tiny}\nbudget: {seq_len: 32}\nquality: {min_chars: 40}\n"
        "heldout: {fraction: 0.2, min_tokens: 200}\n"
    )
    assert main(["commission", "validate", str(spec)]) == 0
    out = capsys.readouterr().out
    assert f"too_short: 1 e.g. data.0 row 201 ({len(SECRET)} chars)" in out
    assert "empty: 1 e.g. data.0 row 202" in out
    assert SECRET not in out
