"""Committed folders: a crash between a replacement's two renames loses nothing, links never
count, and a marker cannot point outside its folder."""

from __future__ import annotations

import json
import os

import pytest

from infra.atomic import MARKER, committed_dir, recover_committed, verify_committed


def _commit(folder, text: str) -> None:
    with committed_dir(folder, overwrite=True) as tmp:
        (tmp / "weights.bin").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "meta.json").write_text(json.dumps({"v": text}))


def test_a_crash_between_the_renames_is_recovered_on_next_access(tmp_path):
    final = tmp_path / "expert"
    _commit(final, "v1")
    # The state a crash right after the first rename leaves: the old version aside, the new
    # one still a temporary folder, nothing at the final name.
    os.replace(final, tmp_path / ".expert.old")
    (tmp_path / ".expert.x1.tmp").mkdir()
    assert not final.exists()
    assert verify_committed(final)  # the reader recovers it
    assert (final / "weights.bin").read_text() == "v1"
    assert not (tmp_path / ".expert.old").exists()


def test_a_writer_recovers_too_and_then_replaces(tmp_path):
    final = tmp_path / "expert"
    _commit(final, "v1")
    os.replace(final, tmp_path / ".expert.old")
    _commit(final, "v2")
    assert verify_committed(final) and (final / "weights.bin").read_text() == "v2"
    assert not (tmp_path / ".expert.old").exists()


def test_a_failure_between_the_renames_puts_the_old_version_back(tmp_path, monkeypatch):
    final = tmp_path / "expert"
    _commit(final, "v1")
    real_replace, calls = os.replace, []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 3:  # 1: marker file, 2: final -> .old, 3: tmp -> final
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="No space left"):
        _commit(final, "v2")
    monkeypatch.setattr(os, "replace", real_replace)
    assert verify_committed(final) and (final / "weights.bin").read_text() == "v1"


def test_recovery_never_overwrites_a_folder_that_is_there(tmp_path):
    final = tmp_path / "expert"
    _commit(final, "v2")
    _commit(tmp_path / ".expert.old", "v1")
    assert not recover_committed(final)
    assert (final / "weights.bin").read_text() == "v2"


def test_links_are_never_part_of_a_committed_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("customer text")
    with pytest.raises(ValueError, match="holds no links"):
        with committed_dir(tmp_path / "bad") as tmp:
            os.symlink(secret, tmp / "weights.bin")
    assert not (tmp_path / "bad").exists()
    final = tmp_path / "expert"
    _commit(final, "v1")
    target = tmp_path / "same.bin"
    target.write_text("v1")  # identical bytes: the sha256 alone would not notice
    (final / "weights.bin").unlink()
    os.symlink(target, final / "weights.bin")
    assert not verify_committed(final)
    _commit(final, "v1")
    (final / "sub" / "meta.json").rename(tmp_path / "meta.json")
    (final / "sub").rmdir()
    os.symlink(tmp_path, final / "sub")  # a linked folder on the way to a listed file
    assert not verify_committed(final)


def test_a_marker_cannot_point_outside_its_folder(tmp_path):
    final = tmp_path / "expert"
    _commit(final, "v1")
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    listing = json.loads((final / MARKER).read_text())
    listing["files"]["../outside.txt"] = __import__("hashlib").sha256(b"x").hexdigest()
    (final / MARKER).write_text(json.dumps(listing))
    assert not verify_committed(final)
