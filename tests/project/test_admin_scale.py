"""Admin pages that must not load a relation whole, and admins that get counts without code.

- Deleting a project (or anything with a large cascade) confirms with counts per model, equal
  to what Django's own collector finds, without listing (or loading) every object.
- A capture set's page shows its members as a count, a first page and a link to the paginated
  capture list filtered to the set; the form never loads every member id.
- A model with counts registered with a plain ``ModelAdmin`` gets the count columns, freshness
  and "Recompute now" from ``counts.admin.augment``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.admin.utils import get_deleted_objects
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import path

from counts.admin import CachedCountsMixin, augment
from counts.declare.field import cached_count_fields
from project.monitoring.models import (
    Detection,
    Event,
    Project,
    SourceImage,
    SourceImageCollection,
)
from tests.api_fixtures import T0, build_catalogue, drift
from tests.project.test_admin import ChangeList, messages_of, run_action, staff
from tests.truth import assert_all_counts_exact, drain_all, truth

#: Captures added to station North so that deleting Vermont is a large cascade.
EXTRA_CAPTURES = 300


@pytest.fixture
def catalogue(db):
    return build_catalogue()


@pytest.fixture
def root(client, db):
    client.force_login(User.objects.create_superuser("root"))
    return client


def grow(catalogue) -> list[SourceImage]:
    """300 more captures at North, each with a detection, all in capture set Alpha."""
    images = SourceImage.objects.bulk_create(
        SourceImage(
            deployment=catalogue.north, timestamp=T0 + timedelta(seconds=n), path=f"extra-{n}.jpg"
        )
        for n in range(EXTRA_CAPTURES)
    )
    Detection.objects.bulk_create(Detection(source_image=i, bbox=[1, 2, 3, 4]) for i in images)
    catalogue.sets["Alpha"].images.add(*images)
    drain_all()
    return images


def test_deleting_a_large_project_confirms_with_counts_per_model(root, rf, catalogue):
    grow(catalogue)
    vermont = catalogue.vermont
    request = rf.get("/")
    request.user = User.objects.get(username="root")
    _, django_counts, _, _ = get_deleted_objects([vermont], request, admin.site)

    with CaptureQueriesContext(connection) as queries:
        response = root.get(f"/admin/monitoring/project/{vermont.pk}/delete/")

    assert response.status_code == 200
    shown = {str(k): int(v.replace(",", "")) for k, v in response.context["model_count"]}
    assert shown == {str(k): v for k, v in django_counts.items()}
    assert shown["source images"] == 8 + EXTRA_CAPTURES
    html = response.content.decode()
    assert "extra-7.jpg" not in html  # no capture is listed one by one
    assert f"and {sum(shown.values()) - 1:,} related objects" in html
    assert len(queries) < 40  # a COUNT per model, not a SELECT per object
    assert len(html) < 60_000


def test_confirming_the_summarised_delete_deletes_the_cascade(root, catalogue):
    grow(catalogue)

    response = root.post(
        f"/admin/monitoring/project/{catalogue.vermont.pk}/delete/", {"post": "yes"}, follow=True
    )

    assert response.status_code == 200
    assert not Project.objects.filter(pk=catalogue.vermont.pk).exists()
    assert not SourceImage.objects.filter(path__startswith="extra-").exists()
    assert list(SourceImageCollection.objects.values_list("name", flat=True)) == ["Delta"]
    drain_all()
    assert_all_counts_exact()


def test_deleting_many_selected_captures_confirms_with_counts(root, catalogue):
    images = grow(catalogue)

    response = run_action(
        root, "/admin/monitoring/sourceimage/", images[:250], action="delete_selected"
    )

    assert response.status_code == 200
    counted = {str(k): v for k, v in response.context["model_count"]}
    assert counted == {
        "source images": "250",
        "detections": "250",
        "sourceimagecollection-sourceimage relationships": "250",
    }
    assert "extra-3.jpg" in response.content.decode()  # the first 20 selected are named
    assert "extra-200.jpg" not in response.content.decode()


def test_a_small_delete_keeps_djangos_full_list(root, catalogue):
    response = root.get(f"/admin/monitoring/deployment/{catalogue.south.pk}/delete/")

    html = response.content.decode()
    assert "10.jpg" in html and "11.jpg" in html  # South's two captures, listed by name


def test_a_summarised_delete_still_needs_every_delete_permission(client, catalogue):
    grow(catalogue)
    client.force_login(staff("editor", "monitoring.delete_project", "monitoring.view_project"))

    response = client.get(f"/admin/monitoring/project/{catalogue.vermont.pk}/delete/")

    assert response.status_code == 200
    assert "capture set" in response.context["perms_lacking"]
    assert "source image" in response.context["perms_lacking"]
    assert Project.objects.filter(pk=catalogue.vermont.pk).exists()


def test_capture_set_page_shows_members_without_loading_them_all(root, catalogue):
    grow(catalogue)
    alpha = catalogue.sets["Alpha"]
    url = f"/admin/monitoring/sourceimagecollection/{alpha.pk}/change/"

    with CaptureQueriesContext(connection) as queries:
        html = root.get(url).content.decode()

    assert 'name="images"' not in html  # no input holding every member id
    assert f"All {6 + EXTRA_CAPTURES} captures" in html
    assert html.count("/admin/monitoring/sourceimage/") >= 20
    # The change page's pending check (captures of the set with a recompute waiting) reads
    # the membership through the mark queue, never the members themselves.
    logged = [q["sql"] or "" for q in queries]  # (a prepared statement's text is not logged)
    membership = [
        sql
        for sql in logged
        if "sourceimagecollection_images" in sql and "counts_dirtymark" not in sql
    ]
    assert membership and all("LIMIT 20" in sql for sql in membership)


def test_capture_set_members_are_a_paginated_capture_list(root, catalogue):
    grow(catalogue)
    alpha, bravo = catalogue.sets["Alpha"], catalogue.sets["Bravo"]

    response = root.get("/admin/monitoring/sourceimage/", {"collections__id__exact": alpha.pk})

    assert response.status_code == 200
    assert response.context["cl"].result_count == 6 + EXTRA_CAPTURES
    assert len(ChangeList(response.content.decode()).rows) == 100  # one page of them
    bravo_page = root.get("/admin/monitoring/sourceimage/", {"collections__id__exact": bravo.pk})
    assert bravo_page.context["cl"].result_count == 2


def test_saving_a_capture_set_keeps_its_members(root, catalogue):
    alpha = catalogue.sets["Alpha"]
    url = f"/admin/monitoring/sourceimagecollection/{alpha.pk}/change/"

    response = root.post(url, {"name": "Alpha renamed", "project": catalogue.vermont.pk})

    assert response.status_code == 302
    alpha.refresh_from_db()
    assert alpha.name == "Alpha renamed"
    assert alpha.images.count() == 6
    drain_all()
    assert_all_counts_exact()


def test_every_counted_model_on_the_site_has_the_counts_admin():
    counted = [m for m in admin.site._registry if cached_count_fields(m)]

    assert {m._meta.label_lower for m in counted} >= {
        "monitoring.deployment",
        "monitoring.event",
        "monitoring.sourceimage",
        "monitoring.sourceimagecollection",
    }
    assert all(isinstance(admin.site._registry[m], CachedCountsMixin) for m in counted)
    assert augment(admin.site) == []  # nothing left to do after start-up


class PlainEventAdmin(admin.ModelAdmin):
    """What an app writes when it does not know about counts."""

    list_display = ("start", "deployment")


def test_a_plain_admin_of_a_counted_model_gets_columns_freshness_and_recompute(
    client, catalogue, settings
):
    site = admin.AdminSite(name="admin")
    site.register(Event, PlainEventAdmin)
    assert augment(site) == ["monitoring.event"]

    class Urls:  # a URLconf may be any object with ``urlpatterns``
        urlpatterns = [path("admin/", site.urls)]

    settings.ROOT_URLCONF = Urls
    client.force_login(staff("op", "monitoring.view_event", "counts.recompute_counts"))
    night = catalogue.night1
    drift(night, captures_count=77)

    page = ChangeList(client.get("/admin/monitoring/event/").content.decode())

    assert list(page.headers) == [
        "start",
        "deployment",
        "captures_count",
        "detections_count",
        "occurrences_count",
        "taxa_count",
        "freshness",
    ]
    assert "recompute_now" in page.action_options
    row = next(r for r in page.rows if r["pk"] == str(night.pk))
    assert row["captures_count"] == "77"
    assert row["freshness"].startswith("updated")
    response = run_action(client, "/admin/monitoring/event/", [night])
    assert messages_of(response) == ["1 recomputed, 1 changed"]
    night.refresh_from_db()
    assert night.captures_count == truth("monitoring_event")[night.pk]["captures_count"] == 4
