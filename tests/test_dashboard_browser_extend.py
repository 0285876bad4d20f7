"""The run page's "add steps" control and its GPU memory line, in a real headless Chromium
against a real daemon (fixtures and skip rules: tests/test_dashboard_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_dashboard_browser import TOKEN, browser, served  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(120)


def test_add_steps_from_the_run_page_continues_the_job(browser, served, tmp_path: Path  # noqa: F811
                                                       ) -> None:
    d, origin = served
    first = d.submit_ok({"trainer": "builtin", "steps": 20, "grace": 10,
                         "options": {"output_dir": "lora_out"}}, name="demo")
    assert d.wait(first, timeout=90)["state"] == "completed"
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{origin}/jobs/{first}?token={TOKEN}")
    assert page.url == f"{origin}/jobs/{first}"  # exchanged for the session cookie
    page.wait_for_selector('[data-testid=fact-state]:has-text("completed")', timeout=10_000)
    # CPU slots: the memory is not measured, and the page says why
    page.wait_for_selector('[data-testid=gpu-memory]:has-text("not measured — CPU slot")')
    page.fill("[data-testid=extend-steps]", "15")
    page.click("[data-testid=extend]")
    page.wait_for_selector("#dialog:not([hidden])")
    assert "to 35 steps" in page.inner_text("#dialog-text")
    page.click("[data-testid=confirm]")
    page.wait_for_url(re.compile(rf"{re.escape(origin)}/jobs/(?!{first}$)[0-9]+$"),
                      timeout=10_000)
    new = int(page.url.rsplit("/", 1)[1])
    done = d.wait(new, timeout=90)
    assert (done["state"], done["step"], done["name"]) == ("completed", 35, "demo+15")
    page.wait_for_selector('[data-testid=fact-state]:has-text("completed")', timeout=10_000)
    page.wait_for_function("() => Number(document.querySelector("
                           "'[data-testid=loss-chart]').dataset.lastStep) === 35",
                           timeout=10_000)
    context.close()
    assert [u for u in requests if not u.startswith(origin + "/")] == []
