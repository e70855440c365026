"""The taxa list: Antenna's ``/api/v2/taxa/?project_id=``, each taxon with its counted
occurrences in that project, served from the grouped count ``Project.taxa_count`` keeps.

The dataset is ``tests.api_fixtures.build_catalogue``: Vermont has one counted moth and one
counted beetle (and a counted occurrence with no taxon), Panama one counted moth, Empty none.
"""

from __future__ import annotations

import pytest
from django.db import connection

from project.monitoring.models import Occurrence
from tests.api_fixtures import build_catalogue, member
from tests.truth import GROUPED_TRUTH, drain_all

TAXA = "/api/v2/taxa/"


@pytest.fixture
def catalogue(db, client):
    built = build_catalogue()
    client.force_login(member("reader", built.vermont, built.panama, built.empty_project))
    return built


def listed(client, **params) -> list[tuple[str, int]]:
    response = client.get(TAXA, params)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["count"] == len(body["results"])
    return [(row["name"], row["occurrences_count"]) for row in body["results"]]


def grouped_truth(project_id: int) -> dict[str, int]:
    """The project's counted occurrences per taxon name, counted here from the base tables."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT t.name, g.count FROM ({GROUPED_TRUTH}) g(project_id, taxon_id, count)"
            " JOIN monitoring_taxon t ON t.id = g.taxon_id WHERE g.project_id = %s",
            [project_id],
        )
        return dict(cursor.fetchall())


def test_each_project_lists_its_own_taxa_with_its_own_counts(client, catalogue):
    assert listed(client, project_id=catalogue.vermont.pk) == [("Beetle", 1), ("Moth", 1)]
    assert listed(client, project_id=catalogue.panama.pk) == [("Moth", 1)]
    assert listed(client, project_id=catalogue.empty_project.pk) == []
    for project in (catalogue.vermont, catalogue.panama):
        assert dict(listed(client, project_id=project.pk)) == grouped_truth(project.pk)


def test_the_counts_follow_writes_and_a_taxon_leaves_with_its_last_counted_occurrence(
    client, catalogue
):
    for score in (0.8, 0.7):
        Occurrence.objects.create(
            deployment=catalogue.south, determination=catalogue.moth, determination_score=score
        )
    drain_all()
    assert listed(client, project_id=catalogue.vermont.pk, ordering="-occurrences_count") == [
        ("Moth", 3),
        ("Beetle", 1),
    ]
    catalogue.panama.default_filters_score_threshold = 0.5  # Panama's moth (0.4) stops counting
    catalogue.panama.save()
    drain_all()
    assert listed(client, project_id=catalogue.panama.pk) == []
    assert dict(listed(client, project_id=catalogue.vermont.pk)) == grouped_truth(
        catalogue.vermont.pk
    )


def test_ordering_by_count_breaks_ties_by_id_both_ways(client, catalogue):
    up = listed(client, project_id=catalogue.vermont.pk, ordering="occurrences_count")
    down = listed(client, project_id=catalogue.vermont.pk, ordering="-occurrences_count")
    assert up == list(reversed(down))
    assert {name for name, _ in up} == {"Moth", "Beetle"}


@pytest.mark.parametrize(
    "params, parameter",
    [
        ({}, "project_id"),
        ({"project_id": "abc"}, "project_id"),
        ({"project_id": "1", "ordering": "taxa_count"}, "ordering"),
        ({"project_id": "1", "deployment_id": "1"}, "deployment_id"),
    ],
)
def test_a_missing_or_bad_parameter_is_a_400_naming_it(client, catalogue, params, parameter):
    response = client.get(TAXA, params)
    assert response.status_code == 400
    assert parameter in response.content.decode()


def test_a_project_the_caller_may_not_read_is_refused(client, catalogue):
    client.logout()
    assert client.get(TAXA, {"project_id": catalogue.vermont.pk}).status_code == 401
    client.force_login(member("outsider"))
    assert client.get(TAXA, {"project_id": catalogue.vermont.pk}).status_code == 403
    catalogue.vermont.is_public = True
    catalogue.vermont.save()
    assert listed(client, project_id=catalogue.vermont.pk) == [("Beetle", 1), ("Moth", 1)]
