"""The marketplace in a real browser: headless Chromium (Playwright) against uvicorn on loopback.

Browse to an expert, compare two, run a demo prompt and see the streamed text with its expert,
create an account, license an expert, issue a second API key and revoke the first.
Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from conftest import REPO, free_port
from test_marketplace import build_market

from marketplace.app import create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)"
)


@pytest.fixture
def site(tiny_base, tmp_path):
    market = build_market(tiny_base, tmp_path)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(market), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield market, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


# Every text box of the benchmark chart, as laid out by the browser, must keep clear of every
# bar and stay inside the chart (the screenshot is test-artifacts/expert.png).
CHART_LAYOUT_JS = """() => {
  const svg = document.querySelector('svg.bench');
  const box = svg.getBoundingClientRect();
  const bars = [...svg.querySelectorAll('rect')].map(r => r.getBoundingClientRect());
  const texts = [...svg.querySelectorAll('text')]
    .map(t => [t.textContent, t.getBoundingClientRect()]);
  const hit = (a, b) => a.left < b.right - 0.5 && b.left < a.right - 0.5 &&
                        a.top < b.bottom - 0.5 && b.top < a.bottom - 0.5;
  const problems = [];
  for (const [label, t] of texts) {
    if (bars.some(b => hit(t, b))) problems.push('overlaps a bar: ' + label);
    if (t.left < box.left - 0.5 || t.right > box.right + 0.5) problems.push('clipped: ' + label);
  }
  return {problems, texts: texts.length, bars: bars.length,
          better: texts.filter(([l]) => l.includes('better')).map(([l]) => l)};
}"""


def check_chart_layout(page) -> None:
    layout = page.evaluate(CHART_LAYOUT_JS)
    assert layout["problems"] == [], layout["problems"]
    assert layout["bars"] == 4 and layout["texts"] >= 10  # 2 titles, 4 names, 4 values
    # The titles mark each metric's direction; the better model is starred.
    assert any("↑ higher is better" in t for t in layout["better"])
    assert any("↓ lower is better" in t for t in layout["better"])
    assert any("★ better" in t for t in layout["better"])


@pytest.mark.slow  # a real browser against a real server
def test_browse_compare_demo_and_license(site):
    from playwright.sync_api import expect, sync_playwright

    market, url = site
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        expect(page.locator("#preview-banner")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "catalog.png"), full_page=True)

        page.click("text=law-expert")
        expect(page.locator("h1")).to_have_text("law-expert")
        expect(page.locator("svg.bench rect.bar-expert")).to_have_count(2)
        expect(page.locator("svg.bench rect.bar-base")).to_have_count(2)  # side by side
        page.screenshot(path=str(ARTIFACTS / "expert.png"), full_page=True)
        check_chart_layout(page)

        page.goto(url + "/")
        page.check("input[value='law-expert']")
        page.check("input[value='finance-expert']")
        page.click("#compare-button")
        table = page.locator("#compare-table")
        expect(table).to_contain_text("law-expert")
        expect(table).to_contain_text("finance-expert")
        expect(table).to_contain_text("finance_qa")
        # each expert's delta against the base, with its direction
        expect(table.locator(".delta").first).to_contain_text("Δ +")
        expect(table.locator(".better").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)

        page.goto(url + "/demo?expert=medicine-expert")
        page.fill("#demo-prompt", "def read_config(path):")
        page.click("#demo-run")
        expect(page.locator("#demo-status")).to_have_text("done")
        tokens = page.locator("#demo-output span.tok")
        assert tokens.count() >= 1
        experts = {tokens.nth(i).get_attribute("data-expert") for i in range(tokens.count())}
        assert experts <= {"medicine-expert", "base"}
        assert page.locator("#demo-output").inner_text().strip()
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

        page.goto(url + "/account")
        page.fill("#signup-name", "Browser Buyer")
        page.click("#signup-button")
        key = page.locator("#api-key").inner_text()
        assert key.startswith("taas_")
        page.goto(url + "/experts/finance-expert")
        page.select_option("select[name=kind]", "weight")
        page.click("#license-button")
        expect(page.locator("#licences")).to_contain_text("finance-expert")
        form = page.locator("#licences form.download-form")  # the signature travels in a POST
        assert "/download/" in form.get_attribute("action")
        with page.expect_download() as download:
            form.locator("button", has_text="weights").click()
        assert download.value.suggested_filename == "finance-expert-1.tar.gz"
        page.screenshot(path=str(ARTIFACTS / "account.png"), full_page=True)

        page.click("#new-key-button")
        second = page.locator("#api-key").inner_text()
        assert second.startswith("taas_") and second != key
        first_row = page.locator(f"tr[data-key-id='{key.split('_')[1]}']")
        first_row.locator(".revoke-button").click()
        expect(first_row.locator(".key-status")).to_contain_text("revoked")
        second_row = page.locator(f"tr[data-key-id='{second.split('_')[1]}']")
        expect(second_row.locator(".key-status")).to_have_text("active")
        browser.close()
    assert market.licensing.authenticate(key) == "revoked"
    buyer, _ = market.licensing.authenticate(second)
    assert [(lic.expert_name, lic.kind) for lic in market.licensing.licences_of(buyer)] == [
        ("finance-expert", "weight")
    ]
