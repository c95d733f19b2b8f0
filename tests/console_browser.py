"""The console at / in a real browser: Debian's Chromium, driven by Playwright.

Usage: console_browser.py BASE_URL ADMIN_KEY SCREENSHOT.png
       console_browser.py --failed-model BASE_URL MODEL_NAME

The server must have tenants configured (ADMIN_KEY belongs to an admin
tenant) and be idle and ready. Checks that the page loads with no console
errors and asks nothing of any other origin, that its status numbers match
/stats, that a playground question streams into the page token by token,
that the latency charts and the usage table fill in, and saves a full-page
screenshot. The last line printed on success is "all console checks passed".

With --failed-model, checks only that the page names MODEL_NAME as failed,
with the reason /ready gives, while the instance stays ready.
"""

import json
import os
import re
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

FAILED_MODE = sys.argv[1] == "--failed-model"
ARGS = sys.argv[2:] if FAILED_MODE else sys.argv[1:]
BASE, KEY, SHOT = ARGS[0].rstrip("/"), ARGS[1], ARGS[2] if len(ARGS) > 2 else None
CHROMIUM = os.environ.get("INFERD_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 900}


def get(path, key=None):
    req = urllib.request.Request(BASE + path)
    if key:
        req.add_header("Authorization", "Bearer " + key)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def number(text):
    """The page's rendering of an integer ("1,234") as an int."""
    return int(text.replace(",", ""))


def eventually(what, check, limit=20.0):
    """Retries `check` (which raises AssertionError) until it passes."""
    deadline = time.monotonic() + limit
    while True:
        try:
            return check()
        except AssertionError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {e}") from None
            time.sleep(0.25)


def page_matches_stats(page):
    """Every number the page shows under a /stats key equals /stats now
    (the server is idle, so the two reads agree once the page has polled)."""
    stats = get("/stats")
    shown = page.eval_on_selector_all(
        "[data-key]", "els => els.map(e => [e.dataset.key, e.textContent])"
    )
    assert len(shown) >= 6, shown
    for key, text in shown:
        assert number(text) == stats[key], f"{key}: page {text!r}, /stats {stats[key]}"
    models = ", ".join(stats["models"].keys())
    assert page.text_content("#model") == models, (page.text_content("#model"), models)
    assert page.text_content("#backend").startswith(stats["backend"]["device"])
    share = stats["kv_blocks_used"] / stats["kv_blocks_total"] * 100
    assert page.text_content("#stat-kv") == f"{share:.1f} %"
    return stats


def open_page(p, errors, elsewhere):
    # Root in CI: Chromium's sandbox needs user namespaces it may not have.
    browser = p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync"],
    )
    page = browser.new_page(viewport=VIEWPORT)
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} {r.failure}"))
    page.on("request", lambda r: None if r.url.startswith(BASE + "/") else elsewhere.append(r.url))
    page.goto(BASE + "/")
    return browser, page


def failed_model():
    """The page names a model that failed to load, with /ready's reason."""
    errors, elsewhere = [], []
    name = KEY
    with sync_playwright() as p:
        browser, page = open_page(p, errors, elsewhere)
        page.wait_for_selector("#ready-detail", state="visible", timeout=30_000)
        ready = get("/ready")
        reason = next(m["reason"] for m in ready["models"] if m["name"] == name)
        detail = page.text_content("#ready-detail")
        assert detail == f"{name}: failed ({reason})", detail
        assert page.text_content("#ready") == "ready", "the other model serves"
        browser.close()
    assert not errors, "\n".join(errors)
    assert not elsewhere, f"requests to other origins: {elsewhere}"
    print("all console checks passed")


