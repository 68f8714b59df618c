"""The candidate gate: decide, cheapest and safest check first, whether a candidate may be scored.

A candidate (see :mod:`factory.candidate`) is untrusted input. It is rejected with exactly one
reason from :class:`Reason`; the checks run in this order and the first failure decides:

1. ``unreadable``: a file is missing or over its size cap, the manifest is not JSON (or nested
   deeper than a manifest ever is: checked before parsing, so no RecursionError) or does not fit
   :class:`CandidateManifest`, ``created_at`` is not an ISO timestamp;
2. ``unknown_contributor``: no public key registered for the manifest's contributor;
3. ``bad_signature``: the signature does not verify over the manifest's canonical JSON;
4. ``wrong_folder``: an inbox candidate signed by someone other than the contributor whose folder
   it was dropped into (``arrival.json``, written by the factory's inbox scan);
5. ``wrong_base``: the manifest names another base model hash;
6. ``late``: wrong expert, cycle or commission (an inbox candidate must name
   ``GateContext.commission_id``), a parent other than the current version, ``created_at`` or
   arrival after the deadline (the store's time recorded in ``arrival.json``; for the factory's
   own lines the manifest file's mtime);
7. ``unreadable``: the adapter file is not safetensors. The 8-byte little-endian header length
   and the JSON header are parsed here under a size cap, every entry's types are checked (dtype
   a string, shape and offsets lists of non-negative integers) before any arithmetic, and only
   then does safetensors deserialize: anything else (a pickle, say) is never deserialized;
8. ``unexpected_keys`` / ``shape_mismatch``: keys, shapes and dtypes against the reference
   (decided from the header, before the tensors are read);
9. ``hash_mismatch``: ``tensors_sha256`` differs from the manifest's ``adapter_sha256``;
10. ``non_finite``: a NaN or inf in any tensor;
11. ``duplicate`` (:func:`screen_candidates`, across candidates in arrival order, the first keeps
    its place): the same adapter sha256, or cosine > ``near_duplicate_cosine`` between the
    flattened effective weight deltas (candidate - current, see :func:`delta_cosine`); and
    after scoring (:func:`screen_losses`) exactly the same held-out loss as an earlier accepted
    candidate.

An OSError other than a missing file is the factory's own failure (it staged the files) and is
raised, never recorded against the contributor. The candidate's adapter_config.json is not
trusted: candidates are evaluated under the factory's config.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import torch
from pydantic import ValidationError

from factory.candidate import CandidateFiles, CandidateManifest
from factory.hashing import tensors_sha256
from factory.signing import verify
from merging.lora_algebra import effective_deltas

Adapter = dict[str, torch.Tensor]
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


class Reason(StrEnum):
    UNREADABLE = "unreadable"
    HASH_MISMATCH = "hash_mismatch"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_CONTRIBUTOR = "unknown_contributor"
    WRONG_BASE = "wrong_base"
    LATE = "late"
    UNEXPECTED_KEYS = "unexpected_keys"
    SHAPE_MISMATCH = "shape_mismatch"
    NON_FINITE = "non_finite"
    DUPLICATE = "duplicate"
    WRONG_FOLDER = "wrong_folder"


MAX_MANIFEST_DEPTH = 4  # a manifest is one flat object; JSON nested deeper is refused unparsed


class PublicKeys(Protocol):
    def public_key(self, contributor_id: str) -> str | None: ...


@dataclass(frozen=True)
class GateContext:
    """What the gate checks candidates against; ``reference_shapes`` maps key -> shape."""

    expert_id: str
    cycle: int
    base_model_sha256: str
    current_adapter_sha256: str | None  # None: this cycle trains from the base
    deadline: datetime
    keys: PublicKeys
    reference_shapes: dict[str, tuple[int, ...]]
    adapter_config: dict
    current_adapter: Adapter | None = None
    reference_dtype: torch.dtype = torch.float32
    near_duplicate_cosine: float = 0.99
    # The commission being trained; an inbox candidate must name it (None: every inbox
    # candidate is refused, the safe answer when the caller did not say).
    commission_id: str | None = None
    max_adapter_bytes: int = 512 << 20
    max_header_bytes: int = 1 << 20
    max_manifest_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        if self.deadline.tzinfo is None:
            raise ValueError("deadline: give a timezone-aware datetime, e.g. with tzinfo=UTC")


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: Reason | None
    detail: str
    contributor_id: str | None
    adapter_sha256: str | None
    candidate_id: str
    signature_verified: bool = False
    adapter: Adapter | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "candidate_id": self.candidate_id,
            "accepted": self.accepted,
            "reason": self.reason.value if self.reason else None,
            "detail": self.detail,
            "contributor_id": self.contributor_id,
            "adapter_sha256": self.adapter_sha256,
        }


class Rejected(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > cap:
            raise Rejected(Reason.UNREADABLE, f"{what}: {size} bytes exceeds the cap of {cap}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise Rejected(Reason.UNREADABLE, f"{what}: file missing") from None
    if len(data) > cap:  # grew between stat and read
        raise Rejected(Reason.UNREADABLE, f"{what}: exceeds the cap of {cap} bytes")
    return data


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Rejected(Reason.UNREADABLE, f"created_at: not an ISO timestamp: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _json_depth_ok(data: bytes, limit: int) -> bool:
    """True when brackets outside strings nest at most ``limit`` deep (a linear scan, no parse)."""
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def _loads_untrusted(data: bytes, what: str, depth: int) -> object:
    if not _json_depth_ok(data, depth):
        raise Rejected(Reason.UNREADABLE, f"{what}: JSON nested deeper than {depth} levels")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Rejected(Reason.UNREADABLE, f"{what}: not JSON") from None


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_safetensors_header(data: bytes, max_header_bytes: int) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header, checked without deserializing."""
    if len(data) < 8:
        raise Rejected(Reason.UNREADABLE, "adapter: shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > max_header_bytes or 8 + length > len(data):
        raise Rejected(Reason.UNREADABLE, f"adapter: header length {length} is not plausible")
    try:
        header = _loads_untrusted(data[8 : 8 + length], "adapter header", 4)
    except Rejected:
        raise Rejected(Reason.UNREADABLE, "adapter: header is not JSON (not safetensors)") from None
    if not isinstance(header, dict):
        raise Rejected(Reason.UNREADABLE, "adapter: header is not a JSON object")
    header.pop("__metadata__", None)
    body = len(data) - 8 - length
    for key, entry in header.items():
        # Types first: a list-valued dtype or string offsets must be refused, not raise.
        fields = entry if isinstance(entry, dict) else {}
        dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(_is_index(d) for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_index(o) for o in offsets)
        ):
            raise Rejected(Reason.UNREADABLE, f"adapter: bad header entry {key[:64]!r}")
        (start, end), numel = offsets, math.prod(shape)
        if dtype not in _ITEMSIZE:
            raise Rejected(Reason.SHAPE_MISMATCH, f"adapter[{key}]: dtype {dtype} is not float")
        if not (0 <= start <= end <= body and end - start == numel * _ITEMSIZE[dtype]):
            raise Rejected(Reason.UNREADABLE, f"adapter[{key}]: data offsets are inconsistent")
    return header


