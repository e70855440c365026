"""The admin as a user meets it: a counted row's page, totals, filters, names, the backlog.

- A change page shows each count under its list header with thousands separators, the row's
  freshness in the list's words, and "Recompute now" (with its permission) for that one row.
- List totals ("9,931 results (20,000 total)", "All 20,000 selected") read like the counts.
- Nights and captures filter by project, station and date without loading their tables, and
  stay a fixed number of queries at 20k captures; a night reads "North · 2024-06-01".
- The capture list of a set's members names the set; the pending page speaks of pending
  recomputes, model names and "3 min ago", not of dirty marks, labels and seconds.

Pages are read as ``test_admin`` reads them (its ``ChangeList``), through Django's test client.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from html.parser import HTMLParser

from django.contrib import admin
from django.db import connection
from django.test.utils import CaptureQueriesContext

from counts.run.marks import mark_all
from project.monitoring.models import Event, SourceImage, SourceImageCollection
from tests.api_fixtures import T0, drift
from tests.project.test_admin import (  # noqa: F401 (catalogue, operator, viewer: its fixtures)
    BASE_PERMISSIONS,
    PENDING_URL,
    SETS_URL,
    ChangeList,
    catalogue,
    messages_of,
    operator,
    staff,
    viewer,
)
from tests.truth import drain_all

EVENTS_URL = "/admin/monitoring/event/"
CAPTURES_URL = "/admin/monitoring/sourceimage/"


class ChangeForm(HTMLParser):
    """The read-only fields of a change page as ``{field: (label, text)}``, and its
    object-tools buttons (``buttons``: their text)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.fields: dict[str, tuple[str, str]] = {}
        self.buttons: list[str] = []
        self._field: str | None = None
        self._in: str | None = None  # "label", "readonly" or "button"
        self._depth = 0  # nested divs inside div.readonly
        self._label = self._text = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == "div" and "form-row" in classes:
            self._field = next((c[6:] for c in classes if c.startswith("field-")), None)
            self._label = self._text = ""
        elif tag == "label" and self._field:
            self._in = "label"
        elif tag == "div" and "readonly" in classes and self._field:
            self._in, self._depth = "readonly", 0
        elif tag == "div" and self._in == "readonly":
            self._depth += 1
        elif tag == "button":
            self._in, self._text = "button", ""

    def handle_endtag(self, tag):
        if tag == "label" and self._in == "label":
            self._in = None
        elif tag == "button" and self._in == "button":
            self.buttons.append(self._text.strip())
            self._in = None
        elif tag == "div" and self._in == "readonly":
            if self._depth:
                self._depth -= 1
                return
            self.fields[self._field] = (self._label.strip(), self._text.strip())
            self._in = self._field = None

    def handle_data(self, data):
        if self._in == "label":
            self._label += data
        elif self._in in ("readonly", "button"):
            self._text += data.replace("\xa0", " ")


def change_url(row) -> str:
    return f"/admin/monitoring/{row._meta.model_name}/{row.pk}/change/"


def heading(html: str) -> str:
    """The page's ``<h1>``, as text."""
    return re.sub(r"<[^>]+>", "", re.search(r"<h1>(.*?)</h1>", html, re.S).group(1)).strip()


def test_change_page_shows_counts_like_the_list_does(viewer, catalogue):
    alpha = catalogue.sets["Alpha"]
    drift(alpha, source_images_count=9931, source_images_with_detections_count=1234)

    page = ChangeForm(viewer.get(change_url(alpha)).content.decode())

    assert page.fields["source_images_count"] == ("Images:", "9,931")
    assert page.fields["source_images_with_detections_count"] == ("With detections:", "1,234")
    assert page.fields["source_images_processed_count"] == ("Processed:", "3")
    station = ChangeForm(viewer.get(change_url(catalogue.north)).content.decode())
    assert station.fields["captures_count"] == ("Captures:", "6")
    assert station.fields["taxa_count"][0] == "Taxa:"


def test_change_page_says_whether_a_recompute_is_pending(viewer, catalogue):
    alpha, bravo, charlie = (catalogue.sets[n] for n in ("Alpha", "Bravo", "Charlie"))
    bravo.images.add(SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="x"))
    drift(alpha, counts_updated_at=T0)

    def freshness(row) -> str:
        return ChangeForm(viewer.get(change_url(row)).content.decode()).fields["freshness"]

    assert freshness(bravo) == ("Freshness:", "pending")
    assert re.fullmatch(r"updated \d{3,} days ago", freshness(alpha)[1])
    assert freshness(charlie) == ("Freshness:", "never changed")
    drain_all()
    assert freshness(bravo) == ("Freshness:", "updated 0 s ago")


