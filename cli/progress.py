"""What a long command shows on the terminal: one progress display per stage, not the libraries'.

Without ``--verbose``, :func:`quiet_libraries` turns off the progress bars of tqdm (lm-eval,
datasets, the Hub), transformers and datasets, their info logging, and Prefect's own console
lines; :class:`StageDisplay` then shows the flow's stages with rich: a spinner line with the
running stage and its latest message, and one line per finished stage with its state and wall
time. Warnings and errors are always printed. ``--verbose`` keeps every library's own output.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import contextmanager

#: loggers whose records are the stages' progress (Prefect's run loggers)
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def quiet_libraries() -> None:
    """Silences the libraries' own bars and info logs; set before they are imported (tqdm reads
    TQDM_DISABLE when it is imported), and inherited by the training processes."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    # mlflow sets its own loggers' level from this when it is imported (INFO otherwise)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Prefect's console handler would print every run log line beside the stage display.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "deepspeed", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


class StageDisplay(logging.Handler):
    """A logging handler on Prefect's run loggers that draws one line per stage with rich."""

    def __init__(self, console=None) -> None:
        super().__init__(level=logging.INFO)
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.status = self.console.status("starting", spinner="dots")
        self.started: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stage = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", "")
            message = record.getMessage().splitlines()[0] if record.getMessage() else ""
            self.started.setdefault(stage, time.monotonic())
            if message.startswith("Finished in state"):
                state = message.removeprefix("Finished in state ").rstrip("()")
                first_seen = self.started.pop(stage, time.monotonic())
                created = run_created_at(getattr(record, "task_run_id", None))
                # a task that logs nothing before it ends was first seen at its end
                took = record.created - created if created else time.monotonic() - first_seen
                mark = "[green]✓[/]" if state == "Completed" else "[red]✗[/]"
                self.console.print(f"{mark} {stage} [dim]{state}, {took:.1f} s[/]")
                return
            if record.levelno >= logging.WARNING:
                return  # Prefect's console handler prints warnings and errors itself
            self.status.update(f"{stage}: {message[:100]}")
        except Exception:  # noqa: BLE001 - a display failure must never fail the command
            self.handleError(record)


def run_created_at(run_id: object) -> float | None:
    """When a Prefect run was created (Unix seconds), read from its id where that is a UUIDv7
    (its first 48 bits are the creation time in milliseconds; Prefect's task runs have such
    ids); None otherwise."""
    try:
        parsed = uuid.UUID(str(run_id))
    except ValueError:
        return None
    return (parsed.int >> 80) / 1000 if parsed.version == 7 else None


@contextmanager
def stage_display(enabled: bool):
    """Shows the stages while the block runs (nothing when ``enabled`` is false)."""
    if not enabled:
        yield
        return
    # Prefect configures its loggers (logging.config.dictConfig, which replaces their handlers)
    # when prefect.main is first imported, lazily by the first `from prefect import flow`; a
    # handler added before that would be dropped without a word.
    import prefect.main  # noqa: F401

    display = StageDisplay()
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addHandler(display)
    display.status.start()
    try:
        yield
    finally:
        display.status.stop()
        for logger in loggers:
            logger.removeHandler(display)
