"""Workers end to end: real Redis broker, real Dramatiq workers, real PostgreSQL.

What a user notices: counts converge to the truth soon after writes stop, a burst of writes
costs a handful of messages, and nothing is lost when Redis drops out, a worker is killed, or a
message is malformed.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest
from django.db import connection, connections, transaction
from django.test import override_settings

from counts.models import DirtyMark
from project.monitoring.models import (
    Deployment,
    Detection,
    Project,
    SourceImage,
    SourceImageCollection,
)
from tests import worker_harness as wh
from tests.truth import assert_all_counts_exact, drain_all, mismatches
from workers import redis_client as workers_redis
from workers.actors import drain_backlog, recompute_pending, reconcile_counts
from workers.schedule import sweep

pytestmark = [pytest.mark.django_db(transaction=True)]

ITEMS = "item:monitoring.sourceimage"
#: A membership write also announces the occurrences on the capture, which reach its sets.
OCCURRENCES = "item:monitoring.occurrence"
COLLECTION = "monitoring.sourceimagecollection"
Through = SourceImageCollection.images.through


@pytest.fixture(autouse=True)
def clean_slate():
    wh.reset_redis()
    DirtyMark.objects.all().delete()
    yield
    wh.reset_redis()


@pytest.fixture
def counter():
    with wh.counting_messages() as counting:
        yield counting


def make_sets(n_sets: int, n_images: int):
    now = datetime.now(UTC)
    project = Project.objects.create(name="p")
    station = Deployment.objects.create(project=project, name="station")
    images = SourceImage.objects.bulk_create(
        SourceImage(deployment=station, timestamp=now, path=f"img/{i}.jpg") for i in range(n_images)
    )
    Detection.objects.bulk_create(
        Detection(source_image=img, bbox=None if i % 3 else [1, 2, 3, 4])
        for i, img in enumerate(images[: n_images // 2])
    )
    sets = SourceImageCollection.objects.bulk_create(
        SourceImageCollection(project=project, name=f"set {i}") for i in range(n_sets)
    )
    drain_all()
    wh.reset_redis()  # the set-up's own messages are not part of what a test measures
    return images, sets


def converged() -> bool:
    """Counts exact and nothing left to do."""
    return wh.settled() and not mismatches()


@override_settings(COUNTS_DEBOUNCE_MS=1000)
def test_burst_of_10000_single_row_writes_sends_a_handful_of_messages(counter):
    images, sets = make_sets(n_sets=50, n_images=200)
    counter.clear()
    # A thread per label a membership write announces (the set, the capture and the occurrences
    # on it, as items): a label whose drainer cannot start while the others linger sees its
    # message go overdue, and its writers send another (the Procfile's worker has four threads).
    with wh.running_worker(threads=3):
        started = time.monotonic()
        for i in range(10_000):
            Through.objects.create(
                sourceimagecollection_id=sets[i % 50].pk, sourceimage_id=images[i // 50].pk
            )
        last_commit = time.monotonic()
        exact = wh.wait_until(
            lambda: not DirtyMark.objects.exists() and not mismatches(), timeout=60
        )
        settled = wh.wait_until(converged, timeout=60) + exact
    sent = counter.sent["recompute_pending"] + counter.sent["drain_backlog"]
    print(
        f"\n[burst] 10000 writes in {last_commit - started:.1f}s; {sent} messages"
        f" ({dict(counter.sent)}, by model {dict(counter.by_label)}); exact {exact:.2f}s after"
        " the last commit,"
        f" worker idle after {settled:.2f}s"
    )
    # One per label a membership write announces, when the drainer of each stays for the whole
    # burst (measured: 3). The occurrences' drainer takes marks that name no occurrence (these
    # captures have none): consuming them is progress, not idleness, or it would end and be
    # sent for again while the burst goes on (it was, 3 or 4 times). On a loaded machine a
    # drainer may start after its message's due time, and a message overdue is sent again (a
    # lost message must not strand marks): at most once more per label (measured beside a
    # benchmark and two other test runs: 6, two per label).
    assert max(counter.by_label.values()) <= 2, dict(counter.by_label)
    assert 1 <= sent <= 2 * len(counter.by_label), (
        f"a burst should cost a handful of messages, sent {dict(counter.by_label)}"
    )
    assert SourceImageCollection.objects.filter(source_images_count=200).count() == 50
    assert_all_counts_exact()


def test_two_workers_and_concurrent_writers_converge_exactly():
    images, sets = make_sets(n_sets=10, n_images=120)
    errors = []

    def writer(offset: int) -> None:
        try:
            for i in range(150):
                img = images[(offset * 53 + i * 7) % len(images)]
                target = sets[(offset + i) % len(sets)]
                if i % 4 == 0:
                    target.images.add(img)
                elif i % 4 == 1:
                    Detection.objects.create(source_image=img, bbox=[0, 0, i, i])
                elif i % 4 == 2:
                    moved = Detection.objects.filter(source_image=img).first()
                    if moved:
                        moved.source_image = images[(i * 11) % len(images)]
                        moved.save()
                else:
                    img.collections.remove(sets[(offset + i + 1) % len(sets)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    with (
        override_settings(COUNTS_DEBOUNCE_MS=100),
        wh.running_worker(threads=2),
        wh.running_worker(threads=2),
    ):
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wh.wait_until(converged, timeout=60)
    assert not errors
    assert_all_counts_exact()


def test_redis_down_during_writes_commits_logs_once_and_converges_after(caplog):
    images, sets = make_sets(n_sets=2, n_images=10)
    workers_redis.reset()
    try:
        with override_settings(REDIS_URL="redis://127.0.0.1:1/0"), caplog.at_level(logging.ERROR):
            for img in images[:5]:
                sets[0].images.add(img)
        errors = [r for r in caplog.records if r.name == "workers.hooks"]
    finally:
        workers_redis.reset()
    assert sets[0].images.count() == 5, "the writes committed although Redis was down"
    assert len(errors) == 1, "one log line per outage, not one per write"
    assert DirtyMark.objects.filter(target=COLLECTION).exists(), "the marks are durable"
    with override_settings(COUNTS_DEBOUNCE_MS=100), wh.running_worker():
        # The sets' own counts, and the captures as items (the sets' "with detections").
        assert sorted(sweep()) == [OCCURRENCES, ITEMS, COLLECTION]
        wh.wait_until(converged, timeout=30)
    sets[0].refresh_from_db()
    assert sets[0].source_images_count == 5


def raw_connection() -> psycopg.Connection:
    """A plain psycopg connection to the test database: a client Django knows nothing of."""
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"], dbname=db["NAME"]
    )


def test_raw_sql_through_djangos_cursor_gets_its_message_at_commit():
    images, sets = make_sets(n_sets=1, n_images=3)
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_sourceimagecollection_images"
            " (sourceimagecollection_id, sourceimage_id) VALUES (%s, %s)",
            [sets[0].pk, images[0].pk],
        )
    # One for the set's own count, one for the capture as an item, one for its occurrences.
    assert wh.queued_messages() == 3
    assert sweep() == [], "messages are already on their way: the sweep sends no more"


def test_raw_sql_from_another_client_gets_its_message_from_the_sweep():
    images, sets = make_sets(n_sets=1, n_images=3)
    with raw_connection() as other:
        other.execute(
            "INSERT INTO monitoring_sourceimagecollection_images"
            " (sourceimagecollection_id, sourceimage_id) VALUES (%s, %s), (%s, %s)",
            [sets[0].pk, images[0].pk, sets[0].pk, images[1].pk],
        )
    assert wh.queued_messages() == 0
    with override_settings(COUNTS_DEBOUNCE_MS=100), wh.running_worker():
        assert sorted(sweep()) == [OCCURRENCES, ITEMS, COLLECTION]
        assert sweep() == [], "messages are already on their way: no more"
        wh.wait_until(converged, timeout=30)
    sets[0].refresh_from_db()
    assert sets[0].source_images_count == 2


def test_malformed_messages_are_logged_and_dead_lettered_not_retried(caplog, counter):
    bad = [
        (recompute_pending, (42, None), {}),
        (recompute_pending, ("countdown:elsewhere:key", "token"), {}),
        (recompute_pending, ("k",), {"token": "t", "extra": 1}),
        (drain_backlog, (), {"label": "nope.model"}),
        (reconcile_counts, ("surprise",), {}),
    ]
    with caplog.at_level(logging.ERROR, logger="workers.drain"), wh.running_worker():
        for actor, args, kwargs in bad:
            actor.send_with_options(args=args, kwargs=kwargs)
        wh.wait_until(lambda: wh.dead_letters() == len(bad), timeout=20)
        wh.wait_until(lambda: wh.queued_messages() == 0, timeout=20)
    logged = [r for r in caplog.records if "dead-lettering malformed message" in r.getMessage()]
    assert len(logged) == len(bad)
    assert sum(counter.sent.values()) == len(bad)
    assert not counter.retries, "malformed messages are never retried"


@override_settings(COUNTS_LOCK_TIMEOUT_MS=200, COUNTS_DEBOUNCE_MS=50)
def test_database_error_in_a_batch_is_retried_with_backoff_and_keeps_marks(counter):
    images, sets = make_sets(n_sets=1, n_images=4)
    blocker = raw_connection()
    try:
        # A drain skips rows someone holds; a table lock (a migration, a LOCK TABLE) it waits
        # for, until its lock timeout makes the batch fail.
        blocker.execute("LOCK TABLE monitoring_detection IN ACCESS EXCLUSIVE MODE")
        with wh.running_worker():
            sets[0].images.add(*images)
            wh.wait_until(lambda: counter.retries["recompute_pending"] >= 1, timeout=20)
            # The sets' own counts need no detection; the captures, as items, do.
            assert DirtyMark.objects.filter(target=ITEMS).exists(), "failed batch kept marks"
            blocker.rollback()
            wh.wait_until(converged, timeout=30)
    finally:
        blocker.close()
    sets[0].refresh_from_db()
    assert sets[0].source_images_count == 4


@pytest.mark.slow
def test_worker_killed_mid_batch_loses_no_mark_and_counts_converge_after_restart(tmp_path):
    images, sets = make_sets(n_sets=1, n_images=6)
    env = wh.worker_subprocess_env(
        COUNTS_DEBOUNCE_MS="50", COUNTS_DRAINING_TTL_MS="1000", COUNTS_LOCK_TIMEOUT_MS="120000"
    )
    blocker = raw_connection()
    worker = wh.start_rundramatiq(env, tmp_path / "worker1.log")
    try:
        # Holds the drain inside its batch: the aggregate reads detections.
        blocker.execute("LOCK TABLE monitoring_detection IN ACCESS EXCLUSIVE MODE")
        with transaction.atomic():
            sets[0].images.add(*images)
        marks_before = DirtyMark.objects.count()

        def worker_waits_on_our_lock():
            """the worker has taken the marks and waits to read detections"""
            with connection.cursor() as cursor:
                # A capture's truth, or the occurrences a membership's link job reaches.
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND (query LIKE %s OR query LIKE %s)",
                    ["WITH truth AS%", 'SELECT r."id" FROM "monitoring_occurrence" r%'],
                )
                return cursor.fetchone()[0] > 0

        wh.wait_until(worker_waits_on_our_lock, timeout=60)
        wh.kill_group(worker)
        blocker.rollback()
        wh.wait_until(lambda: not worker_waits_on_our_lock(), timeout=30)
        time.sleep(0.2)
        assert DirtyMark.objects.count() == marks_before, "the killed batch rolled back its marks"
        worker = wh.start_rundramatiq(env, tmp_path / "worker2.log")
        with override_settings(COUNTS_DRAINING_TTL_MS=1000):
            wh.wait_until(lambda: sweep() or not DirtyMark.objects.exists(), timeout=30)

        # The killed worker's messages stay unacknowledged until the broker's heartbeat timeout
        # hands them to a live worker; the counts must not wait for that. The scheduler sweeps
        # every few seconds: each model (or item kind) left waiting gets a message of its own.
        def swept_and_exact() -> bool:
            sweep()
            return not DirtyMark.objects.exists() and not mismatches()

        wh.wait_until(swept_and_exact, timeout=60)
    finally:
        wh.kill_group(worker)
        blocker.close()
    sets[0].refresh_from_db()
    assert sets[0].source_images_count == 6
    assert_all_counts_exact()


@override_settings(COUNTS_DRAIN_BUDGET_S=0, COUNTS_DRAIN_BATCH=2, COUNTS_DEBOUNCE_MS=50)
def test_a_drain_past_its_time_budget_hands_over_to_a_fresh_message(counter):
    images, sets = make_sets(n_sets=6, n_images=3)
    with wh.running_worker(threads=1):
        for s in sets:
            s.images.add(images[0])
        wh.wait_until(converged, timeout=30)
    assert counter.sent["recompute_pending"] >= 2, "each batch past the budget sends a successor"
    assert not counter.retries, "handing over is not a failure"
    assert_all_counts_exact()
