"""A registered version's warm-start parent, read from its ``parent_*`` tags, for revenue.

:func:`library_parent_of` answers ``(name, version) -> (parent name, parent version, parent
share)`` or None, remembered per version (a version's tags of provenance never change); the
library opens on first use. :class:`marketplace.licensing.Licensing` takes it as ``parent_of``.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any


def parent_from_tags(tags: dict[str, str]) -> tuple[str, str, Decimal] | None:
    """The parent of a version with these tags; None when it was trained from the base.
    ValueError when a parent is named with a share outside [0, 1]."""
    name, version = tags.get("parent_expert", ""), tags.get("parent_version", "")
    if not name or not version:
        return None
    share = Decimal(tags.get("parent_share") or "0")
    if not share.is_finite() or not 0 <= share <= 1:
        raise ValueError(f"parent_share: {share} must lie in [0, 1]")
    return name, version, share


def library_parent_of(settings: Any) -> Callable[[str, str], tuple[str, str, Decimal] | None]:
    found: dict[tuple[str, str], tuple[str, str, Decimal] | None] = {}
    opened: list[Any] = []

    def parent_of(name: str, version: str) -> tuple[str, str, Decimal] | None:
        if (name, version) not in found:
            if not opened:
                from factory.library import ExpertLibrary

                opened.append(ExpertLibrary(settings))
            try:
                tags = opened[0].show(name, version).tags
            except Exception as exc:
                # As in catalog.library_commission_of: only a version the registry does not
                # know has no parent; a registry that is down must not re-attribute revenue.
                missing = getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
                if isinstance(exc, ValueError | LookupError) or missing:
                    return None
                raise
            found[(name, version)] = parent_from_tags(tags)
        return found[(name, version)]

    return parent_of
