"""``taas demo``: one commission end to end on the embedded default, no server to start.

Writes the demo data (licence texts shipped by the installed packages) under
``<TAAS_HOME>/demo``, submits a copy of ``examples/legal_commission.yaml`` pointing at it through
the Prefect commission flow, and prints the summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "legal_commission.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the demo commission on the embedded default")
    parser.add_argument("--spec", type=Path, default=EXAMPLE, help="spec template to submit")
    parser.add_argument("--cycles", type=int, default=None, help="override budget.cycles")
    parser.set_defaults(handler=_run)


def write_demo_inputs(home: Path, template: Path, cycles: int | None = None) -> Path:
    """Writes the licence corpus and a spec copy that points at it; returns the spec path."""
    from factory.corpus import licence_paragraphs
    from infra.atomic import atomic_write_text

    folder = home / "demo"
    rows = licence_paragraphs()
    if not rows:
        raise ValueError("demo: no licence files found in the installed packages")
    atomic_write_text(
        folder / "licences.jsonl", "".join(json.dumps({"text": r}) + "\n" for r in rows)
    )
    spec = yaml.safe_load(template.read_text())
    for source in spec["data"]:
        source["uri"] = str(folder / source["uri"])
    if cycles is not None:
        spec["budget"]["cycles"] = cycles
    spec_path = folder / template.name
    atomic_write_text(spec_path, yaml.safe_dump(spec, sort_keys=False))
    return spec_path


def _run(args: argparse.Namespace) -> int:
    from flows.commission import print_summary, run_commission
    from infra.settings import get_settings

    settings = get_settings()
    home = settings.ensure_home()
    spec_path = write_demo_inputs(home, args.spec, args.cycles)
    settings = get_settings(data_roots=[*settings.data_roots, home / "demo"])
    summary = run_commission(spec_path=spec_path, settings=settings)
    print_summary(summary)
    return 0 if summary.get("registered") else 1
