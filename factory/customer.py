"""Customer identity: a stable id per customer, and the expert id a commission registers under.

The registered name used to be ``slug(domain)-slug(customer)``, so "Acme, Inc." and "ACME INC"
(and every non-Latin name, which slugs to "x") shared one registered model: a second customer's
commission became a version of the first's expert and could replace what its buyers, exclusive
holders included, were served. Now:

- :func:`customer_id_for` is ``"u-"`` + the first 16 hex digits of sha256 over the name in
  Unicode NFC with runs of whitespace collapsed and the ends stripped. Nothing else is folded
  (case, punctuation, scripts all count): two spellings are two customers unless an operator
  says otherwise, because merging two customers is the failure, splitting one is a nuisance.
- :func:`expert_id_for` is ``<domain>-<slug(customer)[:32]>-<12 hex digits of the id>``: readable,
  and distinct for distinct customers (a registry name: ``[a-z0-9-]``, at most 109 characters).
- the registered model carries the owner's id as tag :data:`OWNER_TAG`, and registration refuses
  to add a version to a model another customer owns (:func:`check_owner`), so even a colliding
  name can never write into another customer's expert.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

OWNER_TAG = "customer_id"


def normalize_customer(name: str) -> str:
    """NFC, whitespace runs collapsed to one space, ends stripped; nothing else folded."""
    return " ".join(unicodedata.normalize("NFC", name).split())


def customer_id_for(name: str) -> str:
    normalized = normalize_customer(name)
    if not normalized:
        raise ValueError("customer: give a non-empty customer name")
    return "u-" + hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:16]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "x"


def expert_id_for(domain: str, customer: str) -> str:
    """The library name of a customer's expert for a domain (see the module docstring)."""
    readable = slug(customer)[:32].strip("-") or "x"
    return f"{slug(domain)}-{readable}-{customer_id_for(customer)[2:14]}"


def check_owner(name: str, owner: str | None, customer_id: str) -> None:
    """Refuses (ValueError) unless the registered model ``name``, owned by ``owner`` (its
    :data:`OWNER_TAG`; None or "" for a model registered before owners were recorded), belongs
    to ``customer_id``."""
    if (owner or "") != customer_id:
        raise ValueError(
            f"expert_id: {name!r} belongs to another customer; a commission can only add "
            "versions to its own customer's expert"
        )
