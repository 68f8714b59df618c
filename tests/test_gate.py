"""The candidate gate: one crafted candidate per rejection reason, and our failures raised."""

from __future__ import annotations

import os
import pickle
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluation.gate import (
    GateContext,
    GateDecision,
    Reason,
    check_candidate,
    screen_candidates,
    screen_losses,
)
from factory.candidate import CandidateFiles, CandidateManifest, write_candidate
from factory.expert import lora_config_dict
from factory.hashing import tensors_sha256
from factory.ledger import Ledger
from factory.signing import generate_key, public_key_b64
from merging.lora_algebra import lora_shapes

BASE_SHA = "b" * 64
DEADLINE = datetime(2030, 1, 1, tzinfo=UTC)
SHAPES = lora_shapes(2, 8, 16, 2, ["down_proj", "gate_proj", "up_proj"])
CONFIG = lora_config_dict(2, 4.0)


class Marker:
    """A pickle payload: unpickling it creates a file (what a malicious 'adapter' would do)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture
def world(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    keys = {name: generate_key() for name in ("alice", "bob", "mallory")}
    ledger.register_contributor("alice", public_key_b64(keys["alice"]))
    ledger.register_contributor("bob", public_key_b64(keys["bob"]))
    ctx = GateContext(
        expert_id="law",
        cycle=1,
        base_model_sha256=BASE_SHA,
        current_adapter_sha256=None,
        deadline=DEADLINE,
        keys=ledger,
        reference_shapes=SHAPES,
        adapter_config=CONFIG,
    )
    return tmp_path, keys, ctx


def adapter(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=gen) for k, shape in SHAPES.items()}


def make(root: Path, keys, name: str, tensors=None, signer="alice", **fields) -> CandidateFiles:
    tensors = adapter(0) if tensors is None else tensors
    body = {
        "candidate_id": name,
        "expert_id": "law",
        "cycle": 1,
        "contributor_id": "alice",
        "base_model_sha256": BASE_SHA,
        "parent_adapter_sha256": None,
        "adapter_sha256": tensors_sha256(tensors),
        "data_shard": "shard-0",
        "seed": 0,
        "steps": 10,
        "tokens_seen": 640,
        "created_at": "2029-12-31T12:00:00+00:00",
    } | fields
    files = write_candidate(root / name, tensors, CONFIG, CandidateManifest(**body), keys[signer])
    os.utime(files.manifest, (DEADLINE.timestamp() - 3600,) * 2)
    return files


def test_an_honest_candidate_is_accepted(world):
    root, keys, ctx = world
    decision = check_candidate(make(root, keys, "ok"), ctx)
    assert decision.accepted and decision.reason is None
    assert decision.contributor_id == "alice"
    assert decision.adapter_sha256 == tensors_sha256(adapter(0))
    assert tensors_sha256(decision.adapter) == decision.adapter_sha256


@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_a_pickle_named_safetensors_is_unreadable_and_never_deserialized(world, how):
    root, keys, ctx = world
    files = make(root, keys, "evil")
    marker = root / "pwned"
    if how == "pickle":
        files.adapter.write_bytes(pickle.dumps({"w": Marker(marker)}))
    else:
        torch.save({"w": Marker(marker)}, files.adapter)
    decision = check_candidate(files, ctx)
    assert (decision.accepted, decision.reason) == (False, Reason.UNREADABLE)
    assert not marker.exists()
    # the payload is live: unpickling it unsafely would have created the marker
    if how == "pickle":
        pickle.loads(files.adapter.read_bytes())
        assert marker.exists()


def _header_bomb(files: CandidateFiles) -> None:
    files.adapter.write_bytes((10**12).to_bytes(8, "little") + b"{}")


def _not_json_manifest(files: CandidateFiles) -> None:
    files.manifest.write_text("{not json")


def _wrong_schema_manifest(files: CandidateFiles) -> None:
    files.manifest.write_text('{"candidate_id": "x", "extra": 1}')


def _missing_adapter(files: CandidateFiles) -> None:
    files.adapter.unlink()


def _truncated_adapter(files: CandidateFiles) -> None:
    files.adapter.write_bytes(files.adapter.read_bytes()[:-16])


@pytest.mark.parametrize(
    "damage",
    [
        _header_bomb,
        _not_json_manifest,
        _wrong_schema_manifest,
        _missing_adapter,
        _truncated_adapter,
    ],
)
def test_unreadable(world, damage):
    root, keys, ctx = world
    files = make(root, keys, "c")
    damage(files)
    assert check_candidate(files, ctx).reason == Reason.UNREADABLE


def test_hash_mismatch(world):
    root, keys, ctx = world
    files = make(root, keys, "c")
    save_file(adapter(1), str(files.adapter))  # valid file, other tensors than signed
    decision = check_candidate(files, ctx)
    assert decision.reason == Reason.HASH_MISMATCH
    assert decision.adapter_sha256 == tensors_sha256(adapter(1))


def test_bad_signature(world):
    root, keys, ctx = world
    decision = check_candidate(make(root, keys, "c", signer="bob"), ctx)
    assert decision.reason == Reason.BAD_SIGNATURE and not decision.signature_verified


def test_unknown_contributor(world):
    root, keys, ctx = world
    files = make(root, keys, "c", signer="mallory", contributor_id="mallory")
    assert check_candidate(files, ctx).reason == Reason.UNKNOWN_CONTRIBUTOR


def test_wrong_base(world):
    root, keys, ctx = world
    assert check_candidate(make(root, keys, "c", base_model_sha256="c" * 64), ctx).reason == (
        Reason.WRONG_BASE
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"created_at": "2030-01-01T00:00:01+00:00"},
        {"cycle": 0},
        {"expert_id": "medicine"},
        {"parent_adapter_sha256": "d" * 64},
        {"arrived": DEADLINE.timestamp() + 60},
    ],
)
def test_late(world, fields):
    root, keys, ctx = world
    arrived = fields.pop("arrived", None)
    files = make(root, keys, "c", **fields)
    if arrived is not None:
        os.utime(files.manifest, (arrived, arrived))
    assert check_candidate(files, ctx).reason == Reason.LATE


def test_unexpected_keys(world):
    root, keys, ctx = world
    tensors = adapter(0) | {"base_model.model.lm_head.weight": torch.zeros(4, 4)}
    assert check_candidate(make(root, keys, "c", tensors), ctx).reason == Reason.UNEXPECTED_KEYS


@pytest.mark.parametrize("change", ["rank", "dtype"])
def test_shape_mismatch(world, change):
    root, keys, ctx = world
    key = next(k for k in SHAPES if k.endswith("lora_A.weight"))
    tensors = adapter(0)
    tensors[key] = torch.zeros(3, 8) if change == "rank" else tensors[key].half()
    assert check_candidate(make(root, keys, "c", tensors), ctx).reason == Reason.SHAPE_MISMATCH


def test_non_finite(world):
    root, keys, ctx = world
    tensors = adapter(0)
    next(iter(tensors.values()))[0, 0] = float("nan")
    assert check_candidate(make(root, keys, "c", tensors), ctx).reason == Reason.NON_FINITE


def test_duplicates_first_arrival_keeps_its_place(world):
    root, keys, ctx = world
    honest = adapter(0)
    near = {k: v + 1e-3 * torch.randn_like(v) for k, v in honest.items()}
    rescaled = {k: v * (2.0 if k.endswith("lora_B.weight") else 0.5) for k, v in honest.items()}
    files = [
        make(root, keys, "first", honest),
        make(root, keys, "copy", honest, signer="bob", contributor_id="bob"),
        make(root, keys, "near", near, signer="bob", contributor_id="bob"),
        make(root, keys, "rescaled", rescaled, signer="bob", contributor_id="bob"),
        make(root, keys, "other", adapter(5), signer="bob", contributor_id="bob"),
    ]
    decisions = screen_candidates(files, ctx)
    assert [d.reason for d in decisions] == [
        None,
        Reason.DUPLICATE,
        Reason.DUPLICATE,
        Reason.DUPLICATE,
        None,
    ]
    assert "same sha256 as first" in decisions[1].detail
    assert "cosine" in decisions[2].detail and "cosine" in decisions[3].detail
    assert all(d.adapter is None for d in decisions if not d.accepted)


def test_same_heldout_loss_is_a_duplicate():
    def accepted(name):
        return GateDecision(True, None, "ok", name, name * 8, name, True)

    rejected = GateDecision(False, Reason.LATE, "late", "z", None, "z")
    decisions = [accepted("a"), rejected, accepted("b"), accepted("c")]
    out = screen_losses(decisions, [2.5, None, 2.5, 2.4999999])
    assert [d.reason for d in out] == [None, Reason.LATE, Reason.DUPLICATE, None]
    assert "as a" in out[2].detail


def test_our_own_io_failure_is_raised_not_blamed_on_the_contributor(world):
    root, keys, ctx = world
    files = make(root, keys, "c")
    files.adapter.unlink()
    files.adapter.mkdir()  # reading it fails with an OSError that is not "file missing"
    with pytest.raises(IsADirectoryError):
        check_candidate(files, ctx)
    with pytest.raises(FileNotFoundError):
        check_candidate(CandidateFiles(root / "never-staged"), ctx)


def test_naive_deadline_is_refused():
    with pytest.raises(ValueError, match="deadline"):
        GateContext("law", 1, BASE_SHA, None, datetime(2030, 1, 1), None, SHAPES, CONFIG)


# -- hostile uploads that used to raise out of the gate and abort the cycle --


def _raw_safetensors(header: dict, body: bytes = b"\0" * 64) -> bytes:
    import json

    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


A_KEY = next(iter(SHAPES))


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": ["F32"], "shape": [2, 8], "data_offsets": [0, 64]},  # TypeError: unhashable
        {"dtype": {"F32": 1}, "shape": [2, 8], "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": [2, 8], "data_offsets": ["0", "64"]},  # TypeError: str <= int
        {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64, 128]},
        {"dtype": "F32", "shape": [2, 8], "data_offsets": 64},
        {"dtype": "F32", "shape": [True, 16], "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": [-2, -8], "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": "2x8", "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": [2.0, 8], "data_offsets": [0, 64]},
        ["not", "an", "object"],
    ],
)
def test_a_malformed_header_after_a_valid_signature_is_unreadable(world, entry):
    root, keys, ctx = world
    files = make(root, keys, "c")
    files.adapter.write_bytes(_raw_safetensors({A_KEY: entry}))
    decision = check_candidate(files, ctx)
    assert decision.signature_verified
    assert (decision.accepted, decision.reason) == (False, Reason.UNREADABLE)
    assert decision.detail.startswith("adapter: bad header entry")


@pytest.mark.parametrize("text", ["[" * 60000, '{"a":' * 8000 + "1" + "}" * 8000, "[[[[[1]]]]]"])
def test_a_deeply_nested_unsigned_manifest_is_unreadable_not_a_recursion_error(world, text):
    root, keys, ctx = world
    files = make(root, keys, "c")
    files.manifest.write_text(text)  # unsigned: the gate never gets to the signature
    decision = check_candidate(files, ctx)
    assert (decision.reason, decision.signature_verified) == (Reason.UNREADABLE, False)
    assert "nested deeper than 4 levels" in decision.detail


def _staged(files: CandidateFiles, contributor: str, stored_at: datetime) -> CandidateFiles:
    import json

    record = {"contributor_id": contributor, "first_seen": stored_at.isoformat(),
              "stored_at": stored_at.isoformat()}  # fmt: skip
    files.arrival.write_text(json.dumps(record))
    return files


def _ctx(ctx: GateContext, commission: str | None) -> GateContext:
    from dataclasses import replace

    return replace(ctx, commission_id=commission)


ON_TIME = datetime(2029, 12, 31, 23, 0, tzinfo=UTC)


def test_an_inbox_candidate_must_be_signed_by_its_folders_contributor(world):
    root, keys, ctx = world
    honest = _staged(make(root, keys, "mine", commission_id="c-now"), "alice", ON_TIME)
    assert check_candidate(honest, _ctx(ctx, "c-now")).accepted
    # bob re-signs nothing: alice's own signed candidate copied into bob's folder
    copied = _staged(make(root, keys, "copy", commission_id="c-now"), "bob", ON_TIME)
    decision = check_candidate(copied, _ctx(ctx, "c-now"))
    assert (decision.reason, decision.signature_verified) == (Reason.WRONG_FOLDER, True)
    assert "dropped into 'bob'" in decision.detail


@pytest.mark.parametrize("named,expected", [("c-old", "c-new"), ("", "c-new"), ("c-new", None)])
def test_an_old_candidate_cannot_replay_into_a_later_commission(world, named, expected):
    root, keys, ctx = world
    files = _staged(make(root, keys, "old", commission_id=named), "alice", ON_TIME)
    decision = check_candidate(files, _ctx(ctx, expected))
    assert (decision.reason, decision.signature_verified) == (Reason.LATE, True)
    assert decision.detail.startswith("for commission")


def test_an_inbox_candidate_arrives_when_the_store_says(world):
    root, keys, ctx = world
    files = make(root, keys, "c", commission_id="c-now")  # its manifest mtime is on time ...
    _staged(files, "alice", DEADLINE.replace(minute=5))  # ... the store received it late
    assert check_candidate(files, _ctx(ctx, "c-now")).reason == Reason.LATE
    # The factory's own lines (no arrival record) need no commission id, as before.
    assert check_candidate(make(root, keys, "line"), _ctx(ctx, "c-now")).accepted
