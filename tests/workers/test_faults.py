"""Faults degrade gracefully: a hung Redis, drains that keep failing, broken payloads.

Each test runs the real pieces (PostgreSQL with its triggers, Redis, Dramatiq workers); a Redis
that hangs or dies is a redis-server of the test's own (tests/redis_server.py).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime

import dramatiq
import pytest
import redis
from django.conf import settings
from django.test import override_settings
from dramatiq.brokers.redis import RedisBroker

from counts.models import DirtyMark
from project.monitoring.models import (
    Deployment,
    Detection,
    Project,
    SourceImage,
)
from tests import worker_harness as wh
from tests.truth import assert_all_counts_exact
from tests.workers.test_actors import converged, make_sets, raw_connection
from workers import debounce
from workers import redis_client as workers_redis
from workers.names import QUEUE
from workers.queued import label_of_message
from workers.schedule import sweep

pytestmark = [pytest.mark.django_db(transaction=True)]

COLLECTION = "monitoring.sourceimagecollection"


@pytest.fixture(autouse=True)
def clean_slate():
    wh.reset_redis()
    DirtyMark.objects.all().delete()
    workers_redis.reset()
    yield
    workers_redis.reset()
    wh.reset_redis()


@pytest.fixture
def counter():
    with wh.counting_messages() as counting:
        yield counting


def an_image() -> SourceImage:
    project = Project.objects.create(name="p")
    station = Deployment.objects.create(project=project, name="station")
    return SourceImage.objects.create(deployment=station, timestamp=datetime.now(UTC), path="x")


def timed_writes(image: SourceImage, n: int, budget_s: float) -> list[float]:
    """Seconds each of ``n`` single-row commits took (fewer if the budget ran out)."""
    took, started = [], time.monotonic()
    for _ in range(n):
        t = time.perf_counter()
        Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
        took.append(time.perf_counter() - t)
        if time.monotonic() - started > budget_s:
            break
    return took


def test_commits_stay_fast_while_redis_is_hung_and_counts_converge_after(own_redis, caplog):
    image = an_image()
    with override_settings(REDIS_URL=own_redis.url), caplog.at_level(logging.ERROR):
        own_redis.hang()
        try:
            took = timed_writes(image, n=100, budget_s=20)
        finally:
            own_redis.resume()
    took_ms = sorted(t * 1000 for t in took)
    p50, p99 = statistics.median(took_ms), took_ms[int(len(took_ms) * 0.99) - 1]
    print(f"\n{len(took)} commits with redis hung: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    assert len(took) == 100, f"only {len(took)} commits in 20 s"
    assert p50 < 20, "a hung Redis must not slow commits"
    assert sum(took) < 5, "at most one writer per cool-down pays the socket timeout"
    errors = [r for r in caplog.records if r.name == "workers.hooks"]
    assert len(errors) == 1, "one log line per outage"
    assert f"127.0.0.1:{own_redis.port}" in errors[0].getMessage()
    assert DirtyMark.objects.exists(), "the marks are durable"
    with override_settings(COUNTS_DEBOUNCE_MS=100), wh.running_worker():
        assert sweep(), "the sweep sends for the marks the writers could not announce"
        wh.wait_until(converged, timeout=30)
    image.refresh_from_db()
    assert image.detections_count == 100
    assert_all_counts_exact()


COOL_DOWN_S = 6


@override_settings(COUNTS_REDIS_COOLDOWN_MS=COOL_DOWN_S * 1000)
def test_the_write_path_goes_back_to_redis_by_itself_after_the_cool_down(own_redis, caplog):
    """The cool-down is long enough that restarting a redis-server on a loaded machine fits in
    it; the test then waits for exactly what is left of it, measured from the first failure."""
    image = an_image()
    with override_settings(REDIS_URL=own_redis.url), caplog.at_level(logging.WARNING):
        own_redis.stop()
        # The breaker opens during the first write: it reopens between these two bounds.
        reopens_after = time.monotonic() + COOL_DOWN_S
        Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
        reopens_by = time.monotonic() + COOL_DOWN_S
        for _ in range(2):
            Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
        own_redis.start()
        Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
        assert time.monotonic() < reopens_after, "the machine was too slow to test the cool-down"
        assert not own_redis.client().keys("*"), "within the cool-down writers skip Redis"
        time.sleep(max(0.0, reopens_by - time.monotonic()) + 0.1)
        with wh.counting_messages() as counter:
            Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
        assert own_redis.client().keys("*debounce*"), "after it, the next writer sets its key"
    assert counter.sent["recompute_pending"] >= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "workers.hooks"]
    assert len(lines) == 2, lines
    assert "unavailable" in lines[0] and "is back" in lines[1]


def test_the_brokers_send_gives_up_quickly_on_a_hung_redis(own_redis):
    """The broker's own connections carry the timeouts the settings give them."""
    options = settings.DRAMATIQ_BROKER["OPTIONS"]
    url = options["url"].replace(settings.REDIS_URL.split("?")[0], own_redis.url)
    broker = RedisBroker(url=url, namespace=f"hung-{uuid.uuid4().hex}")
    message = dramatiq.Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={})
    own_redis.hang()
    outcome = {}

    def send():
        started = time.monotonic()
        try:
            broker.enqueue(message)
        except redis.RedisError as exc:
            outcome["error"] = exc
        outcome["took"] = time.monotonic() - started

    try:
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        thread.join(timeout=10)
    finally:
        own_redis.resume()
    assert outcome.get("took", 99) < 3, "the send gave up within its timeout"
    assert isinstance(outcome.get("error"), redis.TimeoutError)