def test_recompute_now_on_a_change_page_corrects_that_row(operator, catalogue):
    night = catalogue.night1
    drift(night, captures_count=77)
    drift(catalogue.night2, captures_count=55)

    page = ChangeForm(operator.get(change_url(night)).content.decode())
    assert "Recompute now" in page.buttons
    assert page.fields["captures_count"] == ("Captures:", "77")

    response = operator.post(f"/admin/monitoring/event/{night.pk}/recompute/", follow=True)

    assert response.redirect_chain == [(change_url(night), 302)]
    assert messages_of(response) == [
        "Recomputed: the counts of “North · 2024-06-01” were out of date and are now corrected."
    ]
    assert ChangeForm(response.content.decode()).fields["captures_count"] == ("Captures:", "4")
    again = operator.post(f"/admin/monitoring/event/{night.pk}/recompute/", follow=True)
    assert messages_of(again) == [
        "Recomputed: the counts of “North · 2024-06-01” were already right."
    ]
    catalogue.night2.refresh_from_db()
    assert catalogue.night2.captures_count == 55  # only the row asked for


def test_recompute_now_on_a_change_page_needs_its_permission(viewer, catalogue):
    night = catalogue.night1
    drift(night, captures_count=77)

    assert "Recompute now" not in ChangeForm(viewer.get(change_url(night)).content.decode()).buttons
    assert viewer.post(f"/admin/monitoring/event/{night.pk}/recompute/").status_code == 403
    assert viewer.get(f"/admin/monitoring/event/{night.pk}/recompute/").status_code in (403, 405)
    night.refresh_from_db()
    assert night.captures_count == 77


def test_list_totals_have_thousands_separators(operator, catalogue):
    SourceImageCollection.objects.bulk_create(
        SourceImageCollection(project=catalogue.panama, name=f"Bulk {n:04}") for n in range(1200)
    )

    html = operator.get(SETS_URL, {"q": "Bulk"}).content.decode()

    assert "1,200 results (<a" in html and "1,205 total</a>)" in html
    assert re.search(r"\s1,200 capture sets\s", html)  # the paginator
    assert "Select all 1,200 capture sets" in html
    assert "All 1,200 selected" in html
    # (Names and ids aside: a row's id may be 1200 itself.)
    assert "1200" not in re.sub(r'Bulk \d+|/\d+/|value="\d+"', "", html)
    plain = operator.get(SETS_URL, {"q": "Alpha"}).content.decode()
    assert "1 result (<a" in plain and "1,205 total" in plain


def test_recompute_limit_message_has_thousands_separators(operator, catalogue, monkeypatch):
    monkeypatch.setattr(admin.site._registry[SourceImageCollection], "recompute_now_limit", 1000)
    SourceImageCollection.objects.bulk_create(
        SourceImageCollection(project=catalogue.panama, name=f"Bulk {n}") for n in range(1200)
    )

    data = {"action": "recompute_now", "index": 0, "select_across": 1, "_selected_action": [1]}
    response = operator.post(SETS_URL, data, follow=True)  # "Select all 1,205 capture sets"

    assert messages_of(response)[0].startswith(
        "1,205 rows selected; Recompute now takes at most 1,000."
    )


def test_nights_are_named_by_station_and_date_without_a_query_per_row(viewer, catalogue):
    with CaptureQueriesContext(connection) as few:
        rows = ChangeList(viewer.get(CAPTURES_URL).content.decode()).rows
    assert {r["event"] for r in rows} >= {"North · 2024-06-01", "Canal · 2024-06-04"}
    night = Event.objects.create(deployment=catalogue.canal, start=T0)
    SourceImage.objects.bulk_create(
        SourceImage(deployment=catalogue.canal, event=night, timestamp=T0, path=f"m{n}.jpg")
        for n in range(30)
    )
    drain_all()
    with CaptureQueriesContext(connection) as many:
        assert len(ChangeList(viewer.get(CAPTURES_URL).content.decode()).rows) == 40
    assert len(many) == len(few)
    assert heading(viewer.get(change_url(catalogue.night3)).content.decode()) == "Change event"
    assert "South · 2024-06-03" in viewer.get(change_url(catalogue.night3)).content.decode()


