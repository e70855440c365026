"""``/metrics`` after real work: writes, a real worker draining, a reconcile repairing drift.

The counters live in Redis (``workers.metrics``), so what a worker thread records is what the
web's scrape reads; the scrape is parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import time
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

import counts
from project.monitoring.models import Detection
from tests import worker_harness as wh
from tests.conftest import build_world
from tests.truth import assert_all_counts_exact
from workers import redis_client as workers_redis
from workers.actors import reconcile_counts

S, C = "monitoring.sourceimage", "monitoring.sourceimagecollection"


@pytest.fixture(autouse=True)
def clean_slate():
    workers_redis.reset()  # an earlier test's outage may have left a breaker open
    wh.reset_redis()
    yield
    wh.reset_redis()


def scrape(client) -> dict[tuple, float]:
    """``{(sample name, (label items...)): value}`` of one scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples, name: str) -> float:
    return sum(v for (n, _labels), v in samples.items() if n == name)


@pytest.mark.django_db(transaction=True)
def test_metrics_report_drains_messages_pending_marks_and_drift(client, marks):
    """``marks`` empties the queue: an earlier test's flush leaves every-row marks for every
    target, the test app's included, and no message for them."""
    before = scrape(client)
    assert total(before, "countdown_drain_batches_total") == 0
    assert value(before, "countdown_source_up", source="postgresql") == 1
    assert value(before, "countdown_source_up", source="redis") == 1

    world = build_world()  # commits: the write path sends debounced messages
    with wh.running_worker(threads=2):
        wh.wait_until(wh.settled, timeout=60)
    drained = scrape(client)
    batches = value(drained, "countdown_drain_batches_total")
    assert batches >= 1
    assert value(drained, "countdown_drain_seconds_count") == batches
    assert value(drained, "countdown_drain_seconds_bucket", le="+Inf") == batches
    assert 0 < value(drained, "countdown_drain_seconds_sum") < 60 * batches
    assert value(drained, "countdown_rows_recomputed_total", model=C) >= 2  # sets with images
    assert value(drained, "countdown_rows_changed_total", model=C) >= 2  # two sets have images
    assert value(drained, "countdown_messages_sent_total", actor="recompute_pending") >= 1
    assert value(drained, "countdown_dead_letters", queue="counts") == 0
    assert total(drained, "countdown_pending_marks") == 0

    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])  # no worker running now
    waiting = scrape(client)
    # One item mark: the capture is recomputed, its own count included.
    assert value(waiting, "countdown_pending_marks", model=f"item:{S}") == 1
    assert value(waiting, "countdown_pending_oldest_seconds", model=f"item:{S}") >= 0
    counts.drain()

    with connection.cursor() as cursor:  # drift the triggers cannot see
        cursor.execute("SET session_replication_role = replica")
        cursor.execute("DELETE FROM monitoring_detection WHERE id = %s", [world.det4.pk])
        cursor.execute("SET session_replication_role = DEFAULT")
    # A dry run repairs nothing and counts nothing; a migration's backfill is not drift either.
    call_command("counts", "reconcile", "--dry-run", stdout=StringIO(), stderr=StringIO())
    counts.reconcile()
    assert total(scrape(client), "countdown_reconcile_drift_total") == 0
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
        cursor.execute("DELETE FROM monitoring_detection WHERE id = %s", [world.det5.pk])
        cursor.execute("SET session_replication_role = DEFAULT")
    reconcile_counts.send()  # what the scheduler does, run by a real worker
    with wh.running_worker(threads=1):
        wh.wait_until(lambda: wh.queued_messages() == 0, timeout=60)
    reconciled = scrape(client)
    assert value(reconciled, "countdown_reconcile_runs_total") == 1
    assert (
        value(reconciled, "countdown_reconcile_drift_total", model=S, field="detections_count") == 1
    )
    assert value(reconciled, "countdown_reconcile_rows_checked_total", model=S) == 5
    assert_all_counts_exact()


