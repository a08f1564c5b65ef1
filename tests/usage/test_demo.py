"""demo: the real command serves Gradio on loopback; Debian's Chromium, driven by Playwright, uses the page.

Set ``DRESS_DEMO_SCREENSHOT=docs/demo.png`` to keep the screenshot the test takes (the README shows it).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium (`apt-get install chromium`; .ci/run installs it). Playwright's own browser download is not used."""
ANSWER_TIMEOUT_MS = 120_000  # the tiny model on 2 busy cores


@pytest.fixture(scope="module")
def demo_url(exported, tmp_path_factory, serving, free_port) -> Iterator[str]:
    """``python -m dress_lightning demo`` on a free loopback port; yields its URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "dress_lightning", "demo", "--checkpoint", str(exported), "--port", str(port),
               "--max-new-tokens", "8"]
    url = f"http://127.0.0.1:{port}"
    with serving(command, url, log_path, env):
        yield url


@pytest.fixture
def page(demo_url):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(demo_url)
        yield page
        browser.close()


def test_pick_an_example_ask_read_the_critique_refine_and_compare(page, tmp_path):
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name="dress_lightning demo")).to_be_visible()
    page.get_by_text("Example 2", exact=True).click()
    question = page.locator("#message textarea")
    expect(question).not_to_have_value("")
    asked = question.input_value()

    page.click("#ask")
    critique = page.locator("#critique")
    expect(critique).to_contain_text("helpfulness", timeout=ANSWER_TIMEOUT_MS)
    expect(critique).to_contain_text("harmlessness")
    bot = page.locator('#chat [data-testid="bot"]')
    expect(bot).to_have_count(1)
    expect(page.locator('#chat [data-testid="user"]').first).to_contain_text(asked)
    refinement = page.locator("#refinement textarea")
    expect(refinement).not_to_have_value("")
    sent = refinement.input_value()

    page.click("#refine")  # the refinement goes back as the next user turn, and the model answers it
    expect(bot).to_have_count(2, timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator('#chat [data-testid="user"]').nth(1)).to_contain_text(sent)

    page.click("#compare")
    expect(page.locator("#compare-a")).to_contain_text("Condition: Feedback: helpfulness 10/10",
                                                       timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#compare-b")).to_contain_text("Condition: None", timeout=ANSWER_TIMEOUT_MS)

    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("DRESS_DEMO_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["DRESS_DEMO_SCREENSHOT"])


def test_an_uploaded_image_without_annotations_gets_an_answer_and_says_why_no_critique(page, tmp_path):
    from playwright.sync_api import expect

    from dress_lightning.session import shapeworld_example

    image, _, _ = shapeworld_example(4)
    path = tmp_path / "mine.png"
    image.save(path)
    page.locator('input[type="file"]').first.set_input_files(str(path))
    page.locator("#message textarea").fill("What do you see?")
    page.click("#ask")
    expect(page.locator("#critique")).to_contain_text("No critique: the annotation judge needs the image's annotations",
                                                      timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(1)
