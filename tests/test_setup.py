"""What ``make setup`` (scripts/bootstrap.sh) leaves in the venv beyond the packages."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (REPO / os.environ.get("TAAS_VENV", ".venv")).resolve(),
    reason="runs in the venv scripts/bootstrap.sh made",
)
@pytest.mark.parametrize(
    "source",
    ["torch/__init__.py", "torch/distributed/tensor/_ops/__init__.py",
     "transformers/modeling_utils.py", "peft/peft_model.py", "deepspeed/runtime/engine.py",
     "prefect/flow_engine.py", "sympy/core/basic.py"],
)  # fmt: skip
def test_heavy_imports_have_compiled_bytecode(source):
    """Every line rank and flow run imports these; where PYTHONDONTWRITEBYTECODE is set, a
    module without a .pyc is compiled from source in every process (about twice the time)."""
    package = importlib.util.find_spec(source.split("/")[0])  # found, not imported
    path = Path(package.origin).parent.parent / source
    cached = Path(importlib.util.cache_from_source(str(path)))
    assert cached.is_file(), f"{source}: no {cached.name}; run scripts/bootstrap.sh again"
    assert cached.stat().st_mtime >= path.stat().st_mtime, f"{source}: its .pyc is stale"
