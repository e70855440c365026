"""The scheduler process: one leader, sweeps that survive Redis or PostgreSQL dropping out."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

import pytest
from django.db import connections
from django.test import override_settings
from django.utils import timezone
from dramatiq.common import dq_name

from counts.models import DirtyMark
from tests import worker_harness as wh
from workers import debounce
from workers import redis_client as workers_redis
from workers.schedule import Lease, Scheduler, sweep

COLLECTION = "monitoring.sourceimagecollection"


@pytest.fixture(autouse=True)
def clean_slate(request):
    wh.reset_redis()
    if "django_db" in {m.name for m in request.node.iter_markers()}:
        DirtyMark.objects.all().delete()  # transactional tests' TRUNCATE leaves "every row" marks
    yield
    wh.reset_redis()


@pytest.fixture
def closed_redis():
    """Point the workers' Redis client at a port nothing listens on."""
    workers_redis.reset()
    with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
        yield
    workers_redis.reset()


def test_only_one_scheduler_leads_until_its_lease_lapses():
    first, second = Lease(ttl_ms=300), Lease(ttl_ms=300)
    assert first.acquire()
    assert first.acquire(), "the leader renews its own lease"
    assert not second.acquire()
    time.sleep(0.4)
    assert second.acquire(), "a dead leader's lease lapses and a spare takes over"
    assert not first.acquire()


@pytest.mark.django_db
def test_sweep_waits_for_marks_of_held_rows_to_come_due():
    """A drain marks a row someone holds again, due a second later: no message before then."""
    held = DirtyMark.objects.create(
        target=COLLECTION, ids=[1], not_before=timezone.now() + timedelta(hours=1)
    )
    assert sweep() == []
    assert wh.queued_messages() == 0
    DirtyMark.objects.filter(pk=held.pk).update(not_before=timezone.now() - timedelta(hours=1))
    assert sweep() == [COLLECTION]


@pytest.mark.django_db
def test_sweep_sends_for_marks_with_no_message_and_leaves_scheduled_ones_alone():
    assert sweep() == []
    DirtyMark.objects.create(target=COLLECTION, ids=[1])
    assert sweep() == [COLLECTION]
    assert debounce.is_scheduled(COLLECTION)
    assert sweep() == []
    assert wh.queued_messages() == 1


@pytest.mark.django_db
def test_sweep_leaves_a_live_drainer_alone_but_not_a_dead_ones_stale_marks():
    DirtyMark.objects.create(target=COLLECTION, ids=[1])
    debounce.hold_draining(COLLECTION)
    assert sweep() == [], "a drainer is at work and the mark is fresh"
    DirtyMark.objects.update(created_at="2000-01-01T00:00Z")
    assert sweep() == [COLLECTION], "a mark older than the drainer flag's life is stale"


@pytest.mark.django_db
def test_sweep_survives_redis_being_down(closed_redis, caplog):
    DirtyMark.objects.create(target=COLLECTION, ids=[1])
    scheduler = Scheduler()
    with caplog.at_level(logging.WARNING, logger="workers.outages"):
        scheduler.run_sweep()
        scheduler.run_reconcile()
    assert caplog.messages[0].startswith("redis at 127.0.0.1:1 unavailable")
    assert len(caplog.messages) == 1, "one line for the outage, not one per job"
    assert DirtyMark.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_sweep_survives_postgresql_being_down_and_recovers(caplog):
    DirtyMark.objects.create(target=COLLECTION, ids=[1])
    scheduler = Scheduler()
    outcome = {}

    def sweep_in_a_thread_whose_database_is_unreachable():
        conn = connections["default"]
        conn.settings_dict = {**conn.settings_dict, "PORT": "1"}
        try:
            scheduler.run_sweep()
            outcome["raised"] = False
        except Exception:  # pragma: no cover - the assertion below reports it
            outcome["raised"] = True
        finally:
            conn.close()

    with caplog.at_level(logging.ERROR, logger="workers.outages"):
        thread = threading.Thread(target=sweep_in_a_thread_whose_database_is_unreachable)
        thread.start()
        thread.join()
    assert outcome == {"raised": False}
    assert "postgresql at 127.0.0.1" in caplog.text and "unavailable" in caplog.text
    assert "Traceback" not in caplog.text
    assert not debounce.is_scheduled(COLLECTION)
    scheduler.run_sweep()
    assert debounce.is_scheduled(COLLECTION), "the next sweep, with the database back, sends"


