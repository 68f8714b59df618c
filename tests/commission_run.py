"""Runs one commission from the command line; the crash test kills this process mid-flow.

Usage: python tests/commission_run.py SPEC HOME DATA_ROOT BASE_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tests.conftest  # noqa: E402,F401 - the same offline environment as the suite
from flows.commission import run_commission  # noqa: E402
from infra.settings import get_settings  # noqa: E402

spec, home, data_root, base_dir = (Path(a) for a in sys.argv[1:5])
run_commission(spec, get_settings(home=home, data_roots=[data_root], base_model_dir=base_dir))
