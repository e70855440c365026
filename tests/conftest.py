"""Shared fixtures: the real PostgreSQL (pytest-django, migrations applied) and real Redis.

The count triggers live in the database, installed by migrations, so every test that writes
runs against PostgreSQL with them in place. Fixtures here stay generic:

- ``marks``: read and clear ``counts_dirtymark`` (the engine's queue);
- ``world`` / ``make_world``: a small monitoring dataset with every relation in use, drained so
  its cached counts start exact and the queue starts empty.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from django.db import connection

from counts.base.mark import Kind, kind_of
from tests.engine_app.world import library  # noqa: F401  (the engine test app's dataset)
from tests.interleave import Harness

#: Stands for "every row" in :meth:`Marks.by_target` (a mark whose ``ids`` is NULL).
ALL = "ALL"


class Marks:
    """Read access to the dirty-mark queue, as the current connection sees it."""

    def __init__(self, conn=connection) -> None:
        self.conn = conn

    def rows(self) -> list[tuple[str, list[int] | None]]:
        """``(target, ids)`` of every mark, oldest first."""
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT target, ids FROM counts_dirtymark ORDER BY id")
            return [(target, ids) for target, ids in cursor.fetchall()]

    def by_target(self) -> dict[str, set[int] | str]:
        """``{label: ids}`` of the rows whose counts the waiting marks will change; :data:`ALL`
        when a mark covers every row.

        A recount mark names its rows; delta marks name the rows their amounts do not cancel
        out on; item marks ("capture 17 may count differently now") name the targets a drain
        would credit now, read without writing (``counts.run.items.preview``).
        """
        from collections import defaultdict

        from counts.apps import graph
        from counts.declare.jobs import jobs_by_key
        from counts.run.items import expand, preview
        from counts.run.routes import resolve

        kinds = graph().kinds
        merged: dict[str, set[int] | str] = {}
        amounts: dict = defaultdict(int)

        def add(target, ids):
            if ids is None or merged.get(target) == ALL:
                merged[target] = ALL
            else:
                merged.setdefault(target, set()).update(ids)

        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT target, ids, field, deltas, payload FROM counts_dirtymark ORDER BY id"
            )
            for target, ids, column, deltas, payload in cursor.fetchall():
                kind = kind_of(target, ids, column, deltas)
                if kind is Kind.JOB:
                    job = jobs_by_key(graph())[column]
                    preview(cursor, kinds[target], expand(cursor, job, list(ids), payload), amounts)
                elif kind is Kind.ITEM:
                    preview(cursor, kinds[target], list(ids), amounts)
                elif kind is Kind.ROUTE:
                    add(target, resolve(cursor, graph(), column, list(ids)) or [])
                elif kind is Kind.DELTA:
                    for target_id, amount in zip(ids, deltas, strict=True):
                        amounts[(target, column, target_id)] += amount
                else:  # a recount, or every row (or item) of its target
                    add(target, ids)
        for (label, _column, target_id), amount in amounts.items():
            if amount:
                add(label, [target_id])
        return merged

    def items(self) -> dict[str, set[int]]:
        """``{item kind: ids}`` of the item marks waiting."""
        merged: dict[str, set[int]] = {}
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT target, ids, field, deltas FROM counts_dirtymark ORDER BY id")
            for target, ids, column, deltas in cursor.fetchall():
                if kind_of(target, ids, column, deltas) in (Kind.ITEM, Kind.EVERY_ITEM):
                    merged.setdefault(target, set()).update(ids or ())
        return merged

    def of(self, label: str) -> set[int] | str:
        """Ids marked for one target model (empty set when none)."""
        return self.by_target().get(label, set())

    def count(self) -> int:
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM counts_dirtymark")
            return cursor.fetchone()[0]

    def clear(self) -> None:
        with self.conn.cursor() as cursor:
            cursor.execute("DELETE FROM counts_dirtymark")


@pytest.fixture
def marks(db) -> Marks:
    """The dirty-mark queue, emptied first.

    A transactional test's teardown flushes tables with TRUNCATE, which fires the count
    triggers and leaves "every row" marks behind; starting empty keeps tests independent.
    """
    queue = Marks()
    queue.clear()
    return queue


@pytest.fixture
def harness():
    """Clients driven step by step (``tests.interleave``), all closed before the teardown."""
    h = Harness()
    yield h
    h.close()


def build_world() -> SimpleNamespace:
    """Create a small dataset exercising every relation the counts read.

    Two projects with different thresholds, three stations, three nights, five captures (one
    without a night), valid and null-marker detections, counted and uncounted occurrences,
    shared taxa and two capture sets that overlap.
    """
    from project.monitoring.models import (
        Deployment,
        Detection,
        Event,
        Occurrence,
        Project,
        SourceImage,
        SourceImageCollection,
        Taxon,
    )

    t0 = datetime(2024, 6, 1, 21, 0, tzinfo=UTC)
    w = SimpleNamespace()
    w.p1 = Project.objects.create(name="Vermont", default_filters_score_threshold=0.5)
    w.p2 = Project.objects.create(name="Panama", default_filters_score_threshold=0.3)
    w.d1 = Deployment.objects.create(project=w.p1, name="Station A")
    w.d2 = Deployment.objects.create(project=w.p1, name="Station B")
    w.d3 = Deployment.objects.create(project=w.p2, name="Station C")
    w.e1 = Event.objects.create(deployment=w.d1, start=t0)
    w.e2 = Event.objects.create(deployment=w.d1, start=t0 + timedelta(days=1))
    w.e3 = Event.objects.create(deployment=w.d2, start=t0)
    image = SourceImage.objects.create
    w.i1 = image(deployment=w.d1, event=w.e1, timestamp=t0, path="a/1.jpg")
    w.i2 = image(deployment=w.d1, event=w.e1, timestamp=t0 + timedelta(minutes=5), path="a/2.jpg")
    w.i3 = image(deployment=w.d1, event=w.e2, timestamp=t0 + timedelta(days=1), path="a/3.jpg")
    w.i4 = image(deployment=w.d2, event=w.e3, timestamp=t0, path="b/1.jpg")
    w.i5 = image(deployment=w.d3, event=None, timestamp=t0, path="c/1.jpg")
    w.moth = Taxon.objects.create(name="Actias luna")
    w.beetle = Taxon.objects.create(name="Cicindela")
    occurrence = Occurrence.objects.create
    w.o1 = occurrence(deployment=w.d1, event=w.e1, determination=w.moth, determination_score=0.9)
    w.o2 = occurrence(deployment=w.d1, event=w.e1, determination=w.beetle, determination_score=0.4)
    w.o3 = occurrence(deployment=w.d2, event=w.e3, determination=w.moth, determination_score=None)
    w.o4 = occurrence(deployment=w.d3, event=None, determination=w.beetle, determination_score=0.35)
    box = [10, 10, 20, 20]
    detection = Detection.objects.create
    w.det1 = detection(source_image=w.i1, bbox=box, occurrence=w.o1, score=0.9)
    w.det2 = detection(source_image=w.i1, bbox=box, occurrence=w.o2, score=0.4)
    w.det3 = detection(source_image=w.i2, bbox=None)  # processed, nothing found
    w.det4 = detection(source_image=w.i4, bbox=box, occurrence=w.o3)
    w.det5 = detection(source_image=w.i5, bbox=box, occurrence=w.o4)
    w.c1 = SourceImageCollection.objects.create(project=w.p1, name="June")
    w.c2 = SourceImageCollection.objects.create(project=w.p1, name="Station B + one")
    w.c3 = SourceImageCollection.objects.create(project=w.p2, name="Empty")
    w.c1.images.set([w.i1, w.i2, w.i3])
    w.c2.images.set([w.i2, w.i4])
    return w


@pytest.fixture
def make_world(marks):
    """Factory: build the dataset, drain every mark, and hand it over with an empty queue."""

    def make() -> SimpleNamespace:
        from tests.truth import drain_all

        w = build_world()
        drain_all()
        marks.clear()
        return w

    return make


@pytest.fixture
def world(make_world) -> SimpleNamespace:
    """The dataset of :func:`build_world`, counts exact, no mark pending."""
    return make_world()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own on a free port, to hang, stop and restart at will."""
    from tests.redis_server import OwnRedis

    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def live_processes():
    """Heartbeats of a scheduler and a worker, as if both ran: ``counts status`` then has no
    process to complain about (it exits 2 when either is stale)."""
    from tests import worker_harness as wh
    from workers import heartbeat

    wh.reset_redis()
    heartbeat.beat(heartbeat.SCHEDULER)
    heartbeat.beat(heartbeat.WORKER, "test-host:1")
    yield
    wh.reset_redis()


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """Request rates and failed sign-ins start from zero in every test (``project.throttling``):
    the API requests of a whole run would otherwise reach the anonymous rate. The keys are this
    test process's own (``CACHES["throttle"]["KEY_PREFIX"]``), so other runs keep theirs."""
    yield
    import redis
    from django.conf import settings

    throttle = settings.CACHES["throttle"]
    try:
        with redis.Redis.from_url(throttle["LOCATION"], socket_timeout=1) as client:
            keys = list(client.scan_iter(match=f"{throttle['KEY_PREFIX']}:*", count=1000))
            if keys:
                client.delete(*keys)
    except redis.RedisError:
        pass  # no Redis, no counts to forget


#: Modules whose tests start processes (workers, a scheduler, ``manage.py``, a browser, a
#: ``redis-server`` of their own) or seed a dataset at scale: left out of ``bin/test --fast``.
PROCESS_MODULES = {
    "test_actors",
    "test_bench",
    "test_bin",
    "test_browser",
    "test_counts_command",
    "test_deploy_migrations",
    "test_deploy_settings",
    "test_docs",
    "test_faults",
    "test_health",
    "test_outages",
    "test_recovery",
    "test_seed_demo",
}
#: Fixtures that start processes wherever they are used.
PROCESS_FIXTURES = {"own_redis", "live_processes"}


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` every test that starts a process or seeds at scale (see above)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in PROCESS_MODULES or PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