def main():
    errors, elsewhere = [], []
    with sync_playwright() as p:
        browser, page = open_page(p, errors, elsewhere)
        assert page.title() == "inferd console"
        page.wait_for_function("document.getElementById('ready').dataset.state === 'ready'", timeout=30_000)
        assert page.text_content("#ready") == "ready"
        # Every model serves: no line about one that is loading or failed.
        assert not page.is_visible("#ready-detail")
        # Tenants are configured: the key field shows, and usage waits for a key.
        assert page.is_visible("#api-key")
        eventually("usage asks for a key", lambda: _contains(page, "#usage-scope", "Enter an API key"))
        before = eventually("status matches /stats", lambda: page_matches_stats(page))
        assert page.text_content("#stat-ledger") == "ok"

        # The playground: a question streams into the page, piece by piece.
        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")
        page.fill("#pg-temperature", "0")
        page.fill("#pg-max-tokens", "40")
        page.fill("#pg-input", "Name three colours of the rainbow.")
        page.evaluate(
            """() => {
                window.__lengths = [];
                new MutationObserver(() => {
                    const t = document.querySelector('.msg.assistant .text');
                    if (t) window.__lengths.push(t.textContent.length);
                }).observe(document.getElementById('pg-log'),
                           {subtree: true, childList: true, characterData: true});
            }"""
        )
        page.click("#pg-send")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=120_000)
        answer = page.text_content(".msg.assistant .text")
        assert answer.strip(), "the answer is empty"
        lengths = page.evaluate("window.__lengths")
        growth = sorted(set(n for n in lengths if n > 0))
        assert len(growth) >= 3, f"the answer arrived in {len(growth)} pieces, not streamed: {lengths}"
        assert growth[-1] == len(answer), (growth[-1], len(answer))
        meta = page.text_content(".msg.assistant .meta")
        completion = int(page.get_attribute(".msg.assistant .meta", "data-completion-tokens"))
        assert re.search(rf"\+ {completion} completion tokens", meta), meta
        assert "first token" in meta and "finish:" in meta, meta
        assert 0 < completion <= 40, completion

        # The numbers follow: tokens generated, the TTFT chart, the usage table.
        after = eventually("status matches /stats after the answer", lambda: page_matches_stats(page))
        assert after["generated_tokens"] >= before["generated_tokens"] + completion, (before, after)
        # The server has a price (--instance-hourly-cost) and now a throughput.
        assert isinstance(after["cost_per_million_tokens"], float), after["cost_per_million_tokens"]
        eventually("the cost shows", lambda: _contains(page, "#stat-cost", "$"))
        # A chart line is drawn (a flat one has no height, so not "visible").
        for chart in ("ttft", "itl", "tps"):
            page.wait_for_selector(f"#chart-{chart} polyline.p50", state="attached", timeout=10_000)
        assert "p50" in page.text_content("#ttft-window")
        eventually("usage table shows every tenant", lambda: _contains(page, "#usage-scope", "All tenants"))

        def usage_row():
            usage = get("/v1/usage?group_by=tenant,model,feature", KEY)
            rows = page.eval_on_selector_all(
                "#usage-table tbody tr", "trs => trs.map(r => [...r.cells].map(c => c.textContent))"
            )
            assert len(rows) == len(usage["data"]) >= 1, (rows, usage["data"])
            for row, data in zip(rows, usage["data"]):
                assert row[:3] == [data["tenant"], data["model"], data["feature"]], (row, data)
                assert number(row[3]) == data["requests"], (row, data)
                assert number(row[5]) == data["completion_tokens"], (row, data)
            return usage

        usage = eventually("usage table matches /v1/usage", usage_row)
        assert usage["totals"]["completion_tokens"] >= completion
        assert [d["feature"] for d in usage["data"]] == ["console"], usage["data"]

        # A "Good" rating lands in the ledger and in the table.
        page.click(".msg.assistant .meta button >> nth=0")
        eventually("the rating is recorded", lambda: _contains(page, ".msg.assistant .meta", "rated up"))
        eventually(
            "the usage table counts the rating",
            lambda: _true(page.eval_on_selector("#usage-table tbody tr", "r => r.cells[7].textContent") == "1"),
        )
        assert get("/v1/usage?group_by=tenant", KEY)["totals"]["thumbs_up"] == 1

        page.screenshot(path=SHOT, full_page=True)
        browser.close()
    assert not errors, "\n".join(errors)
    assert not elsewhere, f"requests to other origins: {elsewhere}"
    print(f"answer: {answer!r}")
    print(f"screenshot: {SHOT}")
    print("all console checks passed")


def _contains(page, selector, text):
    got = page.text_content(selector) or ""
    assert text in got, f"{selector}: {got!r}"


def _true(value):
    assert value


if __name__ == "__main__":
    failed_model() if FAILED_MODE else main()