def _check_layout(header: dict[str, dict], ctx: GateContext) -> None:
    keys, expected = set(header), set(ctx.reference_shapes)
    if keys != expected:
        extra, missing = sorted(keys - expected), sorted(expected - keys)
        raise Rejected(Reason.UNEXPECTED_KEYS, f"unexpected {extra[:3]}, missing {missing[:3]}")
    for key, entry in header.items():
        if tuple(entry["shape"]) != tuple(ctx.reference_shapes[key]):
            raise Rejected(
                Reason.SHAPE_MISMATCH,
                f"{key}: shape {entry['shape']}, expected {list(ctx.reference_shapes[key])}",
            )
        if SAFETENSORS_DTYPES[entry["dtype"]] != ctx.reference_dtype:
            raise Rejected(Reason.SHAPE_MISMATCH, f"{key}: dtype {entry['dtype']}")


def _arrival(files: CandidateFiles) -> dict | None:
    """The factory's own record of an inbox candidate (None for the factory's lines)."""
    try:
        record = json.loads(files.arrival.read_text())
    except FileNotFoundError:
        return None
    assert isinstance(record, dict) and "contributor_id" in record, "arrival.json is ours"
    return record


def _check(files: CandidateFiles, ctx: GateContext, state: dict) -> tuple[Adapter, str]:
    raw = _read_capped(files.manifest, ctx.max_manifest_bytes, "manifest")
    body = _loads_untrusted(raw, "manifest", MAX_MANIFEST_DEPTH)
    try:
        manifest = CandidateManifest.model_validate(body)
    except (ValueError, ValidationError) as exc:
        raise Rejected(Reason.UNREADABLE, f"manifest: {str(exc).splitlines()[0]}") from None
    state["candidate_id"], state["contributor_id"] = manifest.candidate_id, manifest.contributor_id
    created_at = _parse_time(manifest.created_at)
    public = ctx.keys.public_key(manifest.contributor_id)
    if public is None:
        raise Rejected(Reason.UNKNOWN_CONTRIBUTOR, f"no key for {manifest.contributor_id!r}")
    signature = _read_capped(files.signature, 1024, "signature").decode("ascii", "replace")
    if not verify(public, manifest.model_dump(mode="json"), signature.strip()):
        raise Rejected(Reason.BAD_SIGNATURE, "signature does not verify over the manifest")
    state["signature_verified"] = True
    arrival = _arrival(files)
    if arrival is not None and arrival["contributor_id"] != manifest.contributor_id:
        raise Rejected(
            Reason.WRONG_FOLDER,
            f"signed by {manifest.contributor_id!r}, dropped into {arrival['contributor_id']!r}'s "
            "folder",
        )
    if manifest.base_model_sha256 != ctx.base_model_sha256:
        raise Rejected(Reason.WRONG_BASE, f"base {manifest.base_model_sha256[:12]}")
    if manifest.expert_id != ctx.expert_id or manifest.cycle != ctx.cycle:
        raise Rejected(Reason.LATE, f"for {manifest.expert_id} cycle {manifest.cycle}")
    if arrival is not None and (
        ctx.commission_id is None or manifest.commission_id != ctx.commission_id
    ):
        raise Rejected(Reason.LATE, f"for commission {manifest.commission_id[:40]!r}")
    if manifest.parent_adapter_sha256 != ctx.current_adapter_sha256:
        raise Rejected(Reason.LATE, "trained from another version than the current one")
    if arrival is not None:
        arrived = datetime.fromisoformat(arrival["stored_at"])
    else:
        arrived = datetime.fromtimestamp(files.manifest.stat().st_mtime, UTC)
    if created_at > ctx.deadline or arrived > ctx.deadline:
        raise Rejected(Reason.LATE, f"created {created_at}, arrived {arrived}")
    data = _read_capped(files.adapter, ctx.max_adapter_bytes, "adapter")
    _check_layout(parse_safetensors_header(data, ctx.max_header_bytes), ctx)
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        adapter = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise Rejected(Reason.UNREADABLE, f"adapter: {exc}") from None
    digest = tensors_sha256(adapter)
    state["adapter_sha256"] = digest
    if digest != manifest.adapter_sha256:
        raise Rejected(Reason.HASH_MISMATCH, f"tensors {digest[:12]} != manifest")
    for key, tensor in adapter.items():
        if not bool(torch.isfinite(tensor).all()):
            raise Rejected(Reason.NON_FINITE, f"{key} holds NaN or inf")
    return adapter, digest


