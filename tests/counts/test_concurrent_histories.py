"""CONCURRENT PROPERTY TESTS: seeded random writers and single-mark drains at once, then exact.

The deterministic cases (``test_interleavings``) replay the orders we thought of; these runs
look for the ones we did not. Three writer threads, each on its own connection, run small
random transactions (``tests.histories``: detections created, deleted, moved, bulk-created,
updated by queryset; captures moved between stations; set memberships added and removed from
both sides of the M2M and by raw SQL; occurrence scores and determinations changed; project
thresholds changed), sleeping a few milliseconds inside some of them so that others commit and
drain meanwhile. Three drainer threads loop ``counts.drain(batch_size=1, max_ids=1)``, the
finest interleaving of drains, and one of them sometimes does "Recompute now" on random rows.

Two forms:

- a continuous history: the threads run to the end, then the queue is drained to empty and
  every count must equal the truth;
- bursts: the writers start one transaction each at the same moment, then everything waits
  while the test drains to empty and compares, 25 times. A recount engine repairs a row the
  next time anything marks it, so in a long history a count left one off is usually hidden
  again before the end; after a burst it is still there to see. In one form a bulk pass
  (reconcile, a dry run, rebuild, a backfill run again, "Recompute now" of a whole model,
  in chunks of one to three rows) races each burst too.

Thread scheduling is not reproducible, so a seed fixes each writer's choices, not the
interleaving; a failure prints the seed and the mismatches. The world is small on purpose, and
writers pick one shared "hot" capture half the time: many collisions on the same capture,
station and set. ``HISTORY_SEEDS=1-100`` (and ``HISTORY_EPISODES``, ``HISTORY_STEPS``) run a
longer hunt; the default, three seeds, takes about 20 s.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from django.db import DatabaseError

import counts
from counts.apps import graph
from counts.operate.backfill import backfill
from project.monitoring.models import (
    Deployment,
    Detection,
    Event,
    SourceImage,
    SourceImageCollection,
)
from tests.histories import (
    BOX,
    FAMILIES,
    T0,
    Loop,
    Rows,
    drain_once,
    grow_world,
    one_transaction,
)
from tests.interleave import drain_to_empty
from tests.invariants import assert_invariants
from tests.truth import assert_all_counts_exact, mismatches

pytestmark = pytest.mark.django_db(transaction=True)
#: Writer transactions per writer thread, per seed.
STEPS = int(os.environ.get("HISTORY_STEPS", "40"))
#: Seeds run: three by default (a few seconds); ``HISTORY_SEEDS=1-200`` for a longer hunt.
SEEDS = os.environ.get("HISTORY_SEEDS", "1-3")


def write(seed: int, writer: int, steps: int, stats: Counter) -> None:
    """One writer of a continuous history: ``steps`` transactions in a row."""
    rows = Rows(random.Random(f"{seed}-{writer}"))
    for step in range(steps):
        rows.hot = random.Random(f"{seed}/{step // 5}").choice(rows.images)  # shared, mostly
        one_transaction(rows, stats)


def drain_singly(done: threading.Event, stats: Counter, recompute_now: bool, seed: str) -> None:
    """One drainer of a continuous history: single-mark batches until the writers are done."""
    rng = random.Random(seed)
    while not done.is_set():
        drain_once(rng, stats, recompute_now)


class Gate:
    """Barriers that run writers and drainers in episodes, with the test checking in between."""

    def __init__(self, writers: int, drainers: int) -> None:
        self.start = threading.Barrier(writers + drainers + 1, timeout=30)
        self.written = threading.Barrier(writers + 1, timeout=30)
        self.end = threading.Barrier(writers + drainers + 1, timeout=30)
        self.stop = threading.Event()
        #: Set while an episode's bulk pass runs: the writers go on writing until it ends.
        self.passing = threading.Event()

    def abort(self) -> None:
        for barrier in (self.start, self.written, self.end):
            barrier.abort()


def write_in_episodes(gate: Gate, seed: int, writer: int, family: str, stats: Counter) -> None:
    """One transaction per episode, started with the other writers' at the same moment (and
    more, up to :data:`PASSING`, while the episode's bulk pass runs)."""
    rows = Rows(random.Random(f"{seed}-{writer}"), FAMILIES[family])
    try:
        for episode in range(EPISODES):
            rows.hot = random.Random(f"{seed}/{episode}").choice(rows.images)  # shared
            gate.start.wait()
            one_transaction(rows, stats)
            for _ in range(PASSING):
                if not gate.passing.is_set():
                    break
                one_transaction(rows, stats)
            gate.written.wait()
            gate.end.wait()
    except BaseException:
        gate.abort()
        raise


def drain_in_episodes(gate: Gate, seed: str, stats: Counter, recompute_now: bool) -> None:
    """Single-mark batches while an episode's writers run."""
    rng = random.Random(seed)
    try:
        for _ in range(EPISODES):
            gate.start.wait()
            while not gate.stop.is_set():
                drain_once(rng, stats, recompute_now)
            gate.end.wait()
    except BaseException:
        gate.abort()
        raise


