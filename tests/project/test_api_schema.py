"""The served OpenAPI schema is honest: schemathesis fuzzes every endpoint against it.

Requests are generated from ``/api/schema/`` (valid and invalid parameters alike) and sent to
the WSGI application in-process, inside the test's transaction, over a small real dataset, with
the API token of a user who is a member of the projects holding it (so generated ids hit real
rows, other projects' rows and missing ones). Every built-in check runs: no 5xx, status codes
and bodies as documented, invalid input refused, valid input accepted.
"""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings

from project.wsgi import application
from tests.api_fixtures import build_catalogue, member, token_header

#: Examples per endpoint and phase: enough to hit every parameter and bound, quick to run.
MAX_EXAMPLES = 25


#: Loaded at collection, straight from the app (``schemathesis.pytest.from_fixture`` would load
#: it lazily, but reads ``Node._nodeid``, which pytest 9 no longer has).
schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


@pytest.fixture
def dataset(db):
    """A small real dataset behind the endpoints, visible to in-process WSGI requests.

    Django closes "old" connections around each request; through a raw WSGI call that would
    close the test's open transaction. Its test client disconnects the same handler.
    """
    catalogue = build_catalogue()
    reader = member("reader", catalogue.vermont, catalogue.empty_project)  # not Panama
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield {"Authorization": token_header(reader)["HTTP_AUTHORIZATION"]}
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


LISTS = {
    "/api/v2/captures/collections/",
    "/api/v2/deployments/",
    "/api/v2/events/",
    "/api/v2/projects/",
}
#: Lists with no detail (a taxon's count is per project: there is no taxon page of its own).
ONLY_LISTS = {"/api/v2/taxa/"}


def test_schema_documents_every_endpoint_and_its_parameters(client):
    document = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()

    operations = {path: ops["get"] for path, ops in document["paths"].items()}
    assert set(operations) == LISTS | ONLY_LISTS | {f"{path}{{id}}/" for path in LISTS}
    params = {path: {p["name"]: p for p in op["parameters"]} for path, op in operations.items()}
    assert set(params["/api/v2/events/"]) == {
        "limit",
        "offset",
        "ordering",
        "project_id",
        "deployment_id",
        "search",
    }
    assert set(params["/api/v2/projects/"]) == {"limit", "offset", "ordering", "search"}
    taxa = params["/api/v2/taxa/"]
    assert set(taxa) == {"limit", "offset", "ordering", "project_id", "search"}
    assert "-occurrences_count" in taxa["ordering"]["schema"]["items"]["enum"]
    collections = params["/api/v2/captures/collections/"]
    # Several comma-separated keys: an array of known keys, sent unexploded (a,-b).
    ordering = collections["ordering"]
    assert "-source_images_count" in ordering["schema"]["items"]["enum"]
    assert (ordering["style"], ordering["explode"]) == ("form", False)
    # An empty filter (what the browsable API's form sends) is documented as valid input.
    assert all(collections[name]["allowEmptyValue"] for name in ("ordering", "project_id"))
    assert "allowEmptyValue" not in collections["limit"]
    assert collections["limit"]["schema"]["maximum"] == 1000
    lists = [op for path, op in operations.items() if path in LISTS | ONLY_LISTS]
    details = [op for path, op in operations.items() if path not in LISTS | ONLY_LISTS]
    assert all({"200", "400", "401"} <= set(op["responses"]) for op in lists)
    assert all(set(op["responses"]) == {"200", "400", "401", "404"} for op in details)
    assert all(
        [p["name"] for p in op["parameters"]] == ["id"] and p["schema"]["type"] == "integer"
        for op in details
        for p in op["parameters"]
    )
    assert all({"tokenAuth": []} in op["security"] for op in operations.values())


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_schema(case, dataset):
    response = case.call_and_validate(headers=dataset)
    assert response.status_code != 401, "the token was not honoured"
