"""The ``taas`` command line: ``taas <group> <command> ...``.

Each group lives in its own module under ``cli/`` exposing ``register(subparsers)``; a command's
handler returns an exit code. Bad input raises ``ValueError`` (or ``FileNotFoundError``), which is
printed as one line on stderr with exit code 2; nothing is written in that case. The exit
codes are listed in ``taas --help`` (:data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

EXIT_CODES = """exit codes:
  0    done
  1    refused or failed: a check said no (taas verify), or the factory itself failed
       (a traceback names the cause)
  2    bad input: a spec, file, name or option (one line on stderr naming it); nothing written
  130  interrupted (Ctrl-C); a commission resumes from its last committed step when resubmitted
"""

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
    parser = argparse.ArgumentParser(
        prog="taas",
        description="taas-factory: domain experts",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own progress bars and logs (tqdm, datasets, transformers, "
        "lm-eval, Prefect) instead of one progress line per stage",
    )
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


#: commands that run flows: they get the stage display (cli.progress) unless --verbose
STAGED = {("commission", "submit"), ("demo", None)}


def main(argv: list[str] | None = None) -> int:
    # Before anything imports tqdm or Prefect (both read their settings when imported).
    verbose = "--verbose" in (sys.argv[1:] if argv is None else argv)
    if not verbose:
        from cli.progress import quiet_libraries

        quiet_libraries()
    _offline_environment()
    from infra.prefect_server import install

    install()  # a command that is killed leaves no temporary Prefect server behind
    args = build_parser().parse_args(argv)
    from cli.progress import stage_display

    staged = (args.group, getattr(args, "command", None)) in STAGED and not verbose
    try:
        with stage_display(staged):
            return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"taas: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
