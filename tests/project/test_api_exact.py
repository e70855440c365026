"""The list endpoints serve counts exact right after each commit, before any worker runs.

From outside the engine: no worker runs and nothing is drained. Each write commits for real
(``transaction=True``) through one path — ORM, bulk, M2M from both sides, raw SQL from another
connection, a threshold change, a capture moved — then the three counted lists are read through
the API and every count compared with the truth computed from the base tables
(``tests.truth``), every row saying ``counts_exact``. ``counts.exact()`` is read the same way.
"""

from __future__ import annotations

import pytest

import counts
from counts.declare.field import cached_count_fields
from project.monitoring.models import (
    Deployment,
    Detection,
    Event,
    Project,
    SourceImage,
    SourceImageCollection,
)
from tests.api_fixtures import build_catalogue, member
from tests.interleave import connect
from tests.truth import assert_all_counts_exact, drain_all, mismatches, truth

pytestmark = pytest.mark.django_db(transaction=True)

LISTS = {
    "/api/v2/captures/collections/": SourceImageCollection,
    "/api/v2/deployments/": Deployment,
    "/api/v2/events/": Event,
}


@pytest.fixture
def catalogue(client):
    built = build_catalogue()
    client.force_login(member("reader", built.vermont, built.panama, built.empty_project))
    return built


def assert_served_exact(client) -> None:
    """Every row of every counted list, through the API and through ``counts.exact()``."""
    for url, model in LISTS.items():
        want = truth(model._meta.db_table)
        names = {f.column: f.name for f in cached_count_fields(model)}
        response = client.get(url, {"limit": 100})
        assert response.status_code == 200, response.content
        for row in response.json()["results"]:
            assert row["counts_exact"], (url, row)
            assert {c: row[names[c]] for c in want[row["id"]]} == want[row["id"]], (url, row)
        for obj in counts.exact(model.objects.all()):
            assert obj.counts_exact
            assert {c: getattr(obj, names[c]) for c in want[obj.pk]} == want[obj.pk]


def test_each_committed_write_is_served_exact_before_any_worker(client, catalogue):
    c = catalogue
    north = list(SourceImage.objects.filter(deployment=c.north).order_by("pk"))
    alpha, bravo = (SourceImageCollection.objects.get(name=n) for n in ("Alpha", "Bravo"))
    box = {"x": 1, "y": 1, "w": 2, "h": 2}

    Detection.objects.create(source_image=north[5], bbox=box, score=0.9)  # ORM
    assert_served_exact(client)
    Detection.objects.bulk_create(
        [Detection(source_image=img, bbox=box, score=0.5) for img in north[3:5]]
    )
    assert_served_exact(client)
    bravo.images.add(north[5])  # M2M, the set's side
    north[0].collections.remove(alpha)  # M2M, the capture's side
    assert_served_exact(client)
    with connect(autocommit=True) as other:  # raw SQL from another connection
        other.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, score, created_at,"
            " updated_at) VALUES (%s, '{\"x\": 0}', 0.7, now(), now())",
            [north[1].pk],
        )
        other.execute(
            "DELETE FROM monitoring_sourceimagecollection_images"
            " WHERE sourceimagecollection_id = %s AND sourceimage_id = %s",
            [alpha.pk, north[2].pk],
        )
    assert_served_exact(client)
    Project.objects.filter(pk=c.vermont.pk).update(default_filters_score_threshold=0.35)
    assert_served_exact(client)
    SourceImage.objects.filter(pk=north[2].pk).update(deployment=c.south, event=c.night3)
    assert_served_exact(client)
    Detection.objects.filter(source_image=north[0]).delete()
    assert_served_exact(client)

    assert mismatches(), "the premise: stored counts lag (nothing was drained)"
    drain_all()
    assert_all_counts_exact()
    assert_served_exact(client)
