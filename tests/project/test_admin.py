"""The admin: counts and freshness in lists, "Recompute now" behind its permission, the backlog.

Pages are requested as logged-in staff users through Django's test client and read the way a
user reads them: the rows of the result table, its column headers, the options of the action
menu, the messages. (Large pages — delete confirmations, capture-set members, and admins
augmented with counts — are in ``test_admin_scale``.)
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from counts.admin import ago, verbose_name_of
from counts.declare.field import cached_count_fields
from counts.models import DirtyMark
from counts.run.marks import mark_all
from project.monitoring.models import (
    Deployment,
    Event,
    SourceImage,
    SourceImageCollection,
)
from tests.api_fixtures import T0, build_catalogue, drift
from tests.truth import drain_all, truth

SETS_URL = "/admin/monitoring/sourceimagecollection/"
PENDING_URL = "/admin/counts/dirtymark/"
#: What every staff user here may do with the monitoring models.
BASE_PERMISSIONS = [
    f"monitoring.{action}_{model}"
    for model in ("sourceimagecollection", "deployment", "event", "sourceimage")
    for action in ("view", "change", "delete")
] + ["counts.view_dirtymark"]


class ChangeList(HTMLParser):
    """Rows of an admin result table as ``{column: text}``; boolean icons read as their alt.

    ``headers`` maps each column to its header text.
    """

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.headers: dict[str, str] = {}
        self._header: str | None = None
        self.action_options: list[str] = []
        self._column: str | None = None
        self._in_action_select = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "select" and attrs.get("name") == "action":
            self._in_action_select = True
        elif tag == "option" and self._in_action_select:
            self.action_options.append(attrs.get("value", ""))
        elif tag == "th" and attrs.get("scope") == "col":
            classes = (attrs.get("class") or "").split()
            self._header = next((c[len("column-") :] for c in classes if "column-" in c), None)
            if self._header:
                self.headers[self._header] = ""
        elif tag == "tr":
            self._row: dict[str, str] = {}
        elif tag in ("td", "th"):
            classes = (attrs.get("class") or "").split()
            field = next((c[len("field-") :] for c in classes if c.startswith("field-")), None)
            self._column = field
            if field:
                self._row[field] = ""
        elif tag == "img" and self._column:
            self._row[self._column] += attrs.get("alt", "")
        elif tag == "input" and attrs.get("name") == "_selected_action":
            self._row["pk"] = attrs["value"]

    def handle_endtag(self, tag):
        if tag == "select":
            self._in_action_select = False
        elif tag in ("td", "th"):
            self._column = self._header = None
        elif tag == "tr" and getattr(self, "_row", None):
            self.rows.append(self._row)

    def handle_data(self, data):
        if self._header:
            self.headers[self._header] += data.strip()
        if self._column:
            self._row[self._column] += data.strip().replace("\xa0", " ")


def staff(username: str, *permissions: str) -> User:
    user = User.objects.create_user(username, is_staff=True)  # force_login needs no password
    for name in permissions:
        app_label, codename = name.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


@pytest.fixture
def catalogue(db):
    return build_catalogue()


@pytest.fixture
def viewer(client, db):
    """Staff who may view, change and delete, but not recompute."""
    client.force_login(staff("viewer", *BASE_PERMISSIONS))
    return client


@pytest.fixture
def operator(client, db):
    """Staff holding the dedicated ``counts.recompute_counts`` permission."""
    client.force_login(staff("operator", *BASE_PERMISSIONS, "counts.recompute_counts"))
    return client


def run_action(client, url: str, rows, action: str = "recompute_now"):
    data = {"action": action, "index": 0, "_selected_action": [row.pk for row in rows]}
    return client.post(url, data, follow=True)


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_recompute_is_not_offered_to_staff_without_its_permission(viewer, catalogue):
    alpha = catalogue.sets["Alpha"]
    drift(alpha, source_images_count=999)

    page = ChangeList(viewer.get(SETS_URL).content.decode())
    assert "delete_selected" in page.action_options
    assert "recompute_now" not in page.action_options

    response = run_action(viewer, SETS_URL, [alpha])
    assert messages_of(response) == ["No action selected."]
    alpha.refresh_from_db()
    assert alpha.source_images_count == 999


def test_recompute_now_corrects_the_selected_rows_and_says_how_many(operator, catalogue):
    alpha, bravo, charlie, delta = (
        catalogue.sets[n] for n in ("Alpha", "Bravo", "Charlie", "Delta")
    )
    drift(alpha, source_images_count=999)
    drift(bravo, source_images_with_detections_count=50, source_images_processed_count=0)
    drift(delta, source_images_count=7)
    assert "recompute_now" in ChangeList(operator.get(SETS_URL).content.decode()).action_options

    response = run_action(operator, SETS_URL, [alpha, bravo, charlie])

    assert messages_of(response) == ["3 recomputed, 2 changed"]
    expected = truth(SourceImageCollection._meta.db_table)
    shown = {int(r["pk"]): r for r in ChangeList(response.content.decode()).rows}
    for row in (alpha, bravo, charlie):
        row.refresh_from_db()
        assert row.source_images_count == expected[row.pk]["source_images_count"]
        assert shown[row.pk]["source_images_count"] == str(expected[row.pk]["source_images_count"])
    assert bravo.source_images_with_detections_count == 1
    assert bravo.source_images_processed_count == 2
    delta.refresh_from_db()
    assert delta.source_images_count == 7  # not selected: left as it was


def test_recompute_now_refuses_more_rows_than_a_request_should_lock(
    operator, catalogue, monkeypatch
):
    monkeypatch.setattr(admin.site._registry[SourceImageCollection], "recompute_now_limit", 2)
    rows = [catalogue.sets[n] for n in ("Alpha", "Bravo", "Charlie")]
    drift(rows[0], source_images_count=999)

    response = run_action(operator, SETS_URL, rows)

    assert messages_of(response) == [
        "3 rows selected; Recompute now takes at most 2. Use `manage.py counts reconcile"
        " --model monitoring.sourceimagecollection` for more."
    ]
    rows[0].refresh_from_db()
    assert rows[0].source_images_count == 999


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (SourceImageCollection, "source_images_processed_count"),
        (Deployment, "taxa_count"),
        (Event, "occurrences_count"),
        (SourceImage, "detections_count"),
    ],
)
def test_recompute_now_serves_every_model_with_counts(operator, catalogue, model, field):
    row = model.objects.filter(**{f"{field}__gt": 0}).first()
    correct = getattr(row, field)
    drift(row, **{field: correct + 40})
    url = f"/admin/monitoring/{model._meta.model_name}/"

    response = run_action(operator, url, [row])

    assert messages_of(response) == ["1 recomputed, 1 changed"]
    row.refresh_from_db()
    assert getattr(row, field) == correct


def test_list_shows_counts_and_freshness_per_row(viewer, catalogue):
    drift(catalogue.sets["Alpha"], counts_updated_at=T0)
    waiting = SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="new.jpg")
    catalogue.sets["Bravo"].images.add(waiting)  # marks Bravo; no worker runs here

    page = ChangeList(viewer.get(SETS_URL).content.decode())
    rows = {r["name"]: r for r in page.rows}

    assert rows["Alpha"]["source_images_count"] == "6"
    assert rows["Alpha"]["source_images_with_detections_count"] == "2"
    assert rows["Alpha"]["source_images_processed_count"] == "3"
    assert rows["Alpha"]["project"] == "Vermont"
    assert re.fullmatch(r"updated \d{3,} days ago", rows["Alpha"]["freshness"])
    assert rows["Echo"]["freshness"] == "updated 0 s ago"  # drained in this transaction
    assert rows["Bravo"]["freshness"] == "pending"
    assert rows["Bravo"]["source_images_count"] == "3"  # exact: the member not yet stored
    assert rows["Charlie"]["freshness"] == "never changed"


def test_pending_is_a_badge_not_a_green_tick(viewer, catalogue):
    catalogue.sets["Bravo"].images.add(
        SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="new.jpg")
    )

    html = viewer.get(SETS_URL).content.decode()

    assert html.count('class="counts-pending"') == 1
    assert "icon-yes.svg" not in html and "icon-no.svg" not in html
    drain_all()
    html = viewer.get(SETS_URL).content.decode()
    assert 'class="counts-pending"' not in html
    assert html.count(">updated 0\xa0s\xa0ago<") == 4  # every set but Charlie, never changed


def test_columns_have_short_headers_and_counts_thousands_separators(viewer, catalogue):
    drift(catalogue.sets["Alpha"], source_images_count=1234567)

    page = ChangeList(viewer.get(SETS_URL).content.decode())

    documented = {
        "name": "Name",
        "project": "Project",
        "source_images_count": "Images",
        "source_images_with_detections_count": "With detections",
        "source_images_processed_count": "Processed",
        "freshness": "Freshness",
    }
    assert {k: v for k, v in page.headers.items() if k in documented} == documented
    declared = {f.name for f in cached_count_fields(SourceImageCollection)}
    assert set(page.headers) - set(documented) == declared - set(documented)  # counts added later
    assert {r["name"]: r for r in page.rows}["Alpha"]["source_images_count"] == "1,234,567"
    stations = ChangeList(viewer.get("/admin/monitoring/deployment/").content.decode()).headers
    assert list(stations)[2:] == [
        *(f.name for f in cached_count_fields(Deployment)),
        "freshness",
    ]
    assert {stations[k] for k in ("events_count", "occurrences_count", "taxa_count")} == {
        "Events",
        "Occurrences",
        "Taxa",
    }
    assert stations["captures_count"] == "Captures"
    assert stations["detections_count"] == "Detections"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0 s"),
        (12, "12 s"),
        (59, "59 s"),
        (60, "1 min"),
        (3599, "59 min"),
        (7200, "2 h"),
        (86_400, "1 day"),
        (3 * 86_400 + 5, "3 days"),
        (-4, "0 s"),
    ],
)
def test_ages_read_like_a_person_would_say_them(seconds, shown):
    assert ago(seconds) == shown


def test_list_sorts_by_a_count_both_ways(viewer, catalogue):
    model_admin = admin.site._registry[SourceImageCollection]
    columns = [getattr(c, "__name__", c) for c in model_admin.get_list_display(None)]
    column = columns.index("source_images_count") + 1  # 0 is the action checkbox

    ascending = ChangeList(viewer.get(SETS_URL, {"o": column}).content.decode()).rows
    descending = ChangeList(viewer.get(SETS_URL, {"o": -column}).content.decode()).rows

    counts_up = [int(r["source_images_count"]) for r in ascending]
    assert counts_up == sorted(counts_up) and len(set(counts_up)) > 1
    counts_down = [int(r["source_images_count"]) for r in descending]
    assert counts_down == sorted(counts_up, reverse=True)


def test_list_queries_do_not_grow_with_rows(viewer, catalogue):
    with CaptureQueriesContext(connection) as few:
        assert len(ChangeList(viewer.get(SETS_URL).content.decode()).rows) == 5
    for n in range(20):
        SourceImageCollection.objects.create(project=catalogue.panama, name=f"More {n}")
    mark_all("monitoring.sourceimagecollection")
    with CaptureQueriesContext(connection) as many:
        rows = ChangeList(viewer.get(SETS_URL).content.decode()).rows
    assert len(rows) == 25
    assert all(r["freshness"] == "pending" for r in rows)
    assert len(many) == len(few)


@pytest.mark.parametrize("model_name", ["deployment", "event", "sourceimage"])
def test_other_counted_lists_show_counts_and_freshness(viewer, catalogue, model_name):
    rows = ChangeList(viewer.get(f"/admin/monitoring/{model_name}/").content.decode()).rows

    assert rows
    assert all(r["freshness"].startswith(("updated ", "never changed")) for r in rows)
    assert any(r["freshness"] == "updated 0 s ago" for r in rows)
    assert any(int(r["detections_count"]) > 0 for r in rows)


def test_every_model_has_an_admin_list_that_renders(client, catalogue):
    client.force_login(User.objects.create_superuser("root"))
    for model in ("project", "deployment", "event", "sourceimage", "taxon", "occurrence"):
        response = client.get(f"/admin/monitoring/{model}/")
        assert response.status_code == 200, model
        assert ChangeList(response.content.decode()).rows, model
    for model in ("detection", "sourceimagecollection"):
        assert client.get(f"/admin/monitoring/{model}/").status_code == 200


def test_change_form_shows_counts_read_only(viewer, catalogue):
    alpha = catalogue.sets["Alpha"]

    html = viewer.get(f"{SETS_URL}{alpha.pk}/change/").content.decode()

    assert 'class="readonly">6<' in html  # source_images_count, not an input
    assert 'name="source_images_count"' not in html


def test_pending_page_shows_the_backlog_per_model_by_verbose_name(viewer, catalogue):
    waiting = SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="new.jpg")
    catalogue.sets["Bravo"].images.add(waiting)
    mark_all("monitoring.deployment")

    response = viewer.get(PENDING_URL)

    assert response.status_code == 200
    summary = {row["model"]: row for row in response.context["pending_summary"]}
    assert summary["deployments"]["rows"] == "every row"
    assert summary["capture sets"]["rows"] == 1
    html = response.content.decode()
    assert "Pending recomputes per model" in html
    assert '<td title="monitoring.sourceimagecollection">capture sets</td>' in html
    listed = {row["target_model"] for row in ChangeList(html).rows}  # the marks themselves, below
    waiting = {
        verbose_name_of(label) for label in DirtyMark.objects.values_list("target", flat=True)
    }
    assert listed == waiting >= {"deployments", "capture sets"}
    assert ">capture sets</a>" in html  # the filter by model, too
    filtered = ChangeList(
        viewer.get(PENDING_URL, {"target": "monitoring.deployment"}).content.decode()
    )
    assert {row["target_model"] for row in filtered.rows} == {"deployments"}


def test_pending_page_is_read_only_and_says_when_nothing_waits(viewer, catalogue):
    html = viewer.get(PENDING_URL).content.decode()

    assert "Nothing pending" in html
    assert viewer.get(f"{PENDING_URL}add/").status_code == 403


def test_pending_page_needs_a_permission(client, catalogue):
    client.force_login(staff("nobody"))

    assert client.get(PENDING_URL).status_code == 403


def test_a_row_flagged_fresh_shows_the_counts_of_that_moment(catalogue):
    """A drain committing between a list's query and its freshness flags must not leave
    "updated" beside the numbers from before it (seen in the browser test under load)."""
    from counts.run.marks import flag_pending

    bravo = catalogue.sets["Bravo"]
    bravo.images.add(SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="x"))
    rows = list(SourceImageCollection.objects.filter(pk=bravo.pk))  # the page's query
    assert rows[0].source_images_count == 2
    drain_all()  # a worker commits now
    flag_pending(rows)
    assert rows[0].counts_pending is False
    assert rows[0].source_images_count == 3
