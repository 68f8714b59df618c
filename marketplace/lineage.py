"""A registered version's warm-start parent, read from its ``parent_*`` tags, for revenue.

:func:`library_parent_of` answers ``(name, version) -> (parent name, parent version, parent
share)`` or None, remembered per version (a version's tags of provenance never change); the
library opens on first use. :class:`marketplace.licensing.Licensing` takes it as ``parent_of``.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from marketplace.catalog import library_version_tags


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
    tags_of = library_version_tags(settings)

    def parent_of(name: str, version: str) -> tuple[str, str, Decimal] | None:
        tags = tags_of(name, version)
        return None if tags is None else parent_from_tags(tags)

    return parent_of