def run_history(seed: int, writers: int = 3, drainers: int = 3) -> tuple[Counter, Counter]:
    """Run the threads to the end; returns what the writers and the drainers did, summed."""
    done = threading.Event()
    wrote, drained = [Counter() for _ in range(writers)], [Counter() for _ in range(drainers)]
    draining = [
        Loop(drain_singly, done, drained[k], k == 0, f"{seed}:{k}") for k in range(drainers)
    ]
    writing = [Loop(write, seed, k, STEPS, wrote[k]) for k in range(writers)]
    for thread in draining + writing:
        thread.start()
    try:
        for thread in writing:
            thread.finish()
    finally:
        done.set()
        for thread in draining:
            thread.finish()
    return sum(wrote, Counter()), sum(drained, Counter())


def seeds(spec: str) -> list[int]:
    """``"1-3,7"`` -> ``[1, 2, 3, 7]``."""
    found: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        found.extend(range(int(first), int(last or first) + 1))
    return found


@pytest.mark.parametrize("seed", seeds(SEEDS))
def test_random_concurrent_histories_converge_to_the_truth(make_world, seed):
    """CONCURRENT PROPERTY TEST (seeded; the thread interleaving is not reproducible)."""
    world = make_world()
    grow_world(world)
    drain_to_empty()
    assert_all_counts_exact()
    assert_invariants()
    wrote, drained = run_history(seed)
    assert wrote["committed"] >= STEPS, wrote  # most transactions went through
    assert drained["marks"] > 0, drained  # the drainers raced the writers
    drain_to_empty()
    print(f"seed {seed}: writers {dict(wrote)}; drains {dict(drained)}")  # shown on failure
    assert_all_counts_exact()
    assert_invariants()


#: Episodes per seed of the episode test.
EPISODES = int(os.environ.get("HISTORY_EPISODES", "25"))
#: Most transactions a writer adds to an episode while its bulk pass runs.
PASSING = 8


def run_episodes(
    seed: int, family: str, writers: int = 3, drainers: int = 3, bulk: Bulk | None = None
):
    """``EPISODES`` bursts: all writers start one transaction at once while the drainers take
    single marks (and, given ``bulk``, one bulk pass runs: :func:`bulk_in_episodes`); then
    everything waits while the test drains to empty and compares.

    A count one off after a burst is seen at once, before a later write to the same row can
    hide it (a recount of that row would repair it; a credited delta would not).
    Returns ``[(episode, mismatches)]`` for the bursts after which counts were wrong, and what
    the writers and the drainers did.
    """
    gate = Gate(writers, drainers + (bulk is not None))
    wrote, drained = [Counter() for _ in range(writers)], [Counter() for _ in range(drainers)]
    threads = [Loop(write_in_episodes, gate, seed, k, family, wrote[k]) for k in range(writers)] + [
        Loop(drain_in_episodes, gate, f"{seed}:{k}", drained[k], k == 0) for k in range(drainers)
    ]
    if bulk is not None:
        threads.append(Loop(bulk_in_episodes, gate, seed, bulk))
    for thread in threads:
        thread.start()
    wrong_after = []
    try:
        for episode in range(EPISODES):
            gate.stop.clear()
            if bulk is not None:
                gate.passing.set()  # until the bulk thread's pass ends
            gate.start.wait()
            gate.written.wait()
            assert_invariants()  # writers committed, drainers still running
            gate.stop.set()
            gate.end.wait()
            drain_to_empty()
            if wrong := mismatches():
                wrong_after.append((episode, wrong))
            assert_invariants()
    except BaseException:
        gate.abort()
        raise
    finally:
        for thread in threads:
            thread.finish()
    return wrong_after, sum(wrote, Counter()), sum(drained, Counter())


@pytest.mark.parametrize("seed", seeds(SEEDS))
@pytest.mark.parametrize(
    "family",
    [
        # Every kind of write. The first engine, whose triggers read a capture's station and
        # sets in the writer's snapshot, failed about one seed in three here.
        "everything",
        # The same bursts without moves and memberships: the control.
        "placement-fixed",
    ],
)
def test_random_concurrent_bursts_leave_every_count_exact_after_each(make_world, family, seed):
    """CONCURRENT PROPERTY TEST, in bursts (seeded; the thread interleaving is not reproducible)."""
    world = make_world()
    grow_world(world)
    drain_to_empty()
    assert_all_counts_exact()
    assert_invariants()
    wrong_after, wrote, drained = run_episodes(seed, family)
    print(f"seed {seed}: writers {dict(wrote)}; drains {dict(drained)}")
    assert wrote["committed"] >= EPISODES, wrote
    assert not wrong_after, (
        f"seed {seed}: counts wrong after {len(wrong_after)} of {EPISODES} bursts, first after"
        f" burst {wrong_after[0][0]}:\n" + "\n".join(wrong_after[0][1])
    )


