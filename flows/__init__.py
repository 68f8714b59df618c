"""Prefect flows: commission, cycle, retrain. Importing the package makes every temporary
Prefect API server this process starts die with it (:mod:`infra.prefect_server`)."""

from infra.prefect_server import install as _install_server_watchdog

_install_server_watchdog()