def test_metrics_still_answer_when_redis_does_not(client, settings):
    from workers import redis_client as workers_redis

    workers_redis.reset()
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    try:
        samples = scrape(client)
    finally:
        workers_redis.reset()
    assert value(samples, "countdown_source_up", source="redis") == 0


@pytest.mark.django_db
def test_the_oldest_due_gauge_leaves_out_marks_that_wait_for_a_held_row(client):
    from datetime import timedelta

    from django.utils import timezone

    from counts.models import DirtyMark

    label = "monitoring.event"
    DirtyMark.objects.all().delete()  # transactional tests' TRUNCATEs leave "every row" marks
    DirtyMark.objects.create(target=label, ids=[1], not_before=timezone.now() + timedelta(hours=1))
    DirtyMark.objects.update(created_at=timezone.now() - timedelta(minutes=10))
    waiting = scrape(client)
    assert value(waiting, "countdown_pending_oldest_seconds", model=label) >= 590
    assert value(waiting, "countdown_pending_oldest_due_seconds", model=label) == 0
    DirtyMark.objects.create(
        target=label, ids=[2], created_at=timezone.now() - timedelta(seconds=90)
    )
    due = scrape(client)
    assert 85 <= value(due, "countdown_pending_oldest_due_seconds", model=label) < 600


@pytest.mark.django_db
def test_every_model_has_a_pending_series_even_at_zero(client):
    from counts.models import DirtyMark

    DirtyMark.objects.all().delete()
    samples = scrape(client)
    for label in (S, C, "monitoring.event", "monitoring.deployment", f"item:{S}"):
        assert value(samples, "countdown_pending_marks", model=label) == 0, label
        assert value(samples, "countdown_pending_oldest_due_seconds", model=label) == 0, label


@pytest.mark.django_db
def test_processes_are_reported_by_role_and_host_as_timestamps_not_by_pid(client):
    from workers import heartbeat

    for pid in (11, 12, 13):  # three restarts of a worker on one host
        heartbeat.beat(heartbeat.WORKER, f"host-a:{pid}")
    heartbeat.beat(heartbeat.SCHEDULER)
    samples = scrape(client)
    seen = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "countdown_process_last_seen_timestamp_seconds"
    }
    assert set(seen) == {
        (("host", "host-a"), ("role", "worker")),
        (("host", ""), ("role", "scheduler")),
    }, "one series per role and host, whatever the pids"
    assert all(abs(v - time.time()) < 30 for v in seen.values()), "Unix time, not an age"
    assert value(samples, "countdown_processes_live", role="worker") == 3
    assert value(samples, "countdown_processes_live", role="scheduler") == 1
    assert not [n for (n, _l) in samples if n == "countdown_process_last_seen_seconds"]


@pytest.mark.django_db
def test_requests_are_counted_and_timed_and_the_standard_collectors_answer(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/no-such-page").status_code == 404
    assert client.head("/api/v2/deployments/").status_code == 200
    samples = scrape(client)
    requests = "countdown_http_requests_total"
    assert value(samples, requests, method="GET", status="200") == 1
    assert value(samples, requests, method="GET", status="404") == 1
    assert value(samples, requests, method="HEAD", status="200") == 1
    assert value(samples, "countdown_http_request_seconds_count") == 3
    assert value(samples, "countdown_http_request_seconds_bucket", le="+Inf") == 3
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "python_info", **dict(python_labels(samples))) == 1


def python_labels(samples) -> tuple:
    (labels,) = [labels for (name, labels) in samples if name == "python_info"]
    return labels


@pytest.mark.django_db
def test_a_redis_outage_costs_one_request_a_timeout_not_every_request(client, settings):
    from workers import redis_client

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    redis_client.reset()
    try:
        started = time.monotonic()
        for _ in range(20):
            assert client.get("/healthz").status_code == 200
        assert time.monotonic() - started < 2
    finally:
        redis_client.reset()