def test_many_captures_joining_a_set_and_getting_a_first_detection_under_single_mark_drains(
    make_world,
):
    """Case 2 in bulk: per capture, two committed writes (it joins a set; it gets its first
    detection, in either order) while three drainers consume one mark per transaction."""
    world = make_world()
    captures = [
        SourceImage.objects.create(
            deployment=world.d2, event=world.e3, timestamp=T0 + timedelta(minutes=k), path=f"{k}"
        )
        for k in range(24)
    ]
    drain_to_empty()
    done, drained = threading.Event(), [Counter() for _ in range(3)]
    draining = [Loop(drain_singly, done, drained[k], False, str(k)) for k in range(3)]
    for thread in draining:
        thread.start()
    try:
        for k, capture in enumerate(captures):
            writes = [
                lambda c=capture: world.c3.images.add(c),
                lambda c=capture: Detection.objects.create(source_image=c, bbox=BOX),
            ]
            for one in writes if k % 2 else writes[::-1]:
                one()  # autocommit: its own transaction
            time.sleep(0.003)
    finally:
        done.set()
        for thread in draining:
            thread.finish()
    drain_to_empty()
    world.c3.refresh_from_db()
    assert (
        world.c3.source_images_count,
        world.c3.source_images_with_detections_count,
        world.c3.source_images_processed_count,
    ) == (24, 24, 24)
    world.d2.refresh_from_db()
    assert (world.d2.captures_count, world.d2.detections_count) == (25, 25)
    assert_all_counts_exact()
    assert_invariants()


@dataclass
class Bulk:
    """What the bulk passes of a run did, and the drift their reconciles reported."""

    did: Counter = field(default_factory=Counter)
    reported: list[dict] = field(default_factory=list)


def bulk_in_episodes(gate: Gate, seed: int, bulk: Bulk) -> None:
    """One bulk pass per episode, racing the writers and the single-mark drainers: reconcile
    (a repair or a dry run, whose drift reports are kept: with triggers on there is none to
    find), a rebuild of everything or of one model, a new count's backfill run again over
    live rows, or "Recompute now" of every row of a model; small chunks, so that writers
    and drains commit between its transactions. Reconcile and rebuild run on one connection
    or on two side by side (``jobs``, drawn apart so each seed's other draws stay the same)."""
    rng = random.Random(f"{seed}:bulk")
    jobs = random.Random(f"{seed}:jobs")
    specs = sorted((s.target.label, s.name) for s in graph().specs)
    models = [Deployment, Event, SourceImage, SourceImageCollection]
    try:
        for _ in range(EPISODES):
            gate.start.wait()
            chunk = rng.randint(1, 3)
            what = rng.choice(
                ["reconcile", "dry-run", "rebuild", "rebuild-one", "backfill", "recompute"]
            )
            try:
                if what in ("reconcile", "dry-run"):
                    report = counts.reconcile(
                        dry_run=what == "dry-run", chunk=chunk, jobs=jobs.choice([1, 2])
                    )
                    if report.drifted_rows or any(
                        ledger.drifted_rows for ledger in report.ledgers.values()
                    ):
                        bulk.reported.append(report.as_dict())
                elif what == "rebuild":
                    counts.rebuild(chunk=chunk, jobs=jobs.choice([1, 2]))
                elif what == "rebuild-one":
                    counts.rebuild(rng.choice(models), chunk=chunk, jobs=jobs.choice([1, 2]))
                elif what == "backfill":
                    label, name = rng.choice(specs)
                    backfill(label, [name], chunk=chunk)
                else:
                    counts.recompute(rng.choice(models).objects.all())
            except DatabaseError as exc:  # a deadlock victim: its transaction rolled back
                bulk.did[type(exc).__name__] += 1
            else:
                bulk.did[what] += 1
            finally:
                gate.passing.clear()
            gate.end.wait()
    except BaseException:
        gate.abort()
        raise


@pytest.mark.parametrize("seed", seeds(SEEDS))
def test_random_bursts_racing_bulk_passes_leave_every_count_exact_after_each(make_world, seed):
    """CONCURRENT PROPERTY TEST, in bursts, with a bulk pass in each: reconcile, dry-run
    reconcile, rebuild, a backfill run again, "Recompute now" of a whole model, each racing
    three writers and two single-mark drainers. Invariants I, J and M hold while they run,
    counts are exact once drained after each burst, and no reconcile, dry or not, reports
    drift (with every write made through the triggers, there is none)."""
    world = make_world()
    grow_world(world)
    drain_to_empty()
    assert_invariants()
    bulk = Bulk()
    wrong_after, wrote, drained = run_episodes(seed, "everything", drainers=2, bulk=bulk)
    print(f"seed {seed}: writers {dict(wrote)}; drains {dict(drained)}; bulk {dict(bulk.did)}")
    assert wrote["committed"] >= EPISODES, wrote
    assert not wrong_after, (
        f"seed {seed}: counts wrong after {len(wrong_after)} of {EPISODES} bursts, first after"
        f" burst {wrong_after[0][0]}:\n" + "\n".join(wrong_after[0][1])
    )
    assert not bulk.reported, f"seed {seed}: a reconcile reported drift: {bulk.reported[0]}"