def check_candidate(files: CandidateFiles, ctx: GateContext) -> GateDecision:
    """The per-candidate checks (everything except duplicates); raises on our own I/O failure."""
    if not files.folder.is_dir():
        raise FileNotFoundError(f"{files.folder}: staged candidate folder is missing")
    state: dict = {"candidate_id": files.folder.name}
    try:
        adapter, digest = _check(files, ctx, state)
    except Rejected as rejected:
        return GateDecision(
            accepted=False,
            reason=rejected.reason,
            detail=rejected.detail,
            contributor_id=state.get("contributor_id"),
            adapter_sha256=state.get("adapter_sha256"),
            candidate_id=state["candidate_id"],
            signature_verified=state.get("signature_verified", False),
        )
    return GateDecision(
        True, None, "ok", state["contributor_id"], digest, state["candidate_id"], True, adapter
    )


def delta_cosine(a: Adapter, b: Adapter, current: Adapter | None, adapter_config: dict) -> float:
    """Cosine between the flattened effective deltas of a and b relative to current.

    For each module the effective weight delta ``s * (B_a @ A_a - B_cur @ A_cur)`` is used rather
    than the raw A/B differences: in cycle 1 every candidate starts from the same seeded A, which
    would make raw parameter deltas look alike, and a copy with B scaled by c and A by 1/c would
    hide from a parameter-space cosine. 0 when one delta is zero.
    """
    delta_a, delta_b = effective_deltas(a, adapter_config), effective_deltas(b, adapter_config)
    base = effective_deltas(current, adapter_config) if current is not None else {}
    dot = norm_a = norm_b = 0.0
    for prefix in sorted(delta_a):
        da, db = delta_a[prefix], delta_b[prefix]
        if prefix in base:
            da, db = da - base[prefix], db - base[prefix]
        dot += float((da * db).sum())
        norm_a += float((da * da).sum())
        norm_b += float((db * db).sum())
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return dot / math.sqrt(norm_a * norm_b)


def _reject(decision: GateDecision, detail: str) -> GateDecision:
    return replace(decision, accepted=False, reason=Reason.DUPLICATE, detail=detail, adapter=None)


def screen_candidates(candidates: list[CandidateFiles], ctx: GateContext) -> list[GateDecision]:
    """check_candidate on each, then duplicates: a later copy of an earlier accepted one is out."""
    decisions: list[GateDecision] = []
    kept: list[GateDecision] = []
    for files in candidates:
        decision = check_candidate(files, ctx)
        if decision.accepted:
            assert decision.adapter is not None
            for earlier in kept:
                if earlier.adapter_sha256 == decision.adapter_sha256:
                    decision = _reject(decision, f"same sha256 as {earlier.candidate_id}")
                    break
                cosine = delta_cosine(
                    earlier.adapter, decision.adapter, ctx.current_adapter, ctx.adapter_config
                )
                if cosine > ctx.near_duplicate_cosine:
                    detail = f"delta cosine {cosine:.4f} with {earlier.candidate_id}"
                    decision = _reject(decision, detail)
                    break
            else:
                kept.append(decision)
        decisions.append(decision)
    return decisions


def screen_losses(decisions: list[GateDecision], losses: list[float | None]) -> list[GateDecision]:
    """After scoring: an accepted candidate with exactly an earlier one's held-out loss is out."""
    seen: dict[float, str] = {}
    out = []
    for decision, loss in zip(decisions, losses, strict=True):
        if decision.accepted and loss is not None and math.isfinite(loss):
            if loss in seen:
                decision = _reject(decision, f"same held-out loss {loss!r} as {seen[loss]}")
            else:
                seen[loss] = decision.candidate_id
        out.append(decision)
    return out
