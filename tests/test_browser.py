"""One operator journey in a real headless Chromium: spot a drifted count, fix it from the admin.

Debian's ``/usr/bin/chromium`` (``bin/install-browser``) is driven by Playwright; the app runs
in pytest-django's live server over the real PostgreSQL. Playwright's sync API runs an event
loop in this thread, and Django refuses ORM calls from one, so the database is prepared before
the browser starts and checked after it closes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User

from project.monitoring.models import SourceImageCollection
from tests.api_fixtures import build_catalogue, drift
from tests.truth import truth

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


def operator() -> User:
    """Staff who may see capture sets and holds the "Recompute now" permission."""
    user = User.objects.create_user("operator", password=PASSWORD, is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["view_sourceimagecollection", "change_sourceimagecollection"]
        ),
        Permission.objects.get(codename="recompute_counts"),
    )
    return user


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium: run bin/install-browser")
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
            page = browser.new_page()
            page.goto(
                f"{live_server.url}/admin/login/?next=/admin/monitoring/sourceimagecollection/"
            )
            page.fill("#id_username", "operator")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            page.wait_for_url("**/admin/monitoring/sourceimagecollection/")

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
        finally:
            browser.close()

    stored = dict(SourceImageCollection.objects.values_list("pk", "source_images_count"))
    expected = truth(SourceImageCollection._meta.db_table)
    assert stored[alpha.pk] == expected[alpha.pk]["source_images_count"]
