"""Operator journeys in a real headless Chromium at a laptop's width (1400 px).

1. Spot a drifted count and fix it with "Recompute now".
2. Watch a capture set's "pending" badge turn into "updated … ago" once a real worker drains,
   with every column — freshness included — visible without scrolling sideways.

Debian's ``/usr/bin/chromium`` (``bin/install-browser``) is driven by Playwright; the app runs
in pytest-django's live server over the real PostgreSQL, and the worker is a real in-process
Dramatiq worker on the real Redis broker. Playwright's sync API runs an event loop in this
thread, and Django refuses ORM calls from one, so the database is prepared before the browser
starts and checked after it closes. Screenshots go to ``var/screenshots/``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User

from counts.models import DirtyMark
from project.monitoring.models import SourceImage, SourceImageCollection
from tests import worker_harness as wh
from tests.api_fixtures import T0, build_catalogue, drift
from tests.paths import ROOT
from tests.truth import assert_all_counts_exact, truth

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"
#: A laptop screen: the admin's lists must fit it without sideways scrolling.
VIEWPORT = {"width": 1400, "height": 900}
SCREENSHOTS = ROOT / "var" / "screenshots"
SETS = "/admin/monitoring/sourceimagecollection/"


def operator() -> User:
    """Staff who may see capture sets and holds the "Recompute now" permission."""
    user = User.objects.create_user("operator", password=PASSWORD, is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            codename__in=[
                "view_sourceimagecollection",
                "change_sourceimagecollection",
                "view_deployment",
            ]
        ),
        Permission.objects.get(codename="recompute_counts"),
    )
    return user


def sign_in(page, base_url: str) -> None:
    page.goto(f"{base_url}/admin/login/?next={SETS}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(f"**{SETS}")


pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium: run bin/install-browser"),
]


def test_operator_recomputes_a_drifted_capture_set_from_the_admin(live_server):
    from playwright.sync_api import expect, sync_playwright

    catalogue = build_catalogue()
    alpha, bravo = catalogue.sets["Alpha"], catalogue.sets["Bravo"]
    drift(alpha, source_images_count=999)  # as after a restore the triggers never saw
    drift(bravo, source_images_processed_count=0)
    operator()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            sign_in(page, live_server.url)

            def row(name: str):
                return page.locator("#result_list tbody tr", has_text=name)

            expect(row("Alpha").locator("td.field-source_images_count")).to_have_text("999")
            expect(row("Bravo").locator("td.field-source_images_processed_count")).to_have_text("0")

            row("Alpha").locator("input.action-select").check()
            row("Bravo").locator("input.action-select").check()
            page.select_option("select[name=action]", "recompute_now")
            page.click("button[name=index]")

            expect(page.locator("ul.messagelist")).to_contain_text("2 recomputed, 2 changed")
            expect(row("Alpha").locator("td.field-source_images_count")).to_have_text("6")
            expect(row("Bravo").locator("td.field-source_images_processed_count")).to_have_text("2")

            # The operator sorts the sets by their image count: a click on the header, then
            # another to turn the order round.
            header = page.locator("th.column-source_images_count")
            expect(header).to_have_class(re.compile(r"\bsortable\b"))
            cells = page.locator("td.field-source_images_count")

            def shown() -> list[int]:
                return [int(text.replace(",", "")) for text in cells.all_inner_texts()]

            header.locator("div.text a").click()
            expect(header).to_have_class(re.compile(r"\bascending\b"))
            assert shown() == sorted(shown()) and len(set(shown())) > 1
            header.locator("div.text a").click()
            expect(header).to_have_class(re.compile(r"\bdescending\b"))
            assert shown() == sorted(shown(), reverse=True)
        finally:
            browser.close()

    stored = dict(SourceImageCollection.objects.values_list("pk", "source_images_count"))
    expected = truth(SourceImageCollection._meta.db_table)
    assert stored[alpha.pk] == expected[alpha.pk]["source_images_count"]


def test_pending_badge_turns_into_updated_ago_when_a_worker_drains(live_server):
    from playwright.sync_api import expect, sync_playwright

    wh.reset_redis()
    catalogue = build_catalogue()
    operator()
    wh.reset_redis()  # the set-up's messages are not what this test watches
    new = SourceImage.objects.create(deployment=catalogue.north, timestamp=T0, path="new.jpg")
    catalogue.sets["Bravo"].images.add(new)  # commits a mark and sends the debounced message
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            sign_in(page, live_server.url)
            bravo = page.locator("#result_list tbody tr", has_text="Bravo")
            freshness = bravo.locator("td.field-freshness")
            expect(freshness.locator(".counts-pending")).to_have_text("pending")
            # Exact before any worker ran: the new member is counted; its badge says the
            # stored value has yet to follow.
            expect(bravo.locator("td.field-source_images_count")).to_have_text("3")
            title = freshness.locator(".counts-pending").get_attribute("title")
            assert "The counts shown include it." in title
            assert_fits(page, "capture-sets-pending.png")

            with wh.running_worker(threads=1):
                deadline = time.monotonic() + 60
                while "pending" in freshness.inner_text() and time.monotonic() < deadline:
                    page.wait_for_timeout(250)
                    page.reload()
            expect(freshness).to_have_text(re.compile(r"^updated\s\d+\ss\sago$"))
            expect(bravo.locator("td.field-source_images_count")).to_have_text("3")
            assert_fits(page, "capture-sets-updated.png")
            page.goto(f"{live_server.url}/admin/monitoring/deployment/")  # the most counts
            assert_fits(page, "stations.png")
        finally:
            browser.close()

    assert not DirtyMark.objects.exists()
    assert_all_counts_exact()


def assert_fits(page, screenshot: str) -> None:
    """Every column of the list, freshness last, lies inside the 1400 px viewport: nothing to
    scroll sideways for. Saves a screenshot of the page as the operator sees it."""
    page.screenshot(path=str(SCREENSHOTS / screenshot))
    header = page.locator("#result_list th.column-freshness").bounding_box()
    assert header is not None
    assert header["x"] + header["width"] <= VIEWPORT["width"], header
    table = page.locator("#result_list").bounding_box()
    assert table["x"] + table["width"] <= VIEWPORT["width"], table
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]


def test_client_developer_filters_and_sorts_in_the_browsable_api(live_server):
    """The browsable API's Filters form, filled in and submitted as a person would: every field
    has a name, the empty ones it sends mean "not given", and the page that comes back (a
    refusal included) still has its Filters button."""
    from playwright.sync_api import expect, sync_playwright

    catalogue = build_catalogue()
    public = catalogue.sets["Alpha"].project
    type(public).objects.filter(pk=public.pk).update(is_public=True)
    operator()
    api = f"{live_server.url}/api/v2/captures/collections/"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            sign_in(page, live_server.url)
            assert page.goto(api).status == 200
            page.get_by_role("button", name="Filters").click()
            form = page.locator("#filtersModal form")
            expect(form).to_be_visible()
            expect(form).not_to_contain_text("[invalid name]")
            form.locator("select[name=ordering]").select_option("-source_images_count")
            with page.expect_navigation() as answered:
                form.locator("[type=submit]").click()
            assert answered.value.status == 200, page.url
            assert "ordering=-source_images_count" in page.url
            expect(page.locator(".response-info")).to_contain_text('"results"')

            assert page.goto(f"{api}?ordering=popularity").status == 400
            expect(page.locator(".response-info")).to_contain_text("popularity")
            expect(page.get_by_role("button", name="Filters")).to_be_visible()
        finally:
            browser.close()
