"""Two writers, or two drains, in one exact interleaving each: counts end exact, not one off.

Each test replays one order of statements, commits and drains with real connections
(``tests.interleave``) and ends with a drain to empty, the counts it touched checked against
numbers worked out by hand from :func:`tests.conftest.build_world`, and every count checked
against the truth computed from the base tables. Only writes, ``counts.drain`` and the truth
are used, so the tests hold for any engine (marks recounted, or per-image ledgers credited).

The cases are those of docs/engine.md §2.9:

- 1a: A moves capture i to another station while B adds a valid detection on it;
- 1b: two writers change i's detections at once (both add its first valid one, both remove one
  of its last two, one removes while the other adds);
- 1c: a first valid detection on i while another writer adds i to a set, or removes it;
- 2: the two writes are committed, and two drains consume their marks one at a time while the
  first drain is held open after its batch (``batch_size=1, max_ids=1``).

Three of them (1a with the mover committing first, in both statement orders, and 1c joining a
set) were wrong on the first engine: its mark triggers climbed from their own rows to the
targets reading a capture's station and sets in the writer's snapshot, so a concurrent move or
membership left a count one off until something marked it again. Writers now record only
their own rows, and drains credit each capture against its ledger (``counts.run.items``).
"""

from __future__ import annotations

import pytest

import counts
from tests.interleave import drain_to_empty
from tests.invariants import assert_invariants
from tests.truth import assert_all_counts_exact, cached, drain_all

pytestmark = pytest.mark.django_db(transaction=True)

#: The world's nine unchanged cached columns are left out of each expectation.
TABLES = {
    "d": "monitoring_deployment",
    "e": "monitoring_event",
    "i": "monitoring_sourceimage",
    "c": "monitoring_sourceimagecollection",
}
#: Short names for the cached columns an expectation lists.
COLUMNS = {
    "captures": "captures_count",
    "detections": "detections_count",
    "images": "source_images_count",
    "with": "source_images_with_detections_count",
    "processed": "source_images_processed_count",
}


def insert_detection(client, image_id: int, valid: bool = True) -> None:
    client.execute(
        "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
        " VALUES (%s, %s::jsonb, now(), now())",
        [image_id, "[1, 2, 3, 4]" if valid else None],
    )


def delete_detection(client, detection_id: int) -> None:
    assert client.execute("DELETE FROM monitoring_detection WHERE id = %s", [detection_id]) == 1


def join(client, set_id: int, image_id: int) -> None:
    client.execute(
        "INSERT INTO monitoring_sourceimagecollection_images"
        " (sourceimagecollection_id, sourceimage_id) VALUES (%s, %s)",
        [set_id, image_id],
    )


def leave(client, set_id: int, image_id: int) -> None:
    deleted = client.execute(
        "DELETE FROM monitoring_sourceimagecollection_images"
        " WHERE sourceimagecollection_id = %s AND sourceimage_id = %s",
        [set_id, image_id],
    )
    assert deleted == 1


def move(client, image_id: int, deployment_id: int) -> None:
    client.execute(
        "UPDATE monitoring_sourceimage SET deployment_id = %s, event_id = NULL WHERE id = %s",
        [deployment_id, image_id],
    )


def assert_counts(world, expected: dict[str, dict[str, int]]) -> None:
    """``{"d2": {"captures": 2}, "c1": {"with": 2}}``: these cached values, after the drains.

    Checked before the full truth so a failure names the count the case is about.
    """
    wrong = []
    for row, columns in expected.items():
        pk = getattr(world, row).pk
        have = cached(TABLES[row[0]])[pk]
        for short, value in columns.items():
            if have[COLUMNS[short]] != value:
                wrong.append(f"{row} {COLUMNS[short]}: cached {have[COLUMNS[short]]}, want {value}")
    assert not wrong, "\n".join(wrong)


def settle(world, expected) -> None:
    drain_to_empty()
    assert_counts(world, expected)
    assert_all_counts_exact()
    assert_invariants()


def test_the_harness_sees_a_statement_wait_on_a_lock_and_finish_after_the_commit(
    make_world, harness
):
    """What the cases below rely on: "waits" is seen, and the wait ends with the other commit."""
    world = make_world()
    first, second = harness.sql("first"), harness.sql("second")
    rename = "UPDATE monitoring_sourceimage SET path = %s WHERE id = %s"
    first.execute(rename, ["first.jpg", world.i1.pk])
    step = second.start_execute(rename, ["second.jpg", world.i1.pk])
    assert step.blocked and not step.finished.is_set()
    first.commit()
    assert step.result() == 1
    second.commit()
    world.i1.refresh_from_db()
    assert world.i1.path == "second.jpg"


# 1a. i3 (station A = d1, night e2, set c1, no detection) moves to station B = d2 while a valid
# detection is added on it. The UPDATE takes FOR NO KEY UPDATE on i3, the insert's FK check
# KEY SHARE: neither waits, in either statement order.
MOVED = {
    "d1": {"captures": 2, "detections": 2},
    "d2": {"captures": 2, "detections": 2},
    "e2": {"captures": 0, "detections": 0},
    "i3": {"detections": 1},
    "c1": {"images": 3, "with": 2, "processed": 3},
}


