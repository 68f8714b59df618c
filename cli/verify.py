"""``taas verify``: check a weight bundle's provenance offline, trusting nothing the server says.

    taas verify BUNDLE [--log LOG] [--key PUBKEY]

BUNDLE is an exported bundle folder (``taas library export``) or the marketplace's
``.tar.gz`` download. Checks the attestation's signature (under ``--key``, the factory key a
buyer pinned, else the bundle's own ``factory-key.pub``), every file's sha256, the
contributors' signatures, and that the transparency log (``--log``: the one published at
``/transparency-log``, else the bundle's excerpt) is an unbroken chain holding this
attestation. Exit 0 and one ``verified`` line when all hold; else one line naming the reason
(see :data:`factory.attestation.REASONS`) and exit 1.
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from factory.bundle import LM_EVAL_DIR, LM_EVAL_FILES

#: bundle files made at export time, so not attested (library.json's aliases move; the lm-eval
#: reproduction is the general tasks' command and results, no weights)
EXPORT_FILES = frozenset(
    {"INTEGRATION.md", "library.json", "COMMITTED.json"}
    | {f"{LM_EVAL_DIR}/{rel}" for rel in LM_EVAL_FILES}
)
MAX_TAR_BYTES = 4 << 30


def _unpack(archive: Path, dest: Path) -> Path:
    """Regular files of ``archive`` under ``dest`` (one top-level folder stripped); links,
    absolute or ``..`` names refuse the archive rather than being skipped."""
    total = 0
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        tops = {PurePosixPath(m.name).parts[0] for m in members if m.name}
        strip = 1 if len(tops) == 1 and all(len(PurePosixPath(m.name).parts) > 1
                                            for m in members if m.isfile()) else 0  # fmt: skip
        for member in members:
            parts = PurePosixPath(member.name).parts
            if member.isdir():
                continue
            if not member.isfile() or member.name.startswith("/") or ".." in parts:
                raise ValueError(f"BUNDLE: {archive} holds {member.name!r}, not a plain file")
            total += member.size
            if total > MAX_TAR_BYTES:
                raise ValueError(f"BUNDLE: {archive} unpacks past {MAX_TAR_BYTES} bytes")
            target = dest.joinpath(*parts[strip:])
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular member always has a file object
            with source, open(target, "wb") as out:
                out.write(source.read())
    return dest


def run_verify(args) -> int:
    from factory.attestation import VerificationError
    from factory.transparency_log import verify_bundle

    bundle = Path(args.bundle)
    for flag, path in (("BUNDLE", bundle), ("--log", args.log), ("--key", args.key)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag}: no such file or folder {path}")
    with tempfile.TemporaryDirectory(prefix="taas-verify-") as scratch:
        folder = bundle if bundle.is_dir() else _unpack(bundle, Path(scratch))
        try:
            result = verify_bundle(folder, args.log, args.key, EXPORT_FILES)
        except VerificationError as exc:
            print(f"taas verify: refused: {exc}", file=sys.stderr)
            return 1
    trust = "given key" if args.key else "the bundle's own key: pin it with --key"
    log = f"log {args.log}" if args.log else "the bundle's log excerpt"
    print(
        f"verified {result.subject}: {result.files} files, {result.contributor_signatures} "
        f"contributor signatures, entry {result.log_seq} of {result.log_entries} in {log}, "
        f"signed by {result.keyid[:16]} ({trust})"
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="check a bundle's attestation offline")
    parser.add_argument("bundle", help="bundle folder or .tar.gz")
    parser.add_argument("--log", type=Path, default=None, help="the published transparency log")
    parser.add_argument("--key", type=Path, default=None, help="the factory's public key")
    parser.set_defaults(handler=run_verify)
