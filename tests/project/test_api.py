"""The read-only list endpoints: shape, exact counts, freshness, ordering, filters, bad input.

Everything runs against the real PostgreSQL with the count triggers installed; counts are made
exact by draining the real mark queue, and compared with hand-written SQL (``tests.truth``).
Requests come from a signed-in member of every project (who is and is not allowed what:
``test_api_access``); malformed requests are sent anonymously, since they must be refused
before any query, authentication included.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from counts.declare.field import cached_count_fields
from counts.run.marks import mark_all
from project.monitoring.models import (
    Deployment,
    Event,
    SourceImage,
    SourceImageCollection,
)
from tests.api_fixtures import T0, build_catalogue, member
from tests.truth import drain_all, triggers_off, truth

COLLECTIONS = "/api/v2/captures/collections/"
DEPLOYMENTS = "/api/v2/deployments/"
EVENTS = "/api/v2/events/"
#: Endpoint -> (model, its non-count sort keys as {public name: model attribute}).
ENDPOINTS = {
    COLLECTIONS: (SourceImageCollection, {"name": "name", "created": "created_at"}),
    DEPLOYMENTS: (Deployment, {"name": "name", "created": "created_at"}),
    EVENTS: (Event, {"start": "start", "created": "created_at"}),
}


def sign_in_member_of_all(client, catalogue) -> None:
    reader = member("reader", catalogue.vermont, catalogue.panama, catalogue.empty_project)
    client.force_login(reader)


@pytest.fixture
def catalogue(db, client):
    """The dataset, and ``client`` signed in as a member of its three projects."""
    built = build_catalogue()
    sign_in_member_of_all(client, built)
    return built


def get_ok(client, url, **params) -> dict:
    response = client.get(url, params)
    assert response.status_code == 200, response.content
    return response.json()


def ids(body: dict) -> list[int]:
    return [row["id"] for row in body["results"]]


def test_collection_list_has_the_documented_shape(client, catalogue):
    body = get_ok(client, COLLECTIONS, limit=2)

    assert set(body) == {"count", "next", "previous", "results"}
    assert body["count"] == 5
    assert body["previous"] is None
    assert body["next"].endswith(f"{COLLECTIONS}?limit=2&offset=2")
    alpha = body["results"][0]
    documented = {
        "id": catalogue.sets["Alpha"].pk,
        "name": "Alpha",
        "project": catalogue.vermont.pk,
        "source_images_count": 6,
        "source_images_with_detections_count": 2,
        "source_images_processed_count": 3,
        "counts_pending": False,
        "counts_exact": True,
        "counts_updated_at": alpha["counts_updated_at"],
    }
    assert {k: alpha[k] for k in documented if k in alpha} == documented
    # Anything more is a count declared since: every cached count is served.
    declared = {f.name for f in cached_count_fields(SourceImageCollection)}
    assert set(alpha) - set(documented) == declared - set(documented)
    assert alpha["counts_updated_at"] is not None


def test_a_set_whose_counts_never_changed_has_no_update_time(client, catalogue):
    charlie = next(r for r in get_ok(client, COLLECTIONS)["results"] if r["name"] == "Charlie")

    assert charlie["source_images_count"] == 0
    assert charlie["counts_updated_at"] is None


@pytest.mark.parametrize("url", list(ENDPOINTS))
def test_counts_served_equal_an_independent_truth(client, catalogue, url):
    model, _ = ENDPOINTS[url]
    expected = truth(model._meta.db_table)

    served = {
        row["id"]: {field: row[field] for field in expected[row["id"]]}
        for row in get_ok(client, url, limit=1000)["results"]
    }

    assert served == expected
    assert any(value for counts in expected.values() for value in counts.values())


def test_deployment_counts_follow_the_project_threshold(client, catalogue):
    rows = {r["name"]: r for r in get_ok(client, DEPLOYMENTS)["results"]}

    assert rows["North"]["occurrences_count"] == 3  # 0.9, 0.6, 0.95 reach 0.5; 0.4 does not
    assert rows["North"]["taxa_count"] == 2
    assert rows["Canal"]["occurrences_count"] == 1  # 0.4 reaches Panama's 0.3
    assert rows["South"]["occurrences_count"] == 0  # a missing score never counts


def test_pages_walk_every_row_once(client, catalogue):
    seen, url, params = [], COLLECTIONS, {"limit": 2}
    while url:
        body = client.get(url, params).json()
        seen += ids(body)
        url, params = body["next"], None

    assert sorted(seen) == sorted(c.pk for c in catalogue.sets.values())
    assert len(seen) == len(set(seen))
    last = get_ok(client, COLLECTIONS, limit=2, offset=4)
    assert last["next"] is None
    assert last["previous"].endswith(f"{COLLECTIONS}?limit=2&offset=2")


def test_offset_past_the_end_is_an_empty_page_with_the_full_count(client, catalogue):
    body = get_ok(client, COLLECTIONS, offset=2**31 - 1, limit=1000)

    assert body["count"] == 5
    assert body["results"] == []


def _sort_keys(url) -> list[tuple[str, str]]:
    model, plain = ENDPOINTS[url]
    counted = [f.name for f in cached_count_fields(model)]
    return [*plain.items(), *((n, n) for n in counted), ("counts_updated_at", "counts_updated_at")]


ORDERINGS = [(url, name, attr) for url in ENDPOINTS for name, attr in _sort_keys(url)]
#: The counts DESIGN names, per model; the catalogue is built so each of them sorts its rows apart.
DOCUMENTED_COUNTS = {
    "monitoring.sourceimagecollection": {
        "source_images_count",
        "source_images_with_detections_count",
        "source_images_processed_count",
    },
    "monitoring.deployment": {
        "events_count",
        "captures_count",
        "detections_count",
        "occurrences_count",
        "taxa_count",
    },
    "monitoring.event": {"captures_count", "detections_count", "occurrences_count"},
}


@pytest.mark.parametrize(
    ("url", "name", "attr"), ORDERINGS, ids=[f"{u}{n}" for u, n, _ in ORDERINGS]
)
def test_ordering_sorts_both_ways_with_id_tie_break(client, catalogue, url, name, attr):
    model, _ = ENDPOINTS[url]
    if name == "counts_updated_at":
        # One test is one transaction, so every drain stamped the same now(): spread them
        # (with triggers off: only the engine may write freshness otherwise).
        with triggers_off():
            for n, pk in enumerate(model.objects.order_by("-pk").values_list("pk", flat=True)):
                stamp = None if n == 1 else T0 + timedelta(hours=n % 3)
                model.objects.filter(pk=pk).update(counts_updated_at=stamp)
    values = dict(model.objects.values_list("pk", attr))
    # PostgreSQL puts NULLs last ascending; a descending sort is the exact reverse.
    ascending = sorted(values, key=lambda pk: (values[pk] is None, values[pk] or 0, pk))
    if name in {"name", "start", "created"}:
        ascending = sorted(values, key=lambda pk: (values[pk], pk))

    assert ids(get_ok(client, url, ordering=name, limit=1000)) == ascending
    assert ids(get_ok(client, url, ordering=f"-{name}", limit=1000)) == ascending[::-1]
    documented = {
        *DOCUMENTED_COUNTS[model._meta.label_lower],
        *ENDPOINTS[url][1],
        "counts_updated_at",
    }
    if len(set(values.values())) == 1 and name not in documented:
        pytest.skip(f"the catalogue has no two {name} values apart: nothing to sort")
    assert len(set(values.values())) > 1, "a sort over equal values proves nothing"


def test_default_orders_are_by_name_and_by_start(client, catalogue):
    assert [r["name"] for r in get_ok(client, COLLECTIONS)["results"]] == sorted(catalogue.sets)
    starts = [r["start"] for r in get_ok(client, EVENTS)["results"]]
    assert starts == sorted(starts)


def test_collections_filter_by_project(client, catalogue):
    body = get_ok(client, COLLECTIONS, project_id=catalogue.panama.pk)

    assert body["count"] == 1
    assert [r["name"] for r in body["results"]] == ["Delta"]
    assert get_ok(client, COLLECTIONS, project_id=catalogue.empty_project.pk)["count"] == 0


def test_deployments_filter_by_project(client, catalogue):
    body = get_ok(client, DEPLOYMENTS, project_id=catalogue.vermont.pk, ordering="name")

    assert [r["name"] for r in body["results"]] == ["North", "South"]


def test_events_filter_by_deployment_and_by_project(client, catalogue):
    by_station = get_ok(client, EVENTS, deployment_id=catalogue.north.pk)
    by_project = get_ok(client, EVENTS, project_id=catalogue.vermont.pk)
    both = get_ok(client, EVENTS, project_id=catalogue.panama.pk, deployment_id=catalogue.north.pk)

    assert ids(by_station) == [catalogue.night1.pk, catalogue.night2.pk]
    assert ids(by_project) == [catalogue.night1.pk, catalogue.night2.pk, catalogue.night3.pk]
    assert both["count"] == 0


def test_pending_flag_shows_exactly_the_rows_waiting_for_a_worker(client, catalogue):
    bravo = catalogue.sets["Bravo"]
    # As if their counts last changed long ago (now() is fixed within one test transaction).
    with triggers_off():
        SourceImageCollection.objects.update(counts_updated_at=T0)
    before = {r["name"]: r for r in get_ok(client, COLLECTIONS)["results"]}
    new = SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="new.jpg")
    bravo.images.add(new)

    waiting = {r["name"]: r for r in get_ok(client, COLLECTIONS)["results"]}
    assert waiting["Bravo"]["counts_pending"] is True
    # Exact before any worker ran: the new member is counted, and says so.
    assert waiting["Bravo"]["source_images_count"] == 3 and waiting["Bravo"]["counts_exact"]
    assert SourceImageCollection.objects.get(pk=bravo.pk).source_images_count == 2  # stored
    assert not any(r["counts_pending"] for name, r in waiting.items() if name != "Bravo")

    drain_all()
    after = {r["name"]: r for r in get_ok(client, COLLECTIONS)["results"]}
    assert after["Bravo"]["counts_pending"] is False
    assert after["Bravo"]["source_images_count"] == 3
    assert after["Bravo"]["counts_updated_at"] > before["Bravo"]["counts_updated_at"]
    assert after["Echo"]["counts_updated_at"] == before["Echo"]["counts_updated_at"]


def test_an_every_row_mark_makes_every_row_of_that_model_pending(client, catalogue):
    mark_all("monitoring.deployment")

    assert all(r["counts_pending"] for r in get_ok(client, DEPLOYMENTS)["results"])
    assert not any(r["counts_pending"] for r in get_ok(client, EVENTS)["results"])


@pytest.mark.parametrize("url", list(ENDPOINTS))
def test_query_count_does_not_grow_with_the_page(client, db, url):
    catalogue = build_catalogue()
    sign_in_member_of_all(client, catalogue)
    for n in range(30):  # enough rows that limit=25 fills a page
        Event.objects.create(deployment=catalogue.north, start=T0)
        Deployment.objects.create(project=catalogue.vermont, name=f"D{n}")
        SourceImageCollection.objects.create(project=catalogue.vermont, name=f"S{n}")
    mark_all("monitoring.event")  # some rows pending: the probe must still be one query

    with CaptureQueriesContext(connection) as one:
        assert len(get_ok(client, url, limit=1)["results"]) == 1
    with CaptureQueriesContext(connection) as page:
        assert len(get_ok(client, url, limit=25)["results"]) == 25

    assert len(page) == len(one)
    # (A prepared statement's text is not logged: the exact read's entry has none.)
    listing = [q["sql"] or "" for q in page if "django_session" not in (q["sql"] or "")]
    listing = [sql for sql in listing if 'FROM "auth_user"' not in sql]
    assert len(listing) == 3  # count, page (both scoped by a subquery), the exact read


BAD_PARAMETERS = [
    (COLLECTIONS, "ordering", "popularity"),
    (COLLECTIONS, "ordering", "name,"),  # an empty key in a list: not "default"
    (COLLECTIONS, "ordering", "--name"),
    (COLLECTIONS, "ordering", "name,popularity"),  # one unknown key refuses the whole list
    (COLLECTIONS, "ordering", "name, created"),  # keys are exact: no spaces
    (COLLECTIONS, "ordering", "start"),  # an events key, not a collections one
    (EVENTS, "ordering", "name"),
    (COLLECTIONS, "project_id", "abc"),
    (COLLECTIONS, "project_id", " "),  # blank is not empty
    (COLLECTIONS, "project_id", "1.5"),
    (COLLECTIONS, "project_id", "-1"),
    (COLLECTIONS, "project_id", "0"),
    (COLLECTIONS, "project_id", "+1"),
    (COLLECTIONS, "project_id", " 1"),
    (COLLECTIONS, "project_id", "1_000"),
    (COLLECTIONS, "project_id", "\u0661"),  # ARABIC-INDIC DIGIT ONE: int() would take it
    (COLLECTIONS, "project_id", str(2**63)),  # past bigint: PostgreSQL would raise
    (COLLECTIONS, "project_id", "9" * 5000),  # past Python's int() digit limit
    (DEPLOYMENTS, "project_id", "x"),
    (EVENTS, "deployment_id", "x"),
    (EVENTS, "project_id", "-3"),
    (COLLECTIONS, "limit", "0"),
    (COLLECTIONS, "limit", "-1"),
    (COLLECTIONS, "limit", "1001"),
    (COLLECTIONS, "limit", "ten"),
    (COLLECTIONS, "limit", str(10**30)),
    (DEPLOYMENTS, "limit", ""),
    (COLLECTIONS, "offset", "-1"),
    (COLLECTIONS, "offset", "x"),
    (COLLECTIONS, "offset", str(2**31)),
    (EVENTS, "offset", str(10**40)),
    (COLLECTIONS, "page", "2"),  # this API pages with offset: not silently the first page
    (COLLECTIONS, "project", "1"),
    (EVENTS, "q", "moth"),
    (COLLECTIONS, "search", "a\x00b"),  # PostgreSQL text cannot hold a NUL: not a 500
    (COLLECTIONS, "project_id", ["1", "2"]),  # repeated: not silently the last one
    (EVENTS, "ordering", ["start", "-start"]),
    (DEPLOYMENTS, "limit", ["10", "10"]),
]


@pytest.mark.parametrize(("url", "param", "value"), BAD_PARAMETERS)
def test_bad_parameter_is_a_400_naming_it_before_any_query(client, db, url, param, value):
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url, {param: value})

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["parameter"] == param
    assert body["detail"].startswith(param)
    assert len(queries) == 0


def test_the_format_override_is_accepted_besides_the_documented_parameters(client, catalogue):
    response = client.get(COLLECTIONS, {"format": "json", "limit": 1})

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"


@pytest.mark.parametrize("value", ["true", "false"])
def test_antennas_with_counts_is_accepted_and_changes_nothing(client, catalogue, value):
    """Antenna's clients send ``with_counts=true`` to the capture-set list: answered like the
    plain list (counts are always there), not refused as an unknown parameter."""
    plain = get_ok(client, COLLECTIONS, project_id=catalogue.vermont.pk)
    asked = get_ok(client, COLLECTIONS, project_id=catalogue.vermont.pk, with_counts=value)
    assert asked == plain and asked["results"][0]["source_images_count"] >= 0


def test_a_with_counts_that_is_not_a_boolean_is_a_400_naming_it(client, catalogue):
    response = client.get(COLLECTIONS, {"with_counts": "sometimes"})
    assert response.status_code == 400
    assert response.json()["parameter"] == "with_counts"


def test_the_largest_page_is_accepted(client, catalogue):
    assert len(get_ok(client, COLLECTIONS, limit=1000)["results"]) == 5


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_the_api_is_read_only(client, catalogue, method):
    response = getattr(client, method)(COLLECTIONS, {}, content_type="application/json")

    assert response.status_code == 405
    assert SourceImageCollection.objects.count() == 5