def test_writes_within_a_window_share_one_redis_round_trip_and_converge(own_redis):
    image = an_image()
    commands = ("eval", "evalsha", "script|exists", "script|load")
    with override_settings(REDIS_URL=own_redis.url, COUNTS_DEBOUNCE_MS=3000):
        with wh.counting_messages() as counter:
            Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
            first = own_redis.calls(*commands)
            for _ in range(19):
                Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
            after = own_redis.calls(*commands)
        labels = counter.sent["recompute_pending"]
        assert first == labels, "the first commit: one call per target model, one round trip"
        assert after == first, "the 19 commits after it, within the window, call Redis no more"
        with wh.running_worker():
            wh.wait_until(converged, timeout=30)
    image.refresh_from_db()
    assert image.detections_count == 20
    assert_all_counts_exact()


def messages_for(label: str) -> dict[str, set[tuple[str, str]]]:
    """(id, actor) of the messages for ``label`` the broker holds, by hash: ``queued`` (queued
    or running) and ``delayed`` (a debounce window, or a retry's backoff). Both hashes are read
    in one MULTI, so a message moving between them is seen."""
    broker = wh.broker()
    r, ns = broker.client, broker.namespace
    pipe = r.pipeline(transaction=True)
    pipe.hvals(f"{ns}:counts.msgs")
    pipe.hvals(f"{ns}:counts.DQ.msgs")
    queued, delayed = pipe.execute()
    return {
        name: {
            (message["message_id"], message["actor_name"])
            for message in map(json.loads, (p for p in payloads if label_of_message(p) == label))
        }
        for name, payloads in (("queued", queued), ("delayed", delayed))
    }


def test_failing_drains_do_not_grow_their_queue_and_converge_after(counter):
    """A migration holding its table lock makes every drain of the model fail for a while.

    Writers keep marking the model meanwhile (a detection on one of its images), and the
    scheduler keeps sweeping. A failed drain takes its debounce key back for its retry, so
    writers and sweeps send nothing while it waits. Should a sweep take it for lost (its
    worker slow to answer, on a loaded machine) and send one of its own, that one takes over
    and the failed one is not retried
    (``test_a_failed_drain_is_not_retried_once_another_message_holds_its_key``): never two
    drain messages wait to retry at once. The one other message the design lets in is the
    scheduler's rescue (``workers.schedule``): once the retry's backoff leaves the due marks
    ``COUNTS_RESCUE_AFTER_S`` with no drainer at work, one rescue, never retried.
    """
    images, sets = make_sets(n_sets=1, n_images=5)
    for image in images:
        sets[0].images.add(image)
    blocker = raw_connection()
    most_delayed, seen, window_s = 0, set(), 8
    overrides = {
        "COUNTS_LOCK_TIMEOUT_MS": 100,
        "COUNTS_DEBOUNCE_MS": 50,
        "COUNTS_DRAINING_TTL_MS": 500,
    }
    try:
        blocker.execute("LOCK TABLE monitoring_sourceimagecollection IN ACCESS EXCLUSIVE MODE")
        with override_settings(**overrides), wh.running_worker():
            wh.wait_until(lambda: counter.retries["recompute_pending"] >= 1, timeout=20)
            until = time.monotonic() + window_s
            while time.monotonic() < until:
                Detection.objects.create(source_image=images[0], bbox=[1, 2, 3, 4])
                sweep()
                held = messages_for(COLLECTION)
                delayed = {m for m, actor in held["delayed"] if actor != "rescue_drain"}
                most_delayed = max(most_delayed, len(delayed))
                seen |= held["queued"] | held["delayed"]
                time.sleep(0.2)
            assert DirtyMark.objects.filter(target=COLLECTION).exists(), "failed drains keep marks"
            blocker.rollback()
            wh.wait_until(converged, timeout=90)
    finally:
        blocker.close()
    drains = {m for m, actor in seen if actor != "rescue_drain"}
    rescues = {m for m, actor in seen if actor == "rescue_drain"}
    print(f"\nwhile drains failed: {len(drains)} drain message(s), {len(rescues)} rescue(s),")
    print(f"at most {most_delayed} drain(s) waiting at once, in {window_s} s")
    assert most_delayed == 1, "one drain message waits to retry, never two side by side"
    assert len(drains) <= 3, "a handover is rare: a message of the sweep's, for one it took as lost"
    assert len(rescues) <= window_s // settings.COUNTS_RESCUE_AFTER_S + 1
    left = messages_for(COLLECTION)
    assert not left["queued"] | left["delayed"], "no redundant message left after recovery"
    sets[0].refresh_from_db()
    assert sets[0].source_images_count == len(images)
    assert sets[0].source_images_with_detections_count == 1
    assert_all_counts_exact()


