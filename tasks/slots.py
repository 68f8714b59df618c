"""Training slots: Prefect global concurrency limits that production lines hold while they train.

A line occupies as many slots as it has processes, so the lines of every commission and cycle on
one Prefect server share the machines' process slots. A slot is held under a lease the holder
renews in the background (:data:`LEASE_S`); a holder that dies stops renewing, its lease expires
and a Prefect server's repossessor gives the slots back.

The embedded default has no such server: each command starts Prefect's temporary API, which
runs no background services and by default keeps leases in its own memory, so a run killed
while it held slots left them taken for good in the home's database (the next run waited
forever). Two changes make the embedded default heal itself:

- the temporary API keeps its leases on disk under ``PREFECT_HOME`` (set by
  :func:`infra.prefect_server.install`), so they outlive the server that granted them;
- a line that waits for slots releases every expired lease it finds there each
  :data:`WAIT_S` seconds (:func:`reclaim_expired_leases`), through the API, as the
  repossessor would.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from infra.atomic import file_lock
from infra.prefect_server import DISK_LEASES

#: the global concurrency limit every local production line takes its processes' slots from
TRAIN_SLOTS = "taas-train-slots"
#: lease of a held slot, renewed in the background; the server's minimum is 60 s
LEASE_S = 60.0
#: how often a line waiting for slots looks for expired leases
WAIT_S = 20.0
#: how often a line waiting for slots asks for them again
POLL_S = 1.0
#: how often a line waiting for its machine's slots tries them again
MACHINE_POLL_S = 0.1


def ensure_limit(name: str, slots: int) -> int:
    """Creates the global concurrency limit ``name`` with ``slots`` when absent (ops may have
    sized it on the server already: that one is kept); returns the limit in force."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots)
            )
        except ObjectAlreadyExists:  # another cycle created it meanwhile: theirs holds
            pass
        return client.read_global_concurrency_limit_by_name(name).limit


def reclaim_expired_leases() -> int:
    """Releases the slots of every expired lease of the temporary API; returns how many.

    Only for the embedded default (no ``PREFECT_API_URL``): a Prefect server reclaims its own.
    """
    if (
        os.environ.get("PREFECT_API_URL")
        or os.environ.get("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE") != DISK_LEASES
    ):
        return 0
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

    storage = ConcurrencyLeaseStorage()  # the same folder the temporary API writes
    expired = anyio.run(storage.read_expired_lease_ids)
    released = 0
    with get_client(sync_client=True) as client:
        for lease_id in expired:
            try:
                client.release_concurrency_slots_with_lease(lease_id)
                released += 1
            except ObjectNotFound:  # gone meanwhile (released by its holder or another waiter)
                anyio.run(storage.revoke_lease, lease_id)
    return released


class _QuietRefusals(logging.Filter):
    """Prefect logs an ERROR for every acquisition the server refuses; here a refusal is only
    one try of a wait (:func:`held_slots` asks again), so it is dropped. Any other failure
    still reaches the caller as an exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("SlotAcquisition" in message and "PrefectHTTPStatusError" in message)


logging.getLogger("prefect._internal.concurrency").addFilter(_QuietRefusals())


def _refused(exc: Exception) -> bool:
    """Whether an acquisition failed because the slots are taken (HTTP 423 from the server)."""
    cause = exc.__cause__
    return getattr(getattr(cause, "response", None), "status_code", None) == 423


@contextmanager
def held_slots(name: str, occupy: int) -> Iterator[None]:
    """Holds ``occupy`` slots of ``name`` for the body; waits, reclaiming expired leases.

    A refused try is made again after :data:`POLL_S`, not after the server's Retry-After (up to
    the limit's mean occupancy, 30 s at most, which Prefect would sleep in full): a line that
    waits is an idle machine, so it must start the moment a slot frees.
    """
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency

    reclaimed = float("-inf")
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(
                    concurrency(
                        name, occupy=occupy, strict=True, max_retries=0, lease_duration=LEASE_S
                    )
                )
                break
            except ConcurrencySlotAcquisitionError as exc:
                if not _refused(exc):
                    raise
            # still taken: by live holders, or by leases that expired
            if time.monotonic() - reclaimed >= WAIT_S:
                reclaim_expired_leases()
                reclaimed = time.monotonic()
            time.sleep(POLL_S)
        yield


def machine_folder(home: Path) -> Path:
    """The machine's slot locks (and the lock its line runs start under) in its TAAS_HOME."""
    return Path(home) / "line-slots"


@contextmanager
def held_machine_slots(folder: Path, slots: int, occupy: int) -> Iterator[None]:
    """Holds ``occupy`` of this machine's ``slots`` process slots for the body; waits for them.

    The slots are ``flock``s on the files ``slot-<i>`` in ``folder``, so every process of the
    machine that uses the same folder (:func:`machine_folder`) shares them. Why not a Prefect
    limit per machine: each try there is a call to the shared server (:func:`held_slots` asks
    every :data:`POLL_S`), and a dead holder's slots stay taken until its lease expires; a
    lock here is tried again every :data:`MACHINE_POLL_S` without leaving the machine, and
    the kernel releases it the moment its holder dies. A ``gate`` lock makes taking several
    slots one step, so two waiters never hold half of what each needs.
    """
    if not 1 <= occupy <= slots:
        raise ValueError(
            f"line_machine_slots: a line of {occupy} processes never fits in this machine's "
            f"{slots} slots"
        )
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        with file_lock(folder / "gate"):
            held = _take_slots(folder, slots, occupy)
        if held:
            break
        time.sleep(MACHINE_POLL_S)
    try:
        yield
    finally:
        _release(held)


def _take_slots(folder: Path, slots: int, occupy: int) -> list:
    """``occupy`` locked slot files, or none (all released) when fewer are free."""
    held = []
    for index in range(slots):
        handle = open(folder / f"slot-{index}", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        held.append(handle)
        if len(held) == occupy:
            return held
    _release(held)
    return []


def _release(held: list) -> None:
    for handle in held:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
