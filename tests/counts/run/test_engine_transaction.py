"""The engine's transaction (``counts.run.engine_transaction``): the only place cached columns
may be written, and nothing of it outlives the block.

The guard triggers let a write to a cached column through only under the transaction-local
setting this block turns on. What is pinned: outside it a repair is kept back, inside it lands;
the setting is gone after commit, rollback, or the end of a nested block (else a stale
``save()`` later in the caller's transaction would revert a count); the engine's own writes
announce nothing after commit (a worker would otherwise be sent to drain its own writes); a
failure inside undoes everything, the marks taken included, so nothing is lost.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from counts.base import checkpoints
from counts.base.names import ENGINE_SETTING
from counts.run.engine_transaction import engine_transaction
from counts.run.notice import marks_committed
from project.monitoring.models import Detection, SourceImage
from tests.truth import assert_all_counts_exact, cached, drain_all, triggers_off, truth

IMAGES = "monitoring_sourceimage"
REPAIR = f"UPDATE {IMAGES} SET detections_count = %s WHERE id = %s"


def setting(cursor=None) -> str | None:
    """The engine setting as the connection sees it now."""
    if cursor is None:
        with connection.cursor() as own:
            return setting(own)
    cursor.execute("SELECT current_setting(%s, true)", [ENGINE_SETTING])
    return cursor.fetchone()[0]


def corrupt(pk: int, value: int = 99) -> None:
    with triggers_off() as cursor:
        cursor.execute(REPAIR, [value, pk])


def repair(cursor, pk: int) -> None:
    cursor.execute(REPAIR, [truth(IMAGES)[pk]["detections_count"], pk])


def stored(pk: int) -> int:
    return cached(IMAGES)[pk]["detections_count"]


def test_a_repair_is_kept_back_outside_and_lands_inside(world, marks):
    corrupt(world.i1.pk)
    with connection.cursor() as cursor:
        repair(cursor, world.i1.pk)
    assert stored(world.i1.pk) == 99, "the guard let a write outside the engine through"
    with engine_transaction() as cursor:
        assert setting(cursor) == "on"
        repair(cursor, world.i1.pk)
    assert marks.rows() == [], "the engine's own write marked something"
    assert_all_counts_exact()


def test_a_nested_block_hands_back_a_guarded_transaction(world, marks):
    """Inside the caller's transaction (a request, a test): after the block, committed or
    failed, the caller's own writes to cached columns are kept back again."""
    assert connection.in_atomic_block
    with engine_transaction() as cursor:
        repair(cursor, world.i2.pk)
    assert setting() != "on"
    with pytest.raises(RuntimeError), engine_transaction():
        raise RuntimeError("fails inside")
    assert setting() != "on"
    held = SourceImage.objects.get(pk=world.i2.pk)
    Detection.objects.create(source_image=world.i2, bbox=[1, 2, 3, 4])
    drain_all()  # a drain inside the caller's transaction: nested as well
    assert stored(world.i2.pk) == 1
    held.save()  # stale: detections_count 0
    assert stored(world.i2.pk) == 1
    assert_all_counts_exact()


def test_a_nested_block_gives_the_callers_own_settings_back(world):
    """A request that set its own lock timeout (and JIT) and ran "Recompute now" inside its
    transaction keeps them afterwards: the block's settings do not leak into the caller's."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('lock_timeout', '5s', true), set_config('jit', 'on', true)"
        )
        with engine_transaction(lock_timeout_ms=100) as inner:
            inner.execute("SELECT current_setting('lock_timeout'), current_setting('jit')")
            assert inner.fetchone() == ("100ms", "off"), "the block's own settings, inside it"
            repair(inner, world.i1.pk)
        cursor.execute("SELECT current_setting('lock_timeout'), current_setting('jit')")
        assert cursor.fetchone() == ("5s", "on"), "the caller's settings, after the block"
        assert setting(cursor) != "on"


def test_lazy_settings_wait_for_engine_on(world, marks):
    corrupt(world.i1.pk)
    with engine_transaction(lazy=True) as cursor:
        assert setting(cursor) != "on"
        repair(cursor, world.i1.pk)
        assert stored(world.i1.pk) == 99, "written before the settings were applied"
        cursor.engine_on()
        repair(cursor, world.i1.pk)
    assert_all_counts_exact()


def test_the_lock_timeout_bounds_only_a_block_that_asks_for_one(world, marks):
    """A drain's waits behind DDL are bounded; other engine transactions set none."""
    with engine_transaction(lock_timeout_ms=250) as cursor:
        cursor.execute("SELECT current_setting('lock_timeout'), current_setting('jit')")
        assert cursor.fetchone() == ("250ms", "off")
    with engine_transaction() as cursor:
        cursor.execute("SELECT current_setting('lock_timeout')")
        assert cursor.fetchone() == ("0",)


