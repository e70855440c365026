"""The API as a whole: its roots, detail routes, projects, search, multi-key ordering, the
browsable filter form and the Redoc page.

The catalogue (``tests.api_fixtures``): Vermont (capture sets Alpha, Bravo, Charlie, Echo;
stations North, South; nights 1-3), Panama (set Delta; station Canal; night 4), and Empty, all
private unless a test makes one public. Ana belongs to Vermont, Bo to Panama.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from counts.run.marks import mark_all
from project.monitoring.models import Deployment, Event, Project, SourceImageCollection
from tests.api_fixtures import build_catalogue, member

COLLECTIONS = "/api/v2/captures/collections/"
DEPLOYMENTS = "/api/v2/deployments/"
EVENTS = "/api/v2/events/"
PROJECTS = "/api/v2/projects/"
#: List URL -> (model, the catalogue attribute of one Vermont row, of one Panama row).
COUNTED = {
    COLLECTIONS: (SourceImageCollection, "alpha", "delta"),
    DEPLOYMENTS: (Deployment, "north", "canal"),
    EVENTS: (Event, "night1", "night4"),
}


@pytest.fixture
def catalogue(db):
    c = build_catalogue()
    c.alpha, c.delta = c.sets["Alpha"], c.sets["Delta"]
    c.ana = member("ana", c.vermont)
    c.bo = member("bo", c.panama)
    return c


def ok(response) -> dict:
    assert response.status_code == 200, response.content
    return response.json()


def names(response) -> list[str]:
    return [row["name"] for row in ok(response)["results"]]


def make_public(project) -> None:
    Project.objects.filter(pk=project.pk).update(is_public=True)


# --- roots ------------------------------------------------------------------------------------


def test_the_v2_root_links_every_list_without_signing_in(client, db):
    root = ok(client.get("/api/v2/"))

    assert root == {
        "captures/collections": f"http://testserver{COLLECTIONS}",
        "deployments": f"http://testserver{DEPLOYMENTS}",
        "events": f"http://testserver{EVENTS}",
        "projects": f"http://testserver{PROJECTS}",
        "taxa": "http://testserver/api/v2/taxa/",
    }
    page = client.get("/api/v2/", HTTP_ACCEPT="text/html")
    assert page.status_code == 200
    assert b"Api Root" in page.content and PROJECTS.encode() in page.content


def test_the_api_index_links_the_v2_root_and_the_documentation(client, db):
    index = ok(client.get("/api/"))

    assert index["v2"] == "http://testserver/api/v2/"
    assert index["schema"] == "http://testserver/api/schema/"
    assert index["docs"] == "http://testserver/api/docs/"
    assert index["redoc"] == "http://testserver/api/redoc/"


def test_redoc_is_served_locally_and_reads_the_schema(client, db):
    page = client.get("/api/redoc/")

    assert page.status_code == 200
    html = page.content.decode()
    assert '"/api/schema/"' in html
    assert "/static/drf_spectacular_sidecar/redoc/" in html  # not a CDN


# --- details ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", list(COUNTED))
def test_a_detail_is_the_list_row_with_the_same_fields(client, catalogue, url):
    _, vermont_row, _ = COUNTED[url]
    row = getattr(catalogue, vermont_row)
    client.force_login(catalogue.ana)
    mark_all(COUNTED[url][0]._meta.label_lower)  # pending shows on the detail as in the list

    listed = next(r for r in ok(client.get(url, {"limit": 1000}))["results"] if r["id"] == row.pk)
    detail = ok(client.get(f"{url}{row.pk}/"))

    assert detail == listed
    assert detail["counts_pending"] is True
    assert "counts_updated_at" in detail


@pytest.mark.parametrize("url", list(COUNTED))
def test_a_detail_costs_two_queries(client, catalogue, url):
    row = getattr(catalogue, COUNTED[url][1])
    User.objects.filter(pk=catalogue.ana.pk).update(is_superuser=True)
    client.force_login(User.objects.get(pk=catalogue.ana.pk))

    with CaptureQueriesContext(connection) as queries:
        ok(client.get(f"{url}{row.pk}/"))

    own = [q["sql"] or "" for q in queries if "django_session" not in (q["sql"] or "")]
    assert len([sql for sql in own if 'FROM "auth_user"' not in sql]) == 2  # row, exact read


@pytest.mark.parametrize("url", list(COUNTED))
def test_a_detail_of_another_project_is_a_404_like_a_missing_one(client, catalogue, url):
    _, _, panama_row = COUNTED[url]
    client.force_login(catalogue.ana)

    private = client.get(f"{url}{getattr(catalogue, panama_row).pk}/")
    missing = client.get(f"{url}{10**12}/")

    assert private.status_code == missing.status_code == 404
    assert "among the projects you may read" in private.json()["detail"]
    client.force_login(catalogue.bo)
    assert ok(client.get(f"{url}{getattr(catalogue, panama_row).pk}/"))["id"]


@pytest.mark.parametrize("url", list(COUNTED))
def test_an_anonymous_detail_is_public_or_a_401(client, catalogue, url):
    _, vermont_row, panama_row = COUNTED[url]
    make_public(catalogue.panama)

    assert ok(client.get(f"{url}{getattr(catalogue, panama_row).pk}/"))["id"]
    for refused in (getattr(catalogue, vermont_row).pk, 10**12):  # private, missing: the same
        response = client.get(f"{url}{refused}/")
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == "Token"
        assert "authenticate" in response.json()["detail"]


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "1.5", str(2**63), "9" * 5000])
def test_an_id_no_row_can_have_is_a_json_404_not_a_500(client, catalogue, raw):
    client.force_login(catalogue.ana)

    response = client.get(f"{DEPLOYMENTS}{raw}/")

    assert response.status_code == 404
    assert "positive integers" in response.json()["detail"]


def test_a_detail_refuses_list_parameters(client, catalogue):
    client.force_login(catalogue.ana)

    response = client.get(f"{DEPLOYMENTS}{catalogue.north.pk}/", {"limit": "10"})

    assert response.status_code == 400
    assert response.json()["parameter"] == "limit"
    assert ok(client.get(f"{DEPLOYMENTS}{catalogue.north.pk}/", {"format": "json"}))


# --- projects ---------------------------------------------------------------------------------


def test_projects_resolve_the_project_ids_of_other_rows(client, catalogue):
    client.force_login(catalogue.ana)

    body = ok(client.get(PROJECTS))

    assert body["results"] == [
        {
            "id": catalogue.vermont.pk,
            "name": "Vermont",
            "is_public": False,
            "default_filters_score_threshold": 0.5,
        }
    ]
    north = ok(client.get(f"{DEPLOYMENTS}{catalogue.north.pk}/"))
    assert ok(client.get(f"{PROJECTS}{north['project']}/"))["name"] == "Vermont"


def test_projects_are_scoped_like_every_list(client, catalogue):
    make_public(catalogue.panama)

    assert names(client.get(PROJECTS)) == ["Panama"]  # anonymous: public only
    client.force_login(catalogue.ana)
    assert names(client.get(PROJECTS)) == ["Panama", "Vermont"]
    assert client.get(f"{PROJECTS}{catalogue.empty_project.pk}/").status_code == 404
    client.force_login(User.objects.create_superuser("root"))
    assert names(client.get(PROJECTS)) == ["Empty", "Panama", "Vermont"]
    client.logout()
    assert client.get(f"{PROJECTS}{catalogue.vermont.pk}/").status_code == 401


@pytest.mark.parametrize(
    ("param", "value"),
    [("ordering", "threshold"), ("project_id", "1"), ("limit", "0"), ("search", "\x00")],
)
def test_projects_refuse_bad_parameters_naming_them(client, db, param, value):
    response = client.get(PROJECTS, {param: value})

    assert response.status_code == 400
    assert response.json()["parameter"] == param


# --- search and ordering ----------------------------------------------------------------------


def test_search_matches_every_term_in_the_name_ignoring_case(client, catalogue):
    client.force_login(member("reader", catalogue.vermont, catalogue.panama))

    assert names(client.get(COLLECTIONS, {"search": "A"})) == ["Alpha", "Bravo", "Charlie", "Delta"]
    assert names(client.get(COLLECTIONS, {"search": "a h"})) == ["Alpha", "Charlie"]
    assert names(client.get(COLLECTIONS, {"search": "al,ph"})) == ["Alpha"]
    assert names(client.get(DEPLOYMENTS, {"search": "nal"})) == ["Canal"]
    assert names(client.get(PROJECTS, {"search": "mont"})) == ["Vermont"]
    assert ok(client.get(COLLECTIONS, {"search": "zz"}))["count"] == 0


def test_events_search_their_station_name(client, catalogue):
    client.force_login(catalogue.ana)

    found = ok(client.get(EVENTS, {"search": "NORTH"}))

    assert [r["id"] for r in found["results"]] == [catalogue.night1.pk, catalogue.night2.pk]


def test_ordering_takes_several_keys_and_reverses_exactly(client, catalogue):
    client.force_login(member("reader", catalogue.vermont, catalogue.panama))
    rows = Deployment.objects.values_list("pk", "captures_count", "name")
    expected = [pk for pk, _, _ in sorted(rows, key=lambda r: (-r[1], r[2], r[0]))]

    served = ok(client.get(DEPLOYMENTS, {"ordering": "-captures_count,name"}))["results"]
    reverse = ok(client.get(DEPLOYMENTS, {"ordering": "captures_count,-name"}))["results"]

    assert [r["id"] for r in served] == expected
    assert [r["id"] for r in reverse] == expected[::-1]
    # South and Canal tie on captures; `name` puts Canal first where the id alone would not.
    assert expected != [pk for pk, _, _ in sorted(rows, key=lambda r: (-r[1], r[0]))]
    assert names(client.get(PROJECTS, {"ordering": "-name"})) == ["Vermont", "Panama"]


def test_an_unknown_key_in_an_ordering_list_is_named(client, db):
    response = client.get(COLLECTIONS, {"ordering": "name,-popularity"})

    assert response.status_code == 400
    assert response.json()["parameter"] == "ordering"
    assert "'-popularity' is not a sort key" in response.json()["detail"]


# --- the browsable API's filter form ----------------------------------------------------------


def filters_form(html: str) -> str:
    start = html.index('id="filtersModal"')
    return html[start : html.index("</form>", start)]


@pytest.mark.parametrize("url", [*COUNTED, PROJECTS])
def test_the_filter_form_names_each_field(client, catalogue, url):
    client.force_login(catalogue.ana)

    form = filters_form(client.get(url, HTTP_ACCEPT="text/html").content.decode())

    assert "[invalid name]" not in form
    assert '<select name="ordering"' in form
    assert 'value="-name"' in form or 'value="-start"' in form
    assert "<label" in form and ">Ordering:</label>" in form and ">Search:</label>" in form


@pytest.mark.parametrize("url", list(COUNTED))
def test_what_the_filter_form_submits_blank_is_the_default_list(client, catalogue, url):
    client.force_login(catalogue.ana)
    blank = {"ordering": "", "search": "", "project_id": ""}
    if url == EVENTS:
        blank["deployment_id"] = ""

    assert ok(client.get(url, blank)) == ok(client.get(url))


def test_a_refused_list_page_keeps_the_filter_form_with_the_error(client, catalogue):
    client.force_login(catalogue.ana)

    page = client.get(COLLECTIONS, {"ordering": "nope"}, HTTP_ACCEPT="text/html")

    assert page.status_code == 400
    html = page.content.decode()
    assert 'data-target="#filtersModal"' in html  # the Filters button
    assert "is not a sort key" in filters_form(html)  # the error, beside the field
