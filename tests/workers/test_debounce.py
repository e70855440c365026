"""The write path's Redis calls: a writer pays one only when no message or drainer is known to
be coming for its marks, and no write is ever left for the sweep by trusting one.

Real Redis, real broker, real workers. The calls are counted as this process sends them (every
``EVAL`` its Redis clients issue, pipelined or not), not from Redis's own command statistics:
those are the whole server's, and any other client of it (a second test run, the demo's
workers) made them wrong.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from django.test import override_settings

from counts.models import DirtyMark
from tests import worker_harness as wh
from tests.truth import assert_all_counts_exact, mismatches
from tests.workers.test_actors import (  # noqa: F401  (clean_slate: the same autouse reset)
    COLLECTION,
    ITEMS,
    Through,
    clean_slate,
    make_sets,
)
from workers import debounce

pytestmark = [pytest.mark.django_db(transaction=True)]

WINDOW_MS = 400
#: Labels a membership insert announces (the capture set, the capture as an item, and the
#: occurrences on the capture, which reach the set through it): one EVAL each when a writer
#: asks.
ANNOUNCED = [COLLECTION, ITEMS, "item:monitoring.occurrence"]
LABELS = len(ANNOUNCED)


_sent = {"EVAL": 0}
_counting = threading.Lock()


@pytest.fixture(autouse=True)
def count_evals(monkeypatch):
    """Count the ``EVAL`` commands this process's Redis clients send, from any thread."""

    def counted(original):
        def execute_command(self, *args, **kwargs):
            if args and args[0] == "EVAL":
                with _counting:
                    _sent["EVAL"] += 1
            return original(self, *args, **kwargs)

        return execute_command

    for cls in (redis.Redis, redis.client.Pipeline):
        monkeypatch.setattr(cls, "execute_command", counted(cls.execute_command))


def evals() -> int:
    """EVAL commands this process has sent so far: one per label a writer asked a message for
    (and one per key a drainer of this process released)."""
    return _sent["EVAL"]


def add_members(sets, images, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        Through.objects.create(
            sourceimagecollection_id=sets[i % len(sets)].pk,
            sourceimage_id=images[i // len(sets)].pk,
        )


@override_settings(COUNTS_DEBOUNCE_MS=WINDOW_MS)
def test_a_writer_rides_on_a_message_another_process_sent():
    images, sets = make_sets(n_sets=5, n_images=40)
    assert debounce.request(ANNOUNCED) == sorted(ANNOUNCED)
    debounce.forget()  # from here on, this process did not send it
    before = evals()
    add_members(sets, images, 20)
    assert evals() - before == LABELS, "the first writer learns when the message is due; no more"
    assert wh.queued_messages() == LABELS, "no second message"
    time.sleep(WINDOW_MS / 1000)  # past the due time: the message may be taken any moment
    before = evals()
    add_members(sets, images, 3, start=20)
    assert evals() - before == 3 * LABELS, "an overdue message buys no trust: each writer asks"


@override_settings(COUNTS_DEBOUNCE_MS=WINDOW_MS)
def test_a_writer_rides_on_a_drainer_until_its_promise_and_the_drainer_keeps_it():
    images, sets = make_sets(n_sets=5, n_images=40)
    # The promise is kept in whole milliseconds from the time it is made: no earlier than this.
    promised = time.time() - 0.001 + WINDOW_MS / 1000
    for label in ANNOUNCED:
        debounce.hold_draining(label, promise_ms=WINDOW_MS)  # a drainer (this thread plays it)
    before = evals()
    add_members(sets, images, 20)
    assert evals() - before == LABELS, "the first writer reads the drainer's promise; no more"
    assert wh.queued_messages() == 0, "the drainer is there: no message"
    for label in ANNOUNCED:
        debounce.drop_draining(label)
    assert time.time() >= promised, "the flag stays until the promise is due"
    assert not debounce.is_draining(COLLECTION)


@override_settings(COUNTS_DEBOUNCE_MS=WINDOW_MS)
def test_a_drainer_that_does_not_linger_promises_nothing():
    images, sets = make_sets(n_sets=5, n_images=40)
    for label in ANNOUNCED:
        debounce.hold_draining(label)
    before = evals()
    add_members(sets, images, 5)
    assert evals() - before == 5 * LABELS
    started = time.monotonic()
    debounce.drop_draining(COLLECTION)
    assert time.monotonic() - started < 0.05


@override_settings(COUNTS_DEBOUNCE_MS=WINDOW_MS)
def test_a_trickle_across_many_windows_converges_without_the_sweep_and_few_calls():
    """Writes every 20 ms for 4 s, while a worker drains, lingers and hands over: each window
    boundary (a message due, a drainer's promise ending) is crossed many times. No scheduler
    runs, so a write left behind by misplaced trust would never be drained."""
    images, sets = make_sets(n_sets=10, n_images=200)
    before = evals()
    writes = 0
    # A thread per label a write announces: each drainer lingers on its label, and a label
    # whose message waits behind the others' lingering is overdue, so its writers ask again.
    # (The Procfile's worker has four.)
    with wh.running_worker(threads=LABELS):
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            add_members(sets, images, 1, start=writes)
            writes += 1
            time.sleep(0.02)
        wh.wait_until(lambda: not DirtyMark.objects.exists() and not mismatches(), timeout=30)
    calls = evals() - before
    print(f"\n[trickle] {writes} writes, {calls} write-path Redis calls")
    asks = calls / LABELS  # a few EVALs are the worker releasing keys: counted against us
    assert asks < writes / 4, f"{calls} calls for {writes} writes"
    assert sum(s.images.count() for s in sets) == writes
    assert_all_counts_exact()