@pytest.mark.django_db(transaction=True)
def test_the_setting_ends_with_commit_and_with_rollback(world, marks):
    assert not connection.in_atomic_block
    corrupt(world.i1.pk)
    with engine_transaction() as cursor:
        repair(cursor, world.i1.pk)
    assert setting() != "on"
    corrupt(world.i1.pk)
    with pytest.raises(RuntimeError), engine_transaction() as cursor:
        assert setting(cursor) == "on"
        raise RuntimeError("fails inside")
    assert setting() != "on"
    with connection.cursor() as cursor:  # autocommit, as any other client writes
        repair(cursor, world.i1.pk)
    assert stored(world.i1.pk) == 99
    with engine_transaction() as cursor:
        repair(cursor, world.i1.pk)
    assert_all_counts_exact()


@pytest.mark.django_db(transaction=True)
def test_the_engine_s_writes_announce_nothing_after_commit(world, marks):
    announced: list[frozenset] = []

    def receiver(sender, targets, using, **kwargs):
        announced.append(targets)

    marks_committed.connect(receiver, dispatch_uid="test_engine_transaction")
    try:
        with engine_transaction() as cursor:
            repair(cursor, world.i1.pk)
            cursor.execute(
                "UPDATE monitoring_detection SET score = score WHERE id = %s", [world.det1.pk]
            )
        assert announced == [], "the engine announced its own writes"
        with transaction.atomic(), connection.cursor() as cursor:  # quiet ended with the block
            cursor.execute(
                "UPDATE monitoring_detection SET score = score WHERE id = %s", [world.det1.pk]
            )
        assert len(announced) == 1 and announced[0]
    finally:
        marks_committed.disconnect(dispatch_uid="test_engine_transaction")


def taken(cursor) -> list[tuple]:
    """Take every mark, as a drain does."""
    cursor.execute(
        "DELETE FROM counts_dirtymark RETURNING id, target, ids, field, deltas, not_before"
    )
    return sorted(cursor.fetchall())


def all_marks() -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, target, ids, field, deltas, not_before FROM counts_dirtymark")
        return sorted(cursor.fetchall())


@pytest.mark.django_db(transaction=True)
def test_a_failure_inside_rolls_back_everything_and_the_marks_come_back(world, marks):
    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    SourceImage.objects.create(
        deployment=world.d2, event=world.e3, timestamp=world.i4.timestamp, path="b/2.jpg"
    )
    before, counts_before = all_marks(), cached(IMAGES)
    assert before
    with pytest.raises(RuntimeError), engine_transaction() as cursor:
        assert taken(cursor) == before
        repair(cursor, world.i3.pk)
        raise RuntimeError("the batch fails after its writes")
    assert all_marks() == before
    assert cached(IMAGES) == counts_before
    drain_all()
    assert_all_counts_exact()


@pytest.mark.django_db(transaction=True)
def test_a_drain_failing_before_its_commit_loses_nothing(world, marks):
    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    before, counts_before = all_marks(), {t: cached(t) for t in (IMAGES, "monitoring_event")}
    with (
        checkpoints.at("drain.before_commit", checkpoints.fail),
        pytest.raises(checkpoints.CheckpointFailure),
    ):
        drain_all()
    assert all_marks() == before
    assert {t: cached(t) for t in counts_before} == counts_before
    drain_all()
    assert_all_counts_exact()
