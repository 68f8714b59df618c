"""``taas demo``: one commission end to end on the embedded default, no server to start.

Writes the demo data (licence texts shipped by the installed packages) under
``<TAAS_HOME>/demo``, submits a copy of ``examples/legal_commission.yaml`` pointing at it through
the Prefect commission flow, prints the summary, then continues one held-out licence prompt with
the base and with the new expert side by side (greedy, so the same run shows the same text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "legal_commission.yaml"
PROMPT_WORDS = 14  # the side-by-side prompt: the first words of a held-out row
NEW_TOKENS = 32


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


def run_demo(template: Path = EXAMPLE, cycles: int | None = None) -> tuple[dict, Path]:
    """Runs the demo commission (see the module doc); its summary and the submitted spec."""
    from flows.commission import run_commission
    from infra.settings import get_settings

    settings = get_settings()
    home = settings.ensure_home()
    spec_path = write_demo_inputs(home, template, cycles)
    settings = get_settings(data_roots=[*settings.data_roots, home / "demo"])
    return run_commission(spec_path=spec_path, settings=settings), spec_path


def side_by_side(spec_path: Path, commission_id: str) -> tuple[str, str, str]:
    """(prompt, base continuation, expert continuation) for the first held-out row's opening."""
    import torch
    from peft import PeftModel

    from factory.base_model import load_base
    from factory.commission import load_spec
    from factory.data.prepare import base_model_folder
    from infra.settings import get_settings

    settings = get_settings()
    root = settings.home / "commissions" / commission_id
    first = json.loads((root / "data" / "heldout.jsonl").read_text().splitlines()[0])["text"]
    prompt = " ".join(first.split()[:PROMPT_WORDS])
    base, tokenizer = load_base(base_model_folder(load_spec(spec_path), settings))
    model = PeftModel.from_pretrained(base, str(root / "composed" / "expert")).eval()
    ids = tokenizer(prompt, return_tensors="pt")

    def continued() -> str:
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    with model.disable_adapter():
        by_base = continued()
    return prompt, by_base, continued()


def print_side_by_side(prompt: str, by_base: str, by_expert: str) -> None:
    print(f"\nprompt (held-out licence text): {prompt!r}")
    print(f"  base   -> {' '.join(by_base.split())!r}")
    print(f"  expert -> {' '.join(by_expert.split())!r}")


def _run(args: argparse.Namespace) -> int:
    from flows.commission import print_summary

    summary, spec_path = run_demo(args.spec, args.cycles)
    print_summary(summary)
    print_side_by_side(*side_by_side(spec_path, summary["commission_id"]))
    return 0 if summary.get("registered") else 1
