"""Who reads what through the API: members, superusers, anonymous clients, public projects.

The catalogue has two projects with data, Vermont (capture sets Alpha, Bravo, Charlie, Echo;
stations North, South) and Panama (set Delta; station Canal), both private unless a test makes
one public. Ana belongs to Vermont, Bo to Panama.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from project.monitoring.models import Deployment, Event, Project, SourceImageCollection
from tests.api_fixtures import build_catalogue, member, token_header

COLLECTIONS = "/api/v2/captures/collections/"
DEPLOYMENTS = "/api/v2/deployments/"
EVENTS = "/api/v2/events/"


@pytest.fixture
def catalogue(db):
    c = build_catalogue()
    c.ana = member("ana", c.vermont)
    c.bo = member("bo", c.panama)
    return c


def names(response) -> list[str]:
    assert response.status_code == 200, response.content
    return sorted(r.get("name") or str(r["id"]) for r in response.json()["results"])


def event_ids(response) -> set[int]:
    assert response.status_code == 200, response.content
    return {r["id"] for r in response.json()["results"]}


def test_each_member_lists_only_their_projects_rows(client, catalogue):
    client.force_login(catalogue.ana)
    assert names(client.get(COLLECTIONS)) == ["Alpha", "Bravo", "Charlie", "Echo"]
    assert names(client.get(DEPLOYMENTS)) == ["North", "South"]
    vermont_nights = set(
        Event.objects.filter(deployment__project=catalogue.vermont).values_list("pk", flat=True)
    )
    assert event_ids(client.get(EVENTS)) == vermont_nights

    client.force_login(catalogue.bo)
    assert names(client.get(COLLECTIONS)) == ["Delta"]
    assert names(client.get(DEPLOYMENTS)) == ["Canal"]
    assert event_ids(client.get(EVENTS)) == {catalogue.night4.pk}
    assert client.get(COLLECTIONS).json()["count"] == 1


def test_a_superuser_lists_every_project(client, catalogue):
    client.force_login(User.objects.create_superuser("root"))

    assert client.get(COLLECTIONS).json()["count"] == SourceImageCollection.objects.count()
    assert client.get(DEPLOYMENTS).json()["count"] == Deployment.objects.count()
    assert client.get(EVENTS).json()["count"] == Event.objects.count()


def test_a_user_in_no_project_lists_nothing(client, catalogue):
    client.force_login(member("nobody"))

    for url in (COLLECTIONS, DEPLOYMENTS, EVENTS):
        assert client.get(url).json() == {"count": 0, "next": None, "previous": None, "results": []}


def test_anonymous_clients_read_public_projects_only(client, catalogue):
    assert client.get(COLLECTIONS).json()["count"] == 0  # nothing public yet: nothing to read

    Project.objects.filter(pk=catalogue.panama.pk).update(is_public=True)

    assert names(client.get(COLLECTIONS)) == ["Delta"]
    assert names(client.get(DEPLOYMENTS)) == ["Canal"]
    assert event_ids(client.get(EVENTS)) == {catalogue.night4.pk}
    assert names(client.get(COLLECTIONS, {"project_id": catalogue.panama.pk})) == ["Delta"]


def test_members_also_read_public_projects(client, catalogue):
    Project.objects.filter(pk=catalogue.panama.pk).update(is_public=True)
    client.force_login(catalogue.ana)

    assert names(client.get(DEPLOYMENTS)) == ["Canal", "North", "South"]


@pytest.mark.parametrize(
    ("url", "param", "row"),
    [
        (COLLECTIONS, "project_id", "vermont"),
        (DEPLOYMENTS, "project_id", "vermont"),
        (EVENTS, "project_id", "vermont"),
        (EVENTS, "deployment_id", "north"),
    ],
)
def test_anonymous_request_for_a_private_project_is_a_401(client, catalogue, url, param, row):
    response = client.get(url, {param: getattr(catalogue, row).pk})

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response["WWW-Authenticate"] == "Token"
    assert "authenticate" in response.json()["detail"]


@pytest.mark.parametrize(
    ("url", "param", "row"),
    [
        (COLLECTIONS, "project_id", "panama"),
        (DEPLOYMENTS, "project_id", "panama"),
        (EVENTS, "project_id", "panama"),
        (EVENTS, "deployment_id", "canal"),
    ],
)
def test_a_non_member_naming_a_project_gets_a_403_not_an_empty_page(
    client, catalogue, url, param, row
):
    client.force_login(catalogue.ana)

    response = client.get(url, {param: getattr(catalogue, row).pk})

    assert response.status_code == 403
    assert response.json() == {
        "detail": f"You are not a member of the project of {param.removesuffix('_id')}"
        f" {getattr(catalogue, row).pk}."
    }


def test_an_unknown_id_is_refused_like_a_private_one(client, catalogue):
    client.force_login(catalogue.ana)

    assert client.get(COLLECTIONS, {"project_id": 10**9}).status_code == 403
    client.logout()
    assert client.get(COLLECTIONS, {"project_id": 10**9}).status_code == 401


def test_a_token_authenticates_a_script(client, catalogue):
    response = client.get(DEPLOYMENTS, **token_header(catalogue.bo))

    assert names(response) == ["Canal"]
    assert client.get(DEPLOYMENTS).json()["count"] == 0  # the same request without it


def test_a_wrong_token_is_a_401_not_an_anonymous_read(client, catalogue):
    Project.objects.filter(pk=catalogue.panama.pk).update(is_public=True)

    response = client.get(DEPLOYMENTS, HTTP_AUTHORIZATION="Token not-a-real-key")

    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid token."}


def test_a_script_gets_its_token_with_username_and_password(client, catalogue):
    member("carla", catalogue.panama, password="a long enough password")

    response = client.post(
        "/api/auth/token/", {"username": "carla", "password": "a long enough password"}
    )

    assert response.status_code == 200
    key = response.json()["token"]
    assert names(client.get(COLLECTIONS, HTTP_AUTHORIZATION=f"Token {key}")) == ["Delta"]
    wrong = client.post("/api/auth/token/", {"username": "carla", "password": "guess"})
    assert wrong.status_code == 400


def test_the_browsable_api_signs_in_with_a_session(client, catalogue):
    member("dan", catalogue.vermont, password="a long enough password")

    login = client.post(
        "/api/auth/login/",
        {"username": "dan", "password": "a long enough password", "next": COLLECTIONS},
    )

    assert login.status_code == 302
    page = client.get(COLLECTIONS, HTTP_ACCEPT="text/html")
    assert page.status_code == 200
    assert b"Alpha" in page.content and b"Delta" not in page.content


def test_membership_and_publicity_are_set_in_the_project_admin(client, catalogue):
    client.force_login(User.objects.create_superuser("root"))
    url = f"/admin/monitoring/project/{catalogue.panama.pk}/change/"
    form = {"name": "Panama", "default_filters_score_threshold": 0.3}

    assert client.post(url, {**form, "members": [catalogue.ana.pk]}).status_code == 302
    client.force_login(catalogue.ana)
    assert names(client.get(DEPLOYMENTS)) == ["Canal", "North", "South"]

    client.force_login(User.objects.get(username="root"))
    assert client.post(url, {**form, "is_public": "on"}).status_code == 302  # ana removed
    client.logout()
    assert names(client.get(DEPLOYMENTS)) == ["Canal"]


def test_a_bearer_token_is_read_as_a_token_not_as_an_anonymous_read(client, catalogue):
    key = token_header(catalogue.bo)["HTTP_AUTHORIZATION"].split()[1]

    response = client.get(DEPLOYMENTS, HTTP_AUTHORIZATION=f"Bearer {key}")

    assert names(response) == ["Canal"]


def test_another_scheme_is_a_401_naming_the_one_to_use(client, catalogue):
    Project.objects.filter(pk=catalogue.panama.pk).update(is_public=True)

    response = client.get(DEPLOYMENTS, HTTP_AUTHORIZATION="Basic Ym86cGFzc3dvcmQ=")

    assert response.status_code == 401
    assert "Authorization: Token <key>" in response.json()["detail"]
    assert response["WWW-Authenticate"] == "Token"
