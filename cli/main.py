"""The ``taas`` command line: ``taas <group> <command> ...``.

Each group lives in its own module under ``cli/`` exposing ``register(subparsers)``; a command's
handler returns an exit code. Bad input raises ``ValueError`` (or ``FileNotFoundError``), which is
printed as one line on stderr with exit code 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

GROUPS = ("commission", "library", "generate", "marketplace", "demo", "verify")


def _offline_environment() -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    from infra.hardware import accelerator_env

    os.environ.update(accelerator_env())  # DS_ACCELERATOR=cpu only where CUDA is absent
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Progress bars and library deprecation notices drown the flow's own progress lines.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taas", description="taas-factory: domain experts")
    sub = parser.add_subparsers(dest="group", required=True)
    for name in GROUPS:
        try:
            module = importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline_environment()
    from infra.prefect_server import install

    install()  # a command that is killed leaves no temporary Prefect server behind
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"taas: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
