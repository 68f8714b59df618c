"""Prefect's temporary API server dies with the process that started it.

In ephemeral mode (no ``PREFECT_API_URL``) Prefect starts ``uvicorn ... prefect.server.api.
server:create_app`` as a child process (``SubprocessASGIServer``) and stops it from an ``atexit``
hook. A process that ends any other way -- SIGTERM (a cancelled command, a test timeout, a
launcher killing its group), SIGKILL, ``os._exit`` -- never runs that hook, and the server lives on
with parent 1, holding a port, a database handle and memory (six were found after a test run,
the oldest 71 minutes old). The hook itself logs to streams pytest has already closed ("Logging
error ... I/O operation on closed file").

:func:`install` changes two things, in the server module only, when Prefect first imports it
(an import hook, so processes that never start a server pay nothing; importing the module costs
seconds):

- the server is started through a small wrapper that watches its parent: when the parent is gone
  (``os.getppid()`` changes) it sends itself SIGTERM (uvicorn's graceful stop) and exits for good
  after :data:`GRACE_S` seconds;
- ``stop`` runs with logging errors silenced, so a stop at interpreter exit prints no traceback.

Called by the command line (:mod:`cli.main`), the flows package and the test suite's conftest.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

SERVER_MODULE = "prefect.server.api.server"
#: where a temporary server keeps concurrency leases: files that outlive it (default: memory)
DISK_LEASES = "prefect.server.concurrency.lease_storage.filesystem"
GRACE_S = 10
# Runs as ``python -c WATCHDOG <parent pid> <uvicorn arguments>`` in place of ``python -m uvicorn``.
WATCHDOG = """\
import os, runpy, signal, sys, threading, time
parent = int(sys.argv.pop(1))
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
threading.Thread(target=watch, name="parent-watch", daemon=True).start()
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
""".replace("GRACE_S", str(GRACE_S))


def watched_args(args: Sequence[str]) -> list[str]:
    """``[python, -m, uvicorn, *rest]`` -> the same server under the parent watchdog."""
    args = list(args)
    if len(args) >= 3 and args[1:3] == ["-m", "uvicorn"]:
        return [args[0], "-c", WATCHDOG, str(os.getpid()), *args[3:]]
    return args


class _SubprocessWithWatchdog:
    """The ``subprocess`` module as the server module sees it: Popen wraps uvicorn's command."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(args, *rest, **kwargs):  # noqa: N802 (the name the server module calls)
        return subprocess.Popen(watched_args(args), *rest, **kwargs)


def _patch(module: ModuleType) -> None:
    if getattr(module, "_taas_watchdog", False):
        return
    module.subprocess = _SubprocessWithWatchdog()
    server = module.SubprocessASGIServer
    original_stop = server.stop

    def stop(self) -> None:
        previous = logging.raiseExceptions
        # At interpreter exit the log stream may already be closed; the stop still happens.
        logging.raiseExceptions = False
        try:
            original_stop(self)
        finally:
            logging.raiseExceptions = previous

    server.stop = stop
    module._taas_watchdog = True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != SERVER_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec without finding ourselves again
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            loader_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Makes every temporary Prefect server this process starts die with it, keeping its
    concurrency leases on disk under PREFECT_HOME so a dead run's slots can be reclaimed
    (see :mod:`tasks.slots`; idempotent)."""
    os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", DISK_LEASES)
    if SERVER_MODULE in sys.modules:
        _patch(sys.modules[SERVER_MODULE])
        return
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
