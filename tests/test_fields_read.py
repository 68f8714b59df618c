"""Every setting and every commission spec field is read somewhere in the code.

A field nothing reads is a promise the factory does not keep (a README that documents
``TAAS_HOSTFILE`` while no code passes it on). The check is textual: a field counts as read when
its name appears as an attribute access (``.name``) or a mapping key (``"name"``) in the
sources (tests excluded; the declaring module's own field declarations excluded). It cannot
prove a use, but it fails on the case that matters: a name no other code mentions at all.
"""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel

from factory.commission import CommissionSpec
from infra.settings import Settings
from tests.conftest import REPO

SOURCE_DIRS = ("flows", "tasks", "factory", "evaluation", "merging", "infra", "marketplace", "cli")


def _sources(declaring: str) -> str:
    """Every source file; the declaring module without its field declarations (its own
    properties, such as ``Settings.tracking_uri`` over ``mlflow_tracking_uri``, count)."""
    texts = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if path.relative_to(REPO).as_posix() == declaring:
                text = re.sub(r"(?m)^    \w+: .*$", "", text)
            texts.append(text)
    return "\n".join(texts)


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, field name) for every field, nested spec sections included."""
    out = []
    for name, info in model.model_fields.items():
        out.append((prefix + name, name))
        annotation = info.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                out += _fields(candidate, prefix + name + ".")
    return out


def _read(name: str, text: str) -> bool:
    return bool(re.search(rf"\.{name}\b|[\"']{name}[\"']", text))


SETTINGS_TEXT = _sources("infra/settings.py")
SPEC_TEXT = _sources("factory/commission.py")


@pytest.mark.parametrize("path,name", _fields(Settings))
def test_every_setting_is_read(path, name):
    assert _read(name, SETTINGS_TEXT), f"Settings.{path} is read nowhere; wire it or remove it"


@pytest.mark.parametrize("path,name", _fields(CommissionSpec))
def test_every_spec_field_is_read(path, name):
    assert _read(name, SPEC_TEXT), f"spec field {path} is read nowhere; wire it or remove it"


def test_the_check_fails_on_a_field_nothing_reads():
    class Orphan(BaseModel):
        never_mentioned_anywhere_xyz: int = 0

    ((path, name),) = _fields(Orphan)
    assert not _read(name, SPEC_TEXT)
