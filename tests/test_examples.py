"""Every shipped example spec validates as shipped: `taas commission validate` on its own data
(the samples under examples/), with the spec's own data roots, from another working folder.

The base is the tiny test base (``TAAS_BASE_MODEL_DIR``) so the test stays fast; the specs'
own base sections are checked by tests/test_commission.py (loading) and by ``taas demo``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli.main import main
from factory.commission import load_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_every_example_is_enrolled():
    assert {p.name for p in EXAMPLES} >= {
        "legal_commission.yaml",
        "minimal_commission.yaml",
        "mixed_sources_commission.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_as_shipped(path, taas_home, tiny_base, monkeypatch, tmp_path, capsys):
    spec = load_spec(path)
    for source in spec.data:
        assert "://" not in source.uri, f"{path.name}: {source.uri} is not shipped"
        assert (path.parent / source.uri).is_file(), f"{path.name}: {source.uri} is missing"
    monkeypatch.setenv("TAAS_BASE_MODEL_DIR", str(tiny_base.path))
    monkeypatch.chdir(tmp_path)  # data paths resolve from the spec's folder, not from here
    assert main(["commission", "validate", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "valid: ready to submit" in out
    tokens = re.search(r"(\d+) held-out tokens \(min (\d+)\)", out)
    assert tokens and int(tokens.group(1)) >= int(tokens.group(2)) == spec.heldout.min_tokens
    kept = re.search(r"quality: (\d+) rows in, (\d+) kept", out)
    assert kept and int(kept.group(2)) >= 0.9 * int(kept.group(1)) > 0
