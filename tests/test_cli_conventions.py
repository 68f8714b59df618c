"""The command line's conventions: help text on every argument, exit codes in `taas --help`,
`--json` on library list/show/compare/lineage, registered names and name@alias for
`taas generate --experts`, and the stage display that replaces the libraries' bars."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import EXIT_CODES, build_parser, main
from evaluation.benchmark import BenchmarkResult
from factory.library import ExpertLibrary
from factory.library.provenance import RegistrationProvenance
from infra.settings import get_settings

REPO = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, path: str = "taas"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_argument_has_help_text():
    missing = [
        f"{path} {action.dest}"
        for path, parser in _parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction)
        and not action.help
    ]
    assert missing == []
    assert len(list(_parsers(build_parser()))) > 15  # the walk reached the commands


def test_help_lists_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert EXIT_CODES.strip() in out
    for code in ("0 ", "1 ", "2 ", "130"):
        assert f"\n  {code}" in out


def test_library_json_and_generate_by_name(taas_home, tiny_base, tiny_expert_folder, capsys):
    library = ExpertLibrary(get_settings())
    prov = RegistrationProvenance(
        commission_id="com-json", dataset_sha256="d", config_hash="c", cycles=1
    )
    library.register(tiny_expert_folder, prov, BenchmarkResult(
        table={"base": {"cloze": {"acc": 0.5}}, "expert": {"cloze": {"acc": 0.625}}}
    ))  # fmt: skip

    assert main(["library", "list", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["name"], entry["version"], entry["aliases"]) == ("expert-legal", "1",
                                                                  ["challenger"])  # fmt: skip
    assert entry["tags"]["commission_id"] == "com-json"
    assert main(["library", "show", "expert-legal", "--version", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tags"]["adapter_sha256"] == entry["tags"]["adapter_sha256"]
    assert main(["library", "compare", "expert-legal@1", "expert-legal@challenger", "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared["benchmarks"]["cloze/acc"] == [0.625, 0.625]
    assert main(["library", "lineage", "expert-legal", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["version"] == "1" and row["commission_id"] == "com-json"

    for ref in ("expert-legal", "expert-legal@challenger"):
        argv = ["generate", "--experts", ref, "--base", str(tiny_base.path), "--prompt", "The"]
        assert main([*argv, "--max-new-tokens", "2"]) == 0, ref
        lines = capsys.readouterr().out.strip().splitlines()
        assert lines[0].startswith("The") and len(lines) == 3
    assert main(["generate", "--experts", "expert-legal@nonexistent", "--prompt", "x"]) == 2


def test_stage_display_draws_one_line_per_stage():
    from prefect import flow, get_run_logger, task
    from rich.console import Console

    from cli.progress import RUN_LOGGERS, StageDisplay

    @task(task_run_name="stage-{n}")
    def stage(n: int) -> int:
        if n == 1:
            get_run_logger().info("working on %d", n)
        time.sleep(0.5)  # stage 2 logs nothing before it ends: its time comes from its run id
        return n

    @flow(flow_run_name="display-check")
    def staged() -> int:
        return stage(1) + stage(2)

    out = io.StringIO()
    display = StageDisplay(Console(file=out, width=120, color_system=None))
    loggers = [__import__("logging").getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addHandler(display)
    try:
        assert staged() == 3
    finally:
        for logger in loggers:
            logger.removeHandler(display)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert [line.split(" ")[1] for line in lines] == ["stage-1", "stage-2", "display-check"]
    assert all(line.startswith("✓") and "Completed" in line for line in lines)
    took = [float(line.rsplit(", ", 1)[1].removesuffix(" s")) for line in lines]
    assert all(0.5 <= seconds < 60 for seconds in took), lines


def test_stage_display_survives_prefect_configuring_its_loggers(tmp_path):
    """In a fresh process the display is attached before the flows are imported, and the first
    `from prefect import flow` configures Prefect's loggers: the stage lines must still show."""
    script = tmp_path / "staged.py"
    script.write_text(
        "from cli.progress import quiet_libraries, stage_display\n"
        "quiet_libraries()\n"
        "with stage_display(True):\n"
        "    from prefect import flow, task\n"
        "    @task(task_run_name='stage-{n}')\n"
        "    def stage(n):\n"
        "        return n\n"
        "    @flow(flow_run_name='display-check')\n"
        "    def staged():\n"
        "        return stage(1) + stage(2)\n"
        "    assert staged() == 3\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr
    for stage in ("stage-1", "stage-2", "display-check"):
        assert f"✓ {stage} Completed" in printed, printed[-2000:]