def _age_marks(seconds: float) -> None:
    DirtyMark.objects.update(created_at=timezone.now() - timedelta(seconds=seconds))


def _queued_actors() -> list[str]:
    """Actor names of the messages waiting in the counts queue, unfetched."""
    import json

    broker = wh.broker()
    r, ns = broker.client, broker.namespace
    ids = r.lrange(f"{ns}:counts", 0, -1)
    return sorted(json.loads(r.hget(f"{ns}:counts.msgs", i))["actor_name"] for i in ids)


@pytest.mark.django_db(transaction=True)  # the sweep's now() moves on
@override_settings(COUNTS_RESCUE_AFTER_S=1)
def test_sweep_rescues_marks_whose_message_a_live_worker_fetched_and_never_runs(caplog):
    """Issue 27, case 1: a fetch Redis ran after a stall, whose reply the worker never read."""
    DirtyMark.objects.create(target=COLLECTION, ids=[1])
    assert sweep() == [COLLECTION], "fresh marks with nothing coming get a message at once"
    consumer = wh.broker().consume(dq_name("counts"), prefetch=1, timeout=100)
    fetched = next(m for m in consumer if m is not None)  # in a live "worker"'s ack set, never run
    assert fetched.actor_name == "recompute_pending"
    assert sweep() == [], "a fresh mark whose message a live worker holds waits for it"
    time.sleep(1.1)
    with caplog.at_level(logging.WARNING, logger="workers.schedule"):
        assert sweep() == [COLLECTION], "after COUNTS_RESCUE_AFTER_S the broker is not trusted"
        assert sweep() == [], "no second rescue while the first waits unfetched in the queue"
    assert _queued_actors() == ["rescue_drain"]
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert fetched.message_id in line and "live worker" in line and COLLECTION in line
    consumer.close()


@pytest.mark.django_db
def test_sweep_rescues_marks_behind_a_debounce_key_taken_back_for_a_retry():
    """Issue 27, case 4: the key a failed drain took back for its retry lives 90 s; the worker
    holding that retry was killed. The key must not hold the marks back."""
    DirtyMark.objects.create(target=COLLECTION, ids=[1])
    assert debounce.reclaim(debounce.debounce_key(COLLECTION), "retry.0", 90_000)
    assert sweep() == [], "fresh marks behind a key wait for its message"
    _age_marks(4)
    assert sweep() == [COLLECTION]
    assert _queued_actors() == ["rescue_drain"]


@pytest.mark.django_db
def test_sweep_leaves_a_drainer_at_work_alone_for_a_drain_budget_then_rescues():
    DirtyMark.objects.create(target=COLLECTION, ids=[1])
    _age_marks(10)
    debounce.hold_draining(COLLECTION)  # a drainer looked just now: it will take them
    assert debounce.working([COLLECTION, "monitoring.event"]) == {COLLECTION}
    with override_settings(COUNTS_DRAINING_TTL_MS=60_000):
        assert sweep() == []
        _age_marks(30)  # more than COUNTS_RESCUE_AFTER_S + COUNTS_DRAIN_BUDGET_S
        assert sweep() == [COLLECTION], "looking, yet not getting to them for a whole budget"


@pytest.mark.django_db
def test_sweep_rescues_every_stuck_model_once_per_sweep_at_most(settings):
    for label in (COLLECTION, "monitoring.event", "monitoring.deployment"):
        DirtyMark.objects.create(target=label, ids=[1])
    _age_marks(60)
    assert sorted(sweep()) == sorted([COLLECTION, "monitoring.event", "monitoring.deployment"])
    assert _queued_actors() == ["rescue_drain"] * 3
    for _ in range(3):
        assert sweep() == [], "nothing more while the rescues wait unfetched"
