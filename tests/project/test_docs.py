"""``/api/docs/`` works offline: Swagger UI comes from our static files, not a CDN.

drf-spectacular-sidecar ships the Swagger UI build; collectstatic copies it and whitenoise
serves it. The first test reads the page as text; the second renders it in a real headless
Chromium that is refused every request leaving the live server.
"""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.core.management import call_command
from django.test import Client

from tests.project.test_browser import CHROMIUM, CHROMIUM_ARGS

#: src= and href= values in a page.
ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def test_docs_reference_only_local_static_files_and_they_are_served():
    call_command("collectstatic", "--no-input", verbosity=0, stdout=StringIO())
    client = Client()  # a fresh handler: whitenoise indexes STATIC_ROOT when it starts
    page = client.get("/api/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assets = ASSET.findall(html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets), assets
    for asset in assets:
        parsed = urlparse(asset)
        assert not parsed.scheme and not parsed.netloc, f"{asset} is not served by us"
        assert asset.startswith("/static/"), asset
        response = client.get(asset)
        assert response.status_code == 200, asset
        body = b"".join(response.streaming_content) if response.streaming else response.content
        assert len(body) > 100, asset
    assert "cdn" not in html.lower() and "//unpkg" not in html


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium: run bin/install-browser")
def test_swagger_ui_renders_the_api_with_nothing_but_the_live_server(live_server):
    from playwright.sync_api import expect, sync_playwright

    local = urlparse(live_server.url).netloc
    refused: list[str] = []

    def only_local(route):
        if urlparse(route.request.url).netloc == local:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", only_local)
            page.goto(f"{live_server.url}/api/docs/")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("countdown API")
            expect(page.locator(".opblock-summary-path").first).to_be_visible()
            paths = page.locator(".opblock-summary-path").all_inner_texts()
        finally:
            browser.close()
    assert any("/api/v2/captures/collections/" in p for p in paths), paths
    assert refused == []