def test_nights_filter_by_project_and_station_by_date_and_search_by_station(viewer, catalogue):
    def starts(**params) -> set[str]:
        html = viewer.get(EVENTS_URL, params).content.decode()
        return {r["deployment"] for r in ChangeList(html).rows}

    assert starts() == {"North", "South", "Canal"}
    assert starts(deployment__project__id__exact=catalogue.panama.pk) == {"Canal"}
    assert starts(station=catalogue.south.pk) == {"South"}
    assert starts(q="nort") == {"North"}
    assert starts(start__day=3, start__month=6, start__year=2024) == {"South"}
    html = viewer.get(EVENTS_URL).content.decode()
    assert 'class="toplinks"' in html  # the date hierarchy: the nights' month, by day
    assert "Station name" in html  # what the search box searches
    assert ">North (Vermont)</a>" in html and ">Canal (Panama)</a>" in html
    vermont = viewer.get(EVENTS_URL, {"deployment__project__id__exact": catalogue.vermont.pk})
    assert ">North</a>" in vermont.content.decode()
    assert "Canal" not in vermont.content.decode()  # stations of the chosen project only


def test_captures_filter_by_project_and_station_and_by_date(viewer, catalogue):
    def paths(**params) -> set[str]:
        html = viewer.get(CAPTURES_URL, params).content.decode()
        return {r["path"] for r in ChangeList(html).rows}

    assert paths(deployment__project__id__exact=catalogue.panama.pk) == {"20.jpg", "21.jpg"}
    assert paths(station=catalogue.south.pk) == {"10.jpg", "11.jpg"}
    assert paths(timestamp__year=2024, timestamp__month=6, timestamp__day=1) == {
        f"{n}.jpg" for n in (0, 1, 2, 3, 4, 5, 10, 11, 20, 21)
    }
    assert 'class="toplinks"' in viewer.get(CAPTURES_URL).content.decode()
    assert viewer.get(CAPTURES_URL, {"station": "north"}).status_code == 302  # ?e=1, not a 500


def test_capture_list_of_a_set_names_the_set(viewer, catalogue):
    alpha = catalogue.sets["Alpha"]

    response = viewer.get(CAPTURES_URL, {"collections__id__exact": alpha.pk})

    html = response.content.decode()
    assert heading(html) == "Captures in capture set “Alpha”"
    assert len(ChangeList(html).rows) == 6
    assert heading(viewer.get(CAPTURES_URL).content.decode()) == "Select source image to change"


def test_capture_pages_stay_cheap_at_20k_captures(viewer, catalogue):
    """Filters, the date hierarchy and the list read a page, not the table: a fixed number of
    queries, and well under a second each, at 20k captures."""
    SourceImage.objects.bulk_create(
        SourceImage(
            deployment=catalogue.north if n % 2 else catalogue.canal,
            event=catalogue.night1 if n % 2 else catalogue.night4,
            timestamp=T0 + timedelta(seconds=30 * n),
            path=f"bulk/{n}.jpg",
        )
        for n in range(20_000)
    )
    drain_all()
    pages = [
        {},
        {"deployment__project__id__exact": catalogue.vermont.pk},
        {"station": catalogue.canal.pk},
        {"timestamp__year": 2024, "timestamp__month": 6},
        {"q": "bulk/19"},
    ]
    for params in pages:
        started = time.monotonic()
        with CaptureQueriesContext(connection) as queries:
            response = viewer.get(CAPTURES_URL, params)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, params
        assert len(ChangeList(response.content.decode()).rows) == 100, params
        assert len(queries) <= 16, (params, [q["sql"][:120] for q in queries])
        assert elapsed < 2.0, (params, elapsed)
    html = viewer.get(CAPTURES_URL).content.decode()
    assert "20,010 source images" in html
    events = viewer.get(EVENTS_URL, {"q": "North"})
    assert {r["deployment"] for r in ChangeList(events.content.decode()).rows} == {"North"}


def test_pending_page_speaks_an_operators_words(viewer, catalogue):
    waiting = SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="new.jpg")
    catalogue.sets["Bravo"].images.add(waiting)  # an item mark: the capture's counts may change
    mark_all("monitoring.deployment")
    with connection.cursor() as cursor:  # the summary measures from the transaction's now()
        cursor.execute("UPDATE counts_dirtymark SET created_at = now() - interval '210 seconds'")

    html = viewer.get(PENDING_URL).content.decode()

    assert heading(html) == "Pending recomputes"
    assert "<title>Pending recomputes |" in html
    content = html[html.index('<div id="content"') :]
    assert "dirty mark" not in content.lower()
    assert "item:" not in re.sub(r'title="[^"]*"', "", content)  # labels only on hover
    assert "source images (per source image)" in content
    assert "oldest (seconds)" not in content
    assert re.search(r"<td[^>]*>3 min ago</td>", content)  # the summary's oldest request
    rows = ChangeList(html).rows
    assert rows and all(r["waiting"] == "3 min ago" for r in rows)
    assert {r["target_model"] for r in rows} >= {"deployments", "source images (per source image)"}
    assert re.search(r"\d+ requests waiting", content)
    assert "Pending recomputes</div>" in re.sub(r"\s+", " ", html).replace(" </div>", "</div>")
