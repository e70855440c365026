"""Section 1: what a capture-set list page costs, cached columns against per-request counting.

For each collection size (1k, 10k, 100k, 500k — those the dataset can fill) the bench makes a
project holding one set of that size plus 24 sets of 100 images, so a page of 25 is full and
its cost is dominated by the big set, as on a real project with one huge set among small ones.
Members are a hash-ordered sample of all captures (see :func:`bench.dataset.sample_images`).

Each page is requested with ``django.test.Client`` through the full stack: the production view
for cached counts, and the two bench-only views of :mod:`bench.views` for the annotations.
Requests rotate between the three approaches within every repeat, so drift in the machine's
state (autovacuum, page cache) falls on all of them alike; one untimed request per approach and
size warms the caches first. The three pages must agree with each other and with counts
computed independently in SQL, or the figures are reported as not comparable.
"""

from __future__ import annotations

import random

from django.test import Client, override_settings

from bench import dataset
from bench.timing import median, ms, ms_list, ratio, stopwatch
from bench.urls import PATHS

APPROACHES = tuple(PATHS)
#: Small sets that fill the rest of the page around the big one.
FILLERS, FILLER_SIZE = 24, 100
PAGE = 25
#: The counts a capture-set row serves, in the order the truth lists them.
COUNTS = (
    "source_images_count",
    "source_images_with_detections_count",
    "source_images_processed_count",
    "occurrences_count",
    "taxa_count",
)


def setup(sizes: list[int]) -> dict[int, dict]:
    """One project per size; returns ``{size: {"project": id, "set": id, "page": [ids]}}``."""
    sample = dataset.sample_images(max(sizes), salt=1)
    made: dict[int, dict] = {}
    for size in sizes:
        project = dataset.new_project(f"list {size}")
        names = [f"a set of {size}"] + [f"b filler {i:02d}" for i in range(FILLERS)]
        ids = dataset.new_sets(project, names)
        filler = min(FILLER_SIZE, len(sample))
        set_ids, image_ids = [ids[0]] * size, sample[:size]
        for i, set_id in enumerate(ids[1:]):
            set_ids += [set_id] * filler
            image_ids += [sample[(i * filler + j) % len(sample)] for j in range(filler)]
        dataset.add_members(set_ids, image_ids)
        made[size] = {"project": project, "set": ids[0], "page": ids}
    dataset.drain_all()
    dataset.vacuum()
    return made


def bench_client() -> Client:
    """A test client with a client address of its own, drawn from 198.18.0.0/15 (reserved for
    benchmarks, RFC 2544). The API limits anonymous requests per address in Redis, shared by
    every process: a second run within a minute from 127.0.0.1 was answered 429."""
    address = f"198.{random.randint(18, 19)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    return Client(REMOTE_ADDR=address)


def _page(response) -> list[tuple]:
    return [(row["id"], *(row[c] for c in COUNTS)) for row in response.json()["results"]]


def measure(made: dict[int, dict], repeats: int, log) -> dict:
    """Median page latency per approach and size, with the speed-up of cached counts."""
    client = bench_client()
    out: dict = {"page_size": PAGE, "repeats": repeats, "sizes": []}
    overrides = {"ROOT_URLCONF": "bench.urls", "DEBUG": False, "ALLOWED_HOSTS": ["testserver"]}
    with override_settings(**overrides):
        for size, info in made.items():
            query = {"project_id": info["project"], "limit": PAGE}
            pages = {}
            for approach in APPROACHES:  # warm-up, and the answers to compare
                response = client.get(PATHS[approach], query)
                if response.status_code != 200:
                    raise RuntimeError(f"{approach} list answered {response.status_code}")
                pages[approach] = _page(response)
            samples: dict[str, list[float]] = {a: [] for a in APPROACHES}
            for rep in range(repeats):
                shift = rep % len(APPROACHES)
                for approach in APPROACHES[shift:] + APPROACHES[:shift]:
                    with stopwatch() as sw:
                        client.get(PATHS[approach], query)
                    samples[approach].append(sw.seconds)
            truth = dataset.set_counts(info["page"], truth=True)
            occurrences = dataset.set_occurrence_counts(info["page"])
            expected = sorted((pk, *truth[pk], *occurrences[pk]) for pk in info["page"])
            agree = all(sorted(p) == expected for p in pages.values())
            medians = {a: median(s) for a, s in samples.items()}
            row = {
                "size": size,
                "rows_on_page": len(pages["cached"]),
                "agree": agree,
                **{f"{a}_ms": ms(medians[a]) for a in APPROACHES},
                "subquery_ratio": round(ratio(medians["subquery"], medians["cached"]), 2),
                "count_distinct_ratio": round(
                    ratio(medians["count_distinct"], medians["cached"]), 2
                ),
                "samples_ms": {a: ms_list(s) for a, s in samples.items()},
            }
            out["sizes"].append(row)
            log(
                f"list {size:>7,}: cached {row['cached_ms']:.1f} ms, subquery"
                f" {row['subquery_ms']:.1f} ms, count-distinct {row['count_distinct_ms']:.1f} ms"
                + ("" if agree else "  (PAGES DISAGREE)")
            )
    cached = [r["cached_ms"] for r in out["sizes"]]
    out["agree"] = all(r["agree"] for r in out["sizes"])
    out["cached_flatness"] = round(ratio(max(cached), min(cached)), 2) if cached else None
    return out