@pytest.mark.parametrize(
    "move_first, mover_commits_first",
    [
        # Formerly test_known_races: "a detection on a capture being moved reaches its new
        # station". Station B is recounted before the detection commits; the detection's marks
        # name station A, where its writer saw the capture.
        pytest.param(True, True, id="move-first/mover-commits-first"),
        pytest.param(False, True, id="detect-first/mover-commits-first"),
        pytest.param(True, False, id="move-first/detector-commits-first"),
        pytest.param(False, False, id="detect-first/detector-commits-first"),
    ],
)
def test_1a_a_detection_on_a_capture_being_moved_reaches_its_new_station(
    make_world, harness, move_first, mover_commits_first
):
    world = make_world()
    mover, detector = harness.sql("mover"), harness.sql("detector")
    statements = [
        lambda: move(mover, world.i3.pk, world.d2.pk),
        lambda: insert_detection(detector, world.i3.pk),
    ]
    for statement in statements if move_first else statements[::-1]:
        statement()
    for writer in (mover, detector) if mover_commits_first else (detector, mover):
        writer.commit()
        drain_all()  # what is due now; a row the other writer holds waits
    settle(world, MOVED)


# 1b. Two writers change the detections of one capture that is in two sets (c1 and c2), each in
# its own transaction; neither waits. "add" inserts a valid detection, "drop:<det>" deletes one.
WORLD_DETECTIONS = {
    # i2 has only a null detection: it is processed, not "with detections". Both add a valid
    # one: each set's with_detections goes up by exactly one, not two.
    "i2 first valid, twice": (
        "i2",
        None,
        ("add", "add"),
        {
            "i2": {"detections": 2},
            "d1": {"detections": 4},
            "e1": {"detections": 4},
            "c1": {"with": 2, "processed": 2},
            "c2": {"with": 2, "processed": 2},
        },
    ),
    # i3 has no detection at all and is put in c2 too: both counts of both sets go up by one.
    "i3 first detection, twice": (
        "i3",
        "c2",
        ("add", "add"),
        {
            "i3": {"detections": 2},
            "d1": {"detections": 4},
            "e2": {"detections": 2},
            "c1": {"images": 3, "with": 2, "processed": 3},
            "c2": {"images": 3, "with": 2, "processed": 3},
        },
    ),
    # i1's two valid detections are deleted by two writers (i1 put in c2 too): each set loses
    # i1 once, from both counts.
    "i1 last two valid, deleted": (
        "i1",
        "c2",
        ("drop:det1", "drop:det2"),
        {
            "i1": {"detections": 0},
            "d1": {"detections": 0},
            "e1": {"detections": 0},
            "c1": {"images": 3, "with": 0, "processed": 1},
            "c2": {"images": 3, "with": 1, "processed": 2},
        },
    ),
    # i4's only valid detection is deleted while another is added (i4 put in c1 too): the sets'
    # counts must not move.
    "i4 only valid replaced": (
        "i4",
        "c1",
        ("drop:det4", "add"),
        {
            "i4": {"detections": 1},
            "d2": {"detections": 1},
            "e3": {"detections": 1},
            "c1": {"images": 4, "with": 2, "processed": 3},
            "c2": {"images": 2, "with": 1, "processed": 2},
        },
    ),
}


@pytest.mark.parametrize("first_commits_first", [True, False], ids=["A-first", "B-first"])
@pytest.mark.parametrize("drain_between", [True, False], ids=["drain-between", "drain-at-end"])
@pytest.mark.parametrize("case", sorted(WORLD_DETECTIONS))
def test_1b_two_writers_on_one_captures_detections_count_it_once(
    make_world, harness, case, drain_between, first_commits_first
):
    image, extra_set, changes, expected = WORLD_DETECTIONS[case]
    world = make_world()
    image_id = getattr(world, image).pk
    if extra_set:
        getattr(world, extra_set).images.add(image_id)
        drain_all()
    writers = [harness.sql("A"), harness.sql("B")]
    for writer, change in zip(writers, changes, strict=True):
        if change == "add":
            insert_detection(writer, image_id)
        else:
            delete_detection(writer, getattr(world, change.split(":")[1]).pk)
    for writer in writers if first_commits_first else writers[::-1]:
        writer.commit()
        if drain_between:
            drain_all()
    settle(world, expected)


# 1c. i3 gets its first (valid) detection while another writer adds it to c3 (empty) or takes
# it out of c1. Neither waits.
MEMBERSHIP = {
    "join": {
        "i3": {"detections": 1},
        "e2": {"detections": 1},
        "c1": {"images": 3, "with": 2, "processed": 3},
        "c3": {"images": 1, "with": 1, "processed": 1},
    },
    "leave": {
        "i3": {"detections": 1},
        "e2": {"detections": 1},
        "c1": {"images": 2, "with": 1, "processed": 2},
        "c3": {"images": 0, "with": 0, "processed": 0},
    },
}


