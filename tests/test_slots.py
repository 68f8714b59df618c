"""Training slots heal in the embedded default: a dead holder's expired lease is reclaimed.

Prefect's temporary API runs no repossessor, so before :mod:`tasks.slots` a run killed while it
held training slots left them taken in the home's database and the next run waited forever.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client

from infra.prefect_server import DISK_LEASES
from tasks.slots import POLL_S, ensure_limit, held_slots, reclaim_expired_leases


def _active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def _orphan_lease(name: str, slots: int) -> str:
    """Takes ``slots`` under a lease nobody renews, as a run killed mid-line leaves them. The
    lease is long so that it cannot expire by itself (and be reclaimed by another waiter) on a
    slow machine before :func:`_expire` ends it."""
    with get_client(sync_client=True) as client:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=slots, mode="concurrency", lease_duration=3600
        )
    return response.json()["lease_id"]


def _expire(lease_id: str) -> None:
    """Moves the lease's expiry into the past, as a minute without renewals would."""
    folder = Path(os.environ["PREFECT_HOME"]) / "concurrency_leases"
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    lease_file = folder / f"{lease_id}.json"
    lease = json.loads(lease_file.read_text())
    lease_file.write_text(json.dumps({**lease, "expiration": past}))
    index = folder / "expirations.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), lease_id: past}))


def test_the_temporary_api_keeps_leases_on_disk():
    assert os.environ["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == DISK_LEASES


def test_a_dead_holders_slots_come_back_to_the_next_line():
    name = f"test-slots-{uuid.uuid4().hex[:8]}"

    @flow
    def orphan() -> str:
        ensure_limit(name, 2)
        return _orphan_lease(name, 2)

    lease_id = orphan()

    @flow
    def check_taken() -> tuple[int, int]:
        return _active_slots(name), reclaim_expired_leases()

    taken, released = check_taken()
    assert (taken, released) == (2, 0)  # a live (unexpired) lease is never taken away
    _expire(lease_id)
    trained: list[int] = []

    @flow
    def next_line() -> int:
        with held_slots(name, 2):
            trained.append(_active_slots(name))
        return _active_slots(name)

    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(next_line()), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done == [0]  # the slots were free again after the line
    assert trained == [2]  # the line held both slots while it ran


def test_a_waiting_line_takes_a_freed_slot_within_a_poll():
    """A refused line asks again every POLL_S, where Prefect would sleep out the server's
    Retry-After (it grows with each refusal: 2-3 s after an 8 s wait, measured)."""
    name = f"test-slots-{uuid.uuid4().hex[:8]}"

    @flow
    def hand_over() -> float:
        ensure_limit(name, 1)
        took: list[float] = []

        def waiter() -> None:
            with held_slots(name, 1):
                took.append(time.monotonic())

        with held_slots(name, 1):
            thread = threading.Thread(target=waiter, daemon=True)
            thread.start()
            time.sleep(8)
            freed = time.monotonic()
        thread.join(timeout=60)
        return took[0] - freed

    assert 0 <= hand_over() < POLL_S + 0.5