@override_settings(COUNTS_LOCK_TIMEOUT_MS=100)
def test_a_failed_drain_is_not_retried_once_another_message_holds_its_key(caplog):
    """A sweep that took the retrying message for lost (its worker slow to answer) sends one
    of its own, forced over the debounce key. When the old message's attempt then fails, it
    cannot take the key back: it must leave the marks to the new message rather than retry
    beside it (before the fix, two drain messages retried side by side, and each such attempt
    could add one more)."""
    images, sets = make_sets(n_sets=1, n_images=3)
    sets[0].images.add(images[0])  # a mark, and a drain message holding the debounce key
    key = debounce.debounce_key(COLLECTION)
    debounce.client().set(key, "a-message-sent-since", px=60_000)
    blocker = raw_connection()
    try:
        blocker.execute("LOCK TABLE monitoring_sourceimagecollection IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING, logger="workers"), wh.running_worker():
            # The message's debounce window (1 s), its attempt (a 100 ms lock wait), then a
            # retry would be enqueued as the attempt ends.
            deadline = time.monotonic() + 6
            while f"drain of {COLLECTION} failed" not in caplog.text:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            time.sleep(0.5)
            held = messages_for(COLLECTION)
            assert not held["queued"] | held["delayed"], "the failed message is not retried"
            assert DirtyMark.objects.filter(target=COLLECTION).exists(), "its marks are kept"
            blocker.rollback()
            debounce.client().delete(key)  # the other message, drained: the sweep sends anew
            wh.wait_until(lambda: bool(sweep()) or converged(), timeout=20)
            wh.wait_until(converged, timeout=30)
    finally:
        blocker.close()
    sets[0].refresh_from_db()
    assert sets[0].source_images_count == 1
    assert_all_counts_exact()


def push_raw(queue: str, payload: bytes) -> str:
    """Store a payload in the queue the way the Redis broker stores a message; its id."""
    broker = wh.broker()
    message_id = str(uuid.uuid4())
    broker.client.hset(f"{broker.namespace}:{queue}.msgs", message_id, payload)
    broker.client.rpush(f"{broker.namespace}:{queue}", message_id)
    return message_id


def test_undecodable_payloads_are_dead_lettered_once_and_the_worker_goes_on(caplog):
    images, sets = make_sets(n_sets=1, n_images=3)
    broken = {
        push_raw("counts", b"\xff not json at all"): b"\xff not json at all",
        push_raw("counts", b'{"json": "but no message"}'): b'{"json": "but no message"}',
        push_raw("counts.DQ", b"[1, 2"): b"[1, 2",
    }
    with caplog.at_level(logging.INFO), wh.running_worker():
        wh.wait_until(lambda: wh.dead_letters() == len(broken), timeout=30)
        sets[0].images.add(*images)
        wh.wait_until(converged, timeout=30)
    broker = wh.broker()
    dead = broker.client.hgetall(f"{broker.namespace}:counts.XQ.msgs")
    assert {k.decode(): v for k, v in dead.items()} == broken, "the payloads, byte for byte"
    logged = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "undecodable payload" in r.getMessage()
    ]
    assert len(logged) == len(broken), "each logged once, for an operator to see"
    crashes = [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert not crashes, "the consumer never crashed"
    sets[0].refresh_from_db()
    assert sets[0].source_images_count == 3
    assert_all_counts_exact()


def test_messages_a_fetch_moved_to_a_live_workers_ack_set_unseen_are_put_back_and_run(caplog):
    """A fetch Redis ran after the client gave up on its reply (a stall): its messages sit in
    this worker's ack set and no thread has them. Without the put-back they wait for the worker
    to die; no scheduler runs here to rescue them."""
    images, sets = make_sets(n_sets=2, n_images=6)
    sets[0].images.add(*images)
    sets[1].images.add(*images[:2])
    broker = wh.broker()
    delayed = f"{QUEUE}.DQ"
    wh.wait_until(lambda: broker.client.llen(f"{broker.namespace}:{delayed}") > 0, timeout=10)
    # The lost replies: the dispatch script run under this worker's id, its result dropped.
    lost = [
        json.loads(data)["message_id"]
        for queue in (delayed, QUEUE)
        for data in RedisBroker._dispatch(broker, "fetch")(queue, 100)
    ]
    assert lost, "the debounced drain messages were fetched"
    broker._doubt()  # what a failed command (the timed-out fetch) does
    with caplog.at_level(logging.INFO), wh.running_worker():
        wh.wait_until(converged, timeout=30)
    for message_id in lost:
        assert any(
            message_id in r.getMessage() and "put back" in r.getMessage() for r in caplog.records
        ), f"message {message_id} named in the log"
    acks = list(broker.client.scan_iter(f"{broker.namespace}:__acks__.*"))
    assert not any(broker.client.scard(k) for k in acks), "no message left in an ack set"
    assert_all_counts_exact()