@pytest.mark.parametrize(
    "membership, member_commits_first",
    [
        # Formerly test_known_races: "a first detection racing a membership reaches the new
        # set". c3 is recounted before the detection commits; the detection's marks name c1, the
        # only set its writer saw i3 in.
        pytest.param("join", True, id="join/member-commits-first"),
        pytest.param("join", False, id="join/detector-commits-first"),
        pytest.param("leave", True, id="leave/member-commits-first"),
        pytest.param("leave", False, id="leave/detector-commits-first"),
    ],
)
def test_1c_a_first_detection_racing_a_membership_counts_in_the_right_sets(
    make_world, harness, membership, member_commits_first
):
    world = make_world()
    member, detector = harness.sql("member"), harness.sql("detector")
    if membership == "join":
        join(member, world.c3.pk, world.i3.pk)
    else:
        leave(member, world.c1.pk, world.i3.pk)
    insert_detection(detector, world.i3.pk)
    for writer in (member, detector) if member_commits_first else (detector, member):
        writer.commit()
        drain_all()  # what is due now; a row the other writer holds waits
    settle(world, MEMBERSHIP[membership])


# 2. Both writes are committed first (i3 joins c3; i3 gets its first detection), in either order.
# Drain 1 takes ``held`` single-mark batches in one transaction and stays open; meanwhile a third
# write may commit (i3 joins c2), and drain 2 takes single marks until the queue is empty or it
# waits on drain 1. Then drain 1 commits.
HELD = {
    "i3": {"detections": 1},
    "d1": {"detections": 3},
    "e2": {"detections": 1},
    "c1": {"images": 3, "with": 2, "processed": 3},
    "c3": {"images": 1, "with": 1, "processed": 1},
}


def drain_until_empty_or_waiting(drainer) -> tuple[int, object]:
    """Single-mark batches until one finds nothing; returns (marks taken, a waiting step)."""
    taken = 0
    for _ in range(200):
        step = drainer.start_drain(batch_size=1, max_ids=1)
        if step.blocked:
            return taken, step
        result = step.result()
        if result.empty:
            return taken, None
        taken += result.marks
    raise AssertionError("drain 2 never found the queue empty")


@pytest.mark.parametrize("write_while_held", [False, True], ids=["no-write", "write-while-held"])
@pytest.mark.parametrize("held", [1, 2], ids=["holds-1", "holds-2"])
@pytest.mark.parametrize("join_first", [True, False], ids=["join-first", "detect-first"])
def test_2_two_drains_one_mark_at_a_time_credit_a_capture_once(
    make_world, harness, join_first, held, write_while_held
):
    world = make_world()
    writer = harness.sql("writer")
    writes = [
        lambda: join(writer, world.c3.pk, world.i3.pk),
        lambda: insert_detection(writer, world.i3.pk),
    ]
    for write in writes if join_first else writes[::-1]:
        write()
        writer.commit()
    first, second = harness.orm("drain 1"), harness.orm("drain 2")
    first.begin()
    taken = sum(first.drain(batch_size=1, max_ids=1).marks for _ in range(held))
    assert taken >= 1, "the two writes left no mark"
    if write_while_held:
        join(writer, world.c2.pk, world.i3.pk)
        writer.commit()
    second_took, waiting = drain_until_empty_or_waiting(second)
    if held == 1:  # two committed writes leave two marks at least: drain 2 had one to take
        assert second_took or waiting, "drain 2 found nothing while drain 1 was held"
    first.commit()
    if waiting is not None:  # drain 2 queued behind drain 1's locks: now it goes on
        waiting.result()
    expected = dict(HELD)
    if write_while_held:
        expected["c2"] = {"images": 3, "with": 2, "processed": 3}
    settle(world, expected)


def test_2_recompute_now_while_a_drain_is_held_counts_nothing_twice(make_world, harness):
    """A "Recompute now" of a set while a drain that credited it is still open (§2.5 / E7).

    i3 joins c3 and gets its first detection; drain 1 takes every mark and stays open; another
    capture of c3 gets its first detection; the set is recomputed now, then drain 1 commits.
    """
    world = make_world()
    writer = harness.sql("writer")
    join(writer, world.c3.pk, world.i3.pk)
    join(writer, world.c3.pk, world.i5.pk)  # i5 has a valid detection already
    insert_detection(writer, world.i3.pk)
    writer.commit()
    first = harness.orm("drain 1")
    first.begin()
    while not first.drain(batch_size=500, max_ids=5000).empty:
        pass
    insert_detection(writer, world.i2.pk)  # i2 is not in c3: a bystander's change
    join(writer, world.c3.pk, world.i4.pk)  # i4 has a valid detection
    writer.commit()
    recompute = harness.orm("recompute now").start(lambda: counts.recompute([world.c3]))
    first.commit()
    recompute.result()  # done already, or done once drain 1 let go of c3
    settle(
        world,
        {
            "c3": {"images": 3, "with": 3, "processed": 3},
            "c1": {"images": 3, "with": 3, "processed": 3},
            "c2": {"images": 2, "with": 2, "processed": 2},
        },
    )
