"""The engine's DRF support: a list endpoint with counts, freshness and pending for free.

The view below is all a second app would write: a bare queryset of a counted model, with no
serializer, filter or page hook of its own (``project.monitoring.api`` is not involved).
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIRequestFactory, force_authenticate

from counts.declare.field import cached_count_fields
from counts.run.marks import mark_all
from counts.surfaces.rest import CountedDetailView, CountedListView
from project.monitoring.models import Event
from tests.api_fixtures import build_catalogue
from tests.truth import assert_all_counts_exact, drain_all, truth


class EventCounts(CountedListView):
    queryset = Event.objects.all()


class EventCountsDetail(CountedDetailView):
    queryset = Event.objects.all()


@pytest.fixture
def catalogue(db):
    return build_catalogue()


def get(**params):
    request = APIRequestFactory().get("/events/", params)
    force_authenticate(request, User(username="reader"))
    response = EventCounts.as_view()(request)
    response.render()
    return response


def test_a_bare_queryset_serves_every_count_with_its_freshness(catalogue):
    rows = get(limit=100).data["results"]

    counts = [f.name for f in cached_count_fields(Event)]
    assert counts  # Event has counts, so the check below is not vacuous
    flags = ("counts_pending", "counts_exact", "counts_updated_at")
    assert {tuple(row) for row in rows} == {("id", *counts, *flags)}
    expected = truth("monitoring_event")
    assert {row["id"]: {c: row[c] for c in expected[row["id"]]} for row in rows} == expected
    assert not any(row["counts_pending"] for row in rows)
    assert all(row["counts_exact"] for row in rows)
    assert all(row["counts_updated_at"] for row in rows if any(row[c] for c in counts))
    assert_all_counts_exact()


def test_pending_is_flagged_until_a_worker_has_recomputed(catalogue):
    mark_all("monitoring.event")

    with CaptureQueriesContext(connection) as queries:
        pending = get(limit=100).data["results"]
    assert all(row["counts_pending"] for row in pending)
    # Every row is to be recounted: a read does not recount them all, and says so.
    assert not any(row["counts_exact"] for row in pending)
    assert len(queries) == 3  # count, page, and one exact read of the page

    drain_all()
    assert not any(row["counts_pending"] for row in get(limit=100).data["results"])
    assert_all_counts_exact()


def test_ordering_by_a_count_uses_the_cached_column_with_id_tie_break(catalogue):
    expected = truth("monitoring_event")
    by_captures = sorted(expected, key=lambda pk: (-expected[pk]["captures_count"], -pk))

    served = [row["id"] for row in get(ordering="-captures_count").data["results"]]

    assert served == by_captures
    assert len({expected[pk]["captures_count"] for pk in expected}) > 1
    assert get(ordering="nope").status_code == 400
    assert_all_counts_exact()


def test_a_bare_detail_serves_the_row_as_the_list_does(catalogue):
    mark_all("monitoring.event")
    request = APIRequestFactory().get("/events/1/")
    force_authenticate(request, User(username="reader"))

    response = EventCountsDetail.as_view()(request, pk=catalogue.night1.pk)

    listed = next(r for r in get(limit=100).data["results"] if r["id"] == catalogue.night1.pk)
    assert response.status_code == 200
    assert response.data == listed
    assert response.data["counts_pending"] is True


def test_ordering_takes_several_keys_with_the_id_tie_break_last(catalogue):
    expected = truth("monitoring_event")
    by_captures_then_detections = sorted(
        expected,
        key=lambda pk: (-expected[pk]["captures_count"], -expected[pk]["detections_count"], -pk),
    )

    served = get(ordering="-captures_count,-detections_count").data["results"]

    assert [row["id"] for row in served] == by_captures_then_detections
    assert get(ordering="-captures_count,nope").status_code == 400
