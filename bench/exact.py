"""Section: what exact reads cost a list page, against reading the stored columns (issue 24).

Both through the full stack with ``django.test.Client``, as the list section requests pages:
the production capture-set list (``/api/v2/captures/collections/``, counts read exact by
``counts.run.exact``) against the same view reading stored columns and pending flags only, as
it did before (``bench.views.StoredCollectionList``). The page: a project holding one set of
``--exact-size`` images (the largest the dataset allows, 100k by default) and 24 sets of 100,
25 rows.

Two states, each measured with the two reads alternating (the first read of a repeat rotates),
after six untimed requests of each (:data:`WARMUP`):

- **idle**: no mark pending (goal: exact ≤ 1.1x stored);
- **pending**: 1,000 detections (bbox set) created one per transaction on captures of the
  page's sets, and 100 captures added to its sets one per transaction, not drained: 1,000
  item marks and 100 delta marks waiting (goal: exact ≤ 2x stored, and every row exact and
  equal to counts computed independently in SQL).

Then the writes are undone (the detections deleted, the members removed) and drained, untimed.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db import connection, transaction
from django.test import Client, override_settings

from bench import dataset
from bench.listing import COUNTS, bench_client
from bench.timing import median, ms, ms_list, ratio, stopwatch
from bench.urls import PATHS, STORED
from counts.run.notice import quiet
from project.monitoring.models import Detection, SourceImageCollection

READS = {"stored": STORED, "exact": PATHS["cached"]}
FILLERS, FILLER_SIZE, PAGE = 24, 100, 25
DETECTIONS, MEMBERS = 1000, 100
#: Untimed requests of each read first: PostgreSQL plans a prepared statement for its values
#: five times, then keeps a generic plan (the exact read is one; ``counts.run.exact``), and a
#: connection lives ``CONN_MAX_AGE`` (60 s), so a page in use is read in that steady state.
WARMUP = 6


def setup(size: int) -> dict:
    """A project with one set of ``size`` images and 24 of 100: the page."""
    sample = dataset.sample_images(size + FILLERS * FILLER_SIZE + MEMBERS, salt=3)
    project = dataset.new_project(f"exact {size}")
    names = [f"a set of {size}"] + [f"b filler {i:02d}" for i in range(FILLERS)]
    ids = dataset.new_sets(project, names)
    set_ids, image_ids = [ids[0]] * size, sample[:size]
    for i, set_id in enumerate(ids[1:]):  # (a small dataset: the fillers share captures)
        set_ids += [set_id] * FILLER_SIZE
        start = size + i * FILLER_SIZE
        image_ids += [sample[(start + j) % len(sample)] for j in range(FILLER_SIZE)]
    dataset.add_members(set_ids, image_ids)
    dataset.drain_all()
    dataset.vacuum()
    outsiders = sample[size + FILLERS * FILLER_SIZE :] or sample[-MEMBERS:]
    return {"project": project, "page": ids, "members": image_ids, "outsiders": outsiders}


def _rows(response) -> dict[int, tuple]:
    assert response.status_code == 200, response.content
    return {r["id"]: tuple(r[c] for c in COUNTS) for r in response.json()["results"]}


def _sample(client: Client, query: dict, repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in READS}
    names = list(READS)
    for _ in range(WARMUP):
        for name in names:
            client.get(READS[name], query)
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            with stopwatch() as sw:
                client.get(READS[name], query)
            samples[name].append(sw.seconds)
    return samples


def _pending_writes(info: dict) -> list[int]:
    """1,000 single-row detection creates on the page's captures, 100 single-row member adds;
    returns the detections' ids."""
    members, created = info["members"], []
    step = max(1, len(members) // DETECTIONS)
    with quiet():
        for image in members[::step][:DETECTIONS]:
            with transaction.atomic():
                d = Detection.objects.create(
                    source_image_id=image, bbox=[1, 1, 2, 2], score=dataset.BENCH_SCORE
                )
            created.append(d.pk)
        sets = SourceImageCollection.objects.filter(pk__in=info["page"]).order_by("pk")
        for i, image in enumerate(info["outsiders"][:MEMBERS]):
            sets[i % len(sets)].images.add(image)
    return created


def _undo(info: dict) -> None:
    with quiet():
        Detection.objects.filter(score=dataset.BENCH_SCORE).delete()
        through = SourceImageCollection.images.through
        through.objects.filter(
            sourceimagecollection_id__in=info["page"],
            sourceimage_id__in=info["outsiders"][:MEMBERS],
        ).delete()
    dataset.drain_all()
    dataset.vacuum()


def _marks() -> dict[str, int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE target LIKE 'item:%%'),"
            " count(*) FILTER (WHERE deltas IS NOT NULL) FROM counts_dirtymark"
        )
        items, deltas = cursor.fetchone()
    return {"item_marks": items, "delta_marks": deltas}


def measure(size: int, repeats: int, log: Callable[[str], None]) -> dict:
    info = setup(size)
    client = bench_client()
    query = {"project_id": info["project"], "limit": PAGE}
    overrides = {"ROOT_URLCONF": "bench.urls", "DEBUG": False, "ALLOWED_HOSTS": ["testserver"]}
    out: dict = {"size": size, "page_size": PAGE, "repeats": repeats}
    try:
        with override_settings(**overrides):
            for state in ("idle", "pending"):
                if state == "pending":
                    _pending_writes(info)
                row: dict = _marks()
                samples = _sample(client, query, repeats)
                response = client.get(READS["exact"], query)
                served = _rows(response)
                exact_flags = [r["counts_exact"] for r in response.json()["results"]]
                truth = dataset.set_counts(info["page"], truth=True)
                occurrences = dataset.set_occurrence_counts(info["page"])
                want = {pk: (*truth[pk], *occurrences[pk]) for pk in info["page"]}
                medians = {name: median(s) for name, s in samples.items()}
                row.update(
                    rows_on_page=len(served),
                    exact=served == want and all(exact_flags),
                    stored_ms=ms(medians["stored"]),
                    exact_ms=ms(medians["exact"]),
                    ratio=round(ratio(medians["exact"], medians["stored"]), 3),
                    samples_ms={name: ms_list(s) for name, s in samples.items()},
                )
                out[state] = row
                log(
                    f"exact reads, {state}: stored {row['stored_ms']:.1f} ms, exact"
                    f" {row['exact_ms']:.1f} ms ({row['ratio']:.2f}x), {row['item_marks']} item"
                    f" and {row['delta_marks']} delta marks"
                    + ("" if row["exact"] else "  (NOT EXACT)")
                )
    finally:
        _undo(info)
    return out
