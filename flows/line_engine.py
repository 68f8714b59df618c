"""The ``train-line`` deployment's flow-run command: Prefect's engine, one start at a time.

A process worker runs each flow run as a process of its own (``python -m prefect.engine``).
Its start is mostly imports (Prefect's alone take about 3 s of CPU), and a worker with
``--limit 2`` starts two of them at once when a cycle begins: they share the machine's cores,
and the first line trains only once both have started. This command takes a lock of the machine
(``<TAAS_HOME>/line-slots/start``, beside the machine's process slots) for those imports, so the
first line starts at full speed and the next imports while the first trains, then hands over to
Prefect's engine unchanged. Without ``TAAS_HOME`` no machine folder is known: no lock is taken.

prefect.yaml names it as the deployment's ``command`` job variable, which also makes the process
worker start the engine directly: by default it first runs a separate process that resolves the
deployment's workspace (its pull steps), then the engine, which imports Prefect a second time.
"""

from __future__ import annotations

import os
import runpy
import warnings
from contextlib import nullcontext
from pathlib import Path

from infra.atomic import file_lock
from tasks.slots import machine_folder


def import_engine() -> None:
    """Imports Prefect's engine and the flow's modules, holding the machine's start lock."""
    home = os.environ.get("TAAS_HOME")
    with file_lock(machine_folder(Path(home)) / "start") if home else nullcontext():
        import prefect.flow_engine  # noqa: F401  (the engine's imports: most of the start)

        import flows.train_line  # noqa: F401  (the flow's)


def main() -> None:
    import_engine()
    # Run as `python -m prefect.engine` would be; the imports above are cached, so runpy finds
    # the package already loaded and would say so on every run.
    warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
    runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
