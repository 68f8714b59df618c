"""Contributor identities: ed25519 keys, and signatures over canonical JSON manifests.

A contributor (a production line or an outside party) holds a private key; its public key is
registered in the ledger under its contributor id. A signature covers the canonical JSON (sorted
keys, no spaces, UTF-8) of a manifest, so any change to any field invalidates it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from infra.atomic import atomic_write_bytes


def canonical_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def sign(key: Ed25519PrivateKey, obj: Any) -> str:
    return base64.b64encode(key.sign(canonical_bytes(obj))).decode("ascii")


def verify(public_b64: str, obj: Any, signature_b64: str) -> bool:
    """True when ``signature_b64`` is the key's signature over ``obj``; False on any defect."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_b64, validate=True))
        public.verify(base64.b64decode(signature_b64, validate=True), canonical_bytes(obj))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(path, pem)
    Path(path).chmod(0o600)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an ed25519 private key")
    return key


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    if Path(path).exists():
        return load_private_key(path)
    key = generate_key()
    save_private_key(key, path)
    return key
