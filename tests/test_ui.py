"""The web UI in a real browser: Playwright driving Debian's chromium against the real API."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from app import Settings
from streams import NatsServer
from tests.conftest import MEDIA, ApiServer, WorkerRunner, submit, wait_terminal
from tests.llm_server import FakeLLM
from tests.test_media_ops import llm_settings, running
from tests.test_recovery import wait_ready
from tests.test_security import put_key

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("JOBCAST_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
"""The network flags keep chromium from calling home (refused here, and slow to give up)."""


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: JOBCAST_UI_SHOTS (`just screenshots` points it at docs/img), else a temp dir."""
    wanted = os.environ.get("JOBCAST_UI_SHOTS")
    folder = Path(wanted) if wanted else tmp_path_factory.mktemp("ui-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless; installed by .ci/run, never downloaded."""
    assert HAVE_CHROMIUM, f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def page(browser: Browser, api: ApiServer) -> AsyncIterator[Page]:
    """A fresh browser page whose relative URLs go to the API; fails the test on a script error."""
    context = await browser.new_context(base_url=api.url, viewport={"width": 1200, "height": 800})
    tab = await context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    await context.close()
    assert not errors, f"JavaScript errors: {errors}"


async def shot(page: Page, folder: Path, name: str) -> None:
    """Save a full-page screenshot, and check it is a real PNG."""
    path = folder / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def header_links(page: Page) -> list[tuple[str, str]]:
    """The header's navigation: (text, href) pairs."""
    links = page.get_by_role("navigation", name="main").get_by_role("link")
    return [((await a.inner_text()).strip(), await a.get_attribute("href") or "") for a in await links.all()]


NAV = [("Submit", "/ui"), ("Recent jobs", "/ui/jobs"), ("Queue", "/ui/queue")]

# The progress bar's values as the page shows them, recorded by the page itself: a reload would
# wipe the list and the marker, so finding both at the end proves the bar moved in place.
RECORD_PROGRESS = """() => {
  window.__notReloaded = true;
  window.__progress = [];
  const bar = document.querySelector('.live [role=progressbar]');
  new MutationObserver(() => window.__progress.push(Number(bar.getAttribute('aria-valuenow'))))
    .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
}"""


async def test_submit_from_the_form_and_watch_progress_live(
    page: Page, client: httpx.AsyncClient, worker: WorkerRunner, shots: Path
) -> None:
    await page.goto("/ui")
    assert await header_links(page) == NAV
    await page.select_option("#operation", "noop")
    assert await page.locator("fieldset[data-op=noop]").is_visible()
    assert not await page.locator("fieldset[data-op=transcribe]").is_visible()
    options = page.locator("fieldset[data-op=noop]")
    await options.locator("input[name=duration_s]").fill("3")
    await options.locator("input[name=steps]").fill("6")
    await page.fill("#title", "from the form")
    await shot(page, shots, "submit")
    await page.click("#submit-button")

    await page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    await page.evaluate(RECORD_PROGRESS)
    job = page.locator("#job")
    await expect(job).to_have_attribute("data-status", "running", timeout=10_000)
    await expect(page.locator("#step")).to_contain_text("step", timeout=10_000)
    await shot(page, shots, "job-running")
    await expect(job).to_have_attribute("data-status", "completed", timeout=20_000)

    bar = page.locator(".live [role=progressbar]")
    await expect(bar).to_have_attribute("aria-valuenow", "100.0")
    await expect(page.locator(".live [data-role=pct]")).to_have_text("100 %")
    seen: list[float] = await page.evaluate("window.__progress")
    assert await page.evaluate("window.__notReloaded") is True
    assert len({v for v in seen if 0 < v < 100}) >= 2, seen  # it moved through steps, live
    assert seen == sorted(seen), seen
    assert seen[-1] == 100

    timeline = page.locator("#timeline li")
    kinds = [await li.get_attribute("data-kind") for li in await timeline.all()]
    assert kinds[:2] == ["submitted", "started"], kinds
    assert kinds[-1] == "completed", kinds
    assert kinds.count("progress") == 6
    await expect(page.locator("#summary")).to_contain_text('"steps": 6')
    assert await page.locator("[data-action=cancel]").is_hidden()
    assert await page.locator("[data-action=delete]").is_visible()
    await shot(page, shots, "job-completed")

    stored = (await client.get(f"/api/v1/jobs/{job_id}")).json()
    assert stored["title"] == "from the form"
    assert stored["params"] == {**stored["params"], "steps": 6, "duration_s": 3.0}
    assert (stored["status"], stored["progress"]) == ("completed", 100)


async def test_cancel_a_running_job_from_its_page(
    page: Page, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    job = await submit(client, params={"duration_s": 60, "steps": 60}, title="long one")
    await page.goto(f"/ui/jobs/{job['id']}")
    root = page.locator("#job")
    await expect(root).to_have_attribute("data-status", "running", timeout=10_000)
    assert await page.locator("[data-action=retry]").is_hidden()
    await page.click("[data-action=cancel]")

    await expect(root).to_have_attribute("data-status", "cancelled", timeout=10_000)
    await expect(page.locator("#summary")).to_contain_text("Cancelled")
    await expect(page.locator(".live [data-role=status]")).to_have_text("cancelled")
    kinds = [await li.get_attribute("data-kind") for li in await page.locator("#timeline li").all()]
    assert kinds[-2:] == ["cancel_requested", "cancelled"], kinds
    assert await page.locator("[data-action=retry]").is_visible()
    stored = await wait_terminal(client, job["id"])
    assert stored["status"] == "cancelled"
    assert stored["progress"] < 100

    # retry from the page runs it again, and the page follows the new attempt
    await page.click("[data-action=retry]")
    await expect(root).to_have_attribute("data-status", re.compile("pending|running"), timeout=10_000)
    await expect(page.locator("#attempt")).to_have_text("2")
    await client.post(f"/api/v1/jobs/{job['id']}/cancel")
    await expect(root).to_have_attribute("data-status", "cancelled", timeout=10_000)

    # delete: confirm, then back to the list, and the job is gone
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click("[data-action=delete]")
    await page.wait_for_url(re.compile(r"/ui/jobs$"))
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).status_code == 404


async def wait_status(client: httpx.AsyncClient, job_id: str, status: str) -> None:
    """Wait (at most 10 s) until the job has `status`."""
    async with asyncio.timeout(10):
        job = (await client.get(f"/api/v1/jobs/{job_id}")).json()
        while job["status"] != status:
            answer = await client.get(
                f"/api/v1/jobs/{job_id}/poll", params={"timeout": 5, "current_status": job["status"]}
            )
            job = answer.json()


async def rows(page: Page) -> list[str]:
    """Job ids of the list's rows, top to bottom."""
    return [await tr.get_attribute("data-job-id") or "" for tr in await page.locator("tr[data-job-id]").all()]


async def test_filter_by_two_statuses(
    page: Page, client: httpx.AsyncClient, worker: WorkerRunner, shots: Path
) -> None:
    done = [await submit(client, params={"steps": 1}, title=f"ok {i}") for i in range(3)]
    failed = [await submit(client, params={"steps": 1, "fail": True}, title=f"bad {i}") for i in range(2)]
    for job in done + failed:
        await wait_terminal(client, job["id"])
    running = await submit(client, params={"duration_s": 60, "steps": 60}, title="still running")
    await wait_status(client, running["id"], "running")
    cancelled = await submit(client, params={"steps": 1}, scheduled_for="2100-01-01T00:00:00Z")
    await client.post(f"/api/v1/jobs/{cancelled['id']}/cancel")
    await wait_terminal(client, cancelled["id"])

    await page.goto("/ui/jobs")
    assert await header_links(page) == NAV
    await expect(page.locator("#showing")).to_have_text("Showing 7 of 7 (jobs 1-7)")
    await page.check("input[name=status][value=failed]")
    await page.check("input[name=status][value=cancelled]")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url(re.compile(r"\?status=failed&status=cancelled&type=$"))

    await expect(page.locator("#showing")).to_have_text("Showing 3 of 3 (jobs 1-3)")
    assert await rows(page) == [cancelled["id"], failed[1]["id"], failed[0]["id"]]  # newest first
    badges = await page.locator("tr[data-job-id] [data-role=status]").all_inner_texts()
    assert badges == ["cancelled", "failed", "failed"]
    assert await page.locator("input[name=status][value=failed]").is_checked()
    assert not await page.locator("input[name=status][value=completed]").is_checked()
    await shot(page, shots, "jobs-filtered")

    # the type filter narrows further; no match says so
    await page.goto("/ui/jobs?status=running&type=transcribe")
    await expect(page.locator("#showing")).to_have_text("Showing 0 of 0")
    await expect(page.locator(".empty")).to_contain_text("No jobs match")
    await page.goto("/ui/jobs?status=running&type=noop")
    assert await rows(page) == [running["id"]]
    row = page.locator(f"tr[data-job-id='{running['id']}']")
    rendered = await row.locator("[data-role=pct]").inner_text()
    await expect(row.locator("[data-role=pct]")).not_to_have_text(rendered, timeout=5_000)  # rows move live
    link = page.locator(f"tr[data-job-id='{running['id']}'] a").first
    await link.click()
    await page.wait_for_url(f"**/ui/jobs/{running['id']}")
    await expect(page.locator("h1")).to_contain_text("still running")


async def test_page_through_60_jobs(page: Page, client: httpx.AsyncClient, shots: Path) -> None:
    submitted = [(await submit(client, params={"steps": 0}, title=f"job {i:02d}"))["id"] for i in range(60)]
    newest_first = submitted[::-1]

    await page.goto("/ui/jobs")
    seen: list[str] = []
    for number, first in ((1, 1), (2, 21), (3, 41)):
        await expect(page.locator("#showing")).to_have_text(f"Showing 20 of 60 (jobs {first}-{first + 19})")
        await expect(page.locator(".pager")).to_contain_text(f"Page {number} of 3")
        seen += await rows(page)
        if number == 1:
            await shot(page, shots, "jobs")
            assert await page.locator(".pager a[rel=prev]").count() == 0
        if number < 3:
            await page.click(".pager a[rel=next]")
            await page.wait_for_url(re.compile(rf"page={number + 1}$"))
    assert seen == newest_first
    assert await page.locator(".pager a[rel=next]").count() == 0
    await page.click(".pager a[rel=prev]")
    await page.wait_for_url(re.compile(r"page=2$"))
    assert await rows(page) == newest_first[20:40]
    titles = await page.locator("tr[data-job-id] td:first-child a").all_inner_texts()
    assert titles[0] == "job 39"
    assert titles[-1] == "job 20"


async def test_batch_of_files_with_children_live_and_downloads(
    page: Page, gpu: WorkerRunner, tmp_path: Path, shots: Path
) -> None:
    second = tmp_path / "second.flac"
    second.write_bytes((MEDIA / "jfk.flac").read_bytes())
    await page.goto("/ui")
    await page.select_option("#operation", "generate_srt")
    assert await page.locator("#files").is_visible()
    await page.locator("fieldset[data-op=generate_srt] input[name=beam_size]").fill("1")
    await page.set_input_files("#files", [str(MEDIA / "jfk.flac"), str(second)])
    await page.click("#submit-button")
    await page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))

    children = page.locator("tr[data-child-id]")
    await expect(children).to_have_count(2)
    await expect(page.locator("tr[data-child-id] [data-role=status]")).to_have_text(
        ["completed", "completed"], timeout=60_000
    )
    await expect(page.locator("#job")).to_have_attribute("data-status", "completed", timeout=10_000)
    files = await page.locator("tr[data-child-id] td:nth-child(2)").all_inner_texts()
    assert sorted(files) == ["jfk.flac", "second.flac"]
    await shot(page, shots, "batch")

    await children.first.locator("a").click()
    await page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    downloads = page.locator(".downloads a")
    await expect(downloads).to_have_count(2)
    names = sorted(await downloads.all_inner_texts())
    assert names in (["jfk.srt", "jfk.vtt"], ["second.srt", "second.vtt"])
    srt_link = page.locator(".downloads a", has_text=".srt")
    body = await (await page.request.get(await srt_link.get_attribute("href") or "")).text()
    assert "-->" in body
    assert "country" in body.lower()
    await expect(page.locator("dl.meta")).to_contain_text(names[0].split(".")[0] + ".flac")


async def test_a_pipeline_of_three_stages_from_the_form(
    page: Page, client: httpx.AsyncClient, nats_server: NatsServer, gpu: WorkerRunner, tmp_path: Path,
    shots: Path,
) -> None:  # fmt: skip
    await page.goto("/ui")
    await page.select_option("#operation", "generate_srt")
    await page.locator("#submit-form > fieldset[data-op=generate_srt] input[name=beam_size]").fill("1")
    await page.click("#add-stage")
    await page.click("#add-stage")
    stages = page.locator("#stages > li")
    await expect(stages).to_have_count(2)
    await stages.nth(1).locator("[data-role=stage-op]").select_option("convert")
    await stages.nth(1).locator("[data-role=remove-stage]").click()
    await expect(stages).to_have_count(1)
    stage = stages.first
    await stage.locator("[data-role=stage-op]").select_option("fix_srt")
    assert await stage.locator("fieldset[data-op=fix_srt]").is_visible()
    assert not await stage.locator("fieldset[data-op=transcribe]").is_visible()
    await stage.locator("fieldset[data-op=fix_srt] input[name=chunk_size]").fill("20")
    await page.click("#add-stage")
    await expect(stages).to_have_count(2)
    third = stages.nth(1)
    await third.locator("[data-role=stage-op]").select_option("translate_srt")
    await third.locator("fieldset[data-op=translate_srt] input[name=languages]").fill("de, fr")
    await page.fill("#title", "talk")

    second = tmp_path / "second.flac"
    second.write_bytes((MEDIA / "jfk.flac").read_bytes())
    await page.set_input_files("#files", [str(MEDIA / "jfk.flac"), str(second)])
    await page.click("#submit-button")
    await expect(page.locator("#form-error")).to_contain_text("A pipeline runs on one file")
    await page.set_input_files("#files", str(MEDIA / "jfk.flac"))
    await shot(page, shots, "submit-pipeline")
    with FakeLLM() as fake:
        async with running(llm_settings(nats_server, fake)):
            await page.click("#submit-button")
            await page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
            await expect(page.locator("section h2", has_text="Stages")).to_be_visible()
            rows = page.locator("tr[data-child-id]")
            await expect(rows).to_have_count(3)
            await expect(rows.locator("td:first-child a")).to_have_text(
                ["talk · stage 1: generate_srt", "talk · stage 2: fix_srt", "talk · stage 3: translate_srt"]
            )
            await expect(page.locator("tr[data-child-id] [data-role=status]")).to_have_text(
                ["completed", "completed", "completed"], timeout=90_000
            )
            await expect(page.locator("#job")).to_have_attribute("data-status", "completed", timeout=10_000)
    await expect(page.locator("#step")).to_have_text("3 of 3 stages done")
    downloads = page.locator(".downloads a")
    await expect(downloads).to_have_count(7)
    assert sorted(await downloads.all_inner_texts()) == [
        "jfk.fixed.de.srt", "jfk.fixed.de.vtt", "jfk.fixed.fr.srt", "jfk.fixed.fr.vtt",
        "jfk.fixed.srt", "jfk.srt", "jfk.vtt",
    ]  # fmt: skip
    german = page.locator(".downloads a", has_text="fixed.de.srt")
    translated = await (await page.request.get(await german.get_attribute("href") or "")).text()
    assert "[de]" in translated
    fixed = page.locator(".downloads a", has_text="jfk.fixed.srt")
    body = await (await page.request.get(await fixed.get_attribute("href") or "")).text()
    assert "-->" in body
    assert "country" in body.lower()
    await shot(page, shots, "pipeline")

    pipeline = (await client.get(f"/api/v1/jobs/{page.url.rsplit('/', 1)[1]}")).json()
    assert (pipeline["type"], pipeline["title"], pipeline["status"]) == ("pipeline", "talk", "completed")
    assert [(s["type"], s["params"]) for s in pipeline["params"]["stages"]] == [
        ("generate_srt", {**pipeline["params"]["stages"][0]["params"], "beam_size": 1}),
        ("fix_srt", {**pipeline["params"]["stages"][1]["params"], "chunk_size": 20}),
        ("translate_srt", {**pipeline["params"]["stages"][2]["params"], "languages": ["de", "fr"]}),
    ]
    assert "ask not" in fake.requests[0].user.lower()


async def test_batch_of_identical_jobs_children_move_live(
    page: Page, client: httpx.AsyncClient, worker: WorkerRunner
) -> None:
    await page.goto("/ui")
    await page.fill("#count", "3")
    options = page.locator("fieldset[data-op=noop]")
    await options.locator("input[name=duration_s]").fill("1")
    await options.locator("input[name=steps]").fill("2")
    await page.click("#submit-button")
    await page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
    await page.evaluate("window.__notReloaded = true")
    rendered = await page.locator("tr[data-child-id] [data-role=status]").all_inner_texts()
    assert len(rendered) == 3
    assert "completed" not in rendered[1:]  # one slot: the later children were still waiting

    statuses = page.locator("tr[data-child-id] [data-role=status]")
    await expect(statuses).to_have_text(["completed"] * 3, timeout=20_000)
    await expect(page.locator("tr[data-child-id] [data-role=pct]")).to_have_text(["100 %"] * 3)
    await expect(page.locator("#job")).to_have_attribute("data-status", "completed")
    await expect(page.locator("#step")).to_have_text("3 of 3 done")
    assert await page.evaluate("window.__notReloaded") is True
    parent = page.url.rsplit("/", 1)[1]
    children = (await client.get(f"/api/v1/jobs/{parent}/children")).json()
    assert [c["status"] for c in children] == ["completed"] * 3
    ids = [await tr.get_attribute("data-child-id") for tr in await page.locator("tr[data-child-id]").all()]
    assert ids == [c["id"] for c in children]


async def test_form_errors_are_shown(page: Page, client: httpx.AsyncClient, worker: WorkerRunner) -> None:
    await page.goto("/ui")
    await page.select_option("#operation", "transcribe")
    await page.click("#submit-button")
    await expect(page.locator("#form-error")).to_contain_text("Choose a file")
    await page.select_option("#operation", "noop")
    await page.locator("fieldset[data-op=noop] input[name=steps]").fill("-3")
    await page.click("#submit-button")
    await expect(page.locator("#form-error")).to_contain_text("$.params.steps")
    assert page.url.endswith("/ui")
    await page.goto("/ui/jobs/no-such-job")
    await expect(page.locator(".error")).to_have_text("job no-such-job not found")
    response = await page.goto("/ui/jobs?status=bogus")
    assert response is not None
    assert response.status == 400
    await expect(page.locator(".error")).to_have_text("status: Invalid enum value 'bogus'")

    # what users type is shown as text, never run as markup
    title = "<img src=x onerror=\"document.title='owned'\">"
    job = await submit(client, params={"steps": 0}, title=title)
    for url in ("/ui/jobs", f"/ui/jobs/{job['id']}"):
        await page.goto(url)
        await expect(page.get_by_text(title).first).to_be_visible()
        assert await page.locator("main img").count() == 0
        assert await page.title() != "owned"


async def test_queue_page(page: Page, client: httpx.AsyncClient, worker: WorkerRunner, shots: Path) -> None:
    for _ in range(2):
        await wait_terminal(client, (await submit(client, params={"steps": 1}))["id"])
    await page.goto("/ui/queue")
    assert await header_links(page) == NAV
    tiles = dict(
        zip(
            await page.locator(".tile .label").all_inner_texts(),
            await page.locator(".tile .value").all_inner_texts(),
            strict=True,
        )
    )
    assert tiles["Completed"] == "2"
    assert tiles["Total"] == "2"
    assert tiles["Pending"] == "0"
    await expect(page.locator("dl.meta")).to_contain_text("nats-jetstream")
    await expect(page.locator("table").first).to_contain_text("test-worker")  # local mode is admin
    await shot(page, shots, "queue")


@pytest.fixture
async def keyed_api(
    nats_server: NatsServer, settings: Settings
) -> AsyncIterator[tuple[ApiServer, dict[str, str]]]:
    """The API with keys for alice and bob: no local mode."""
    keys = {name: await put_key(nats_server.url, name) for name in ("alice", "bob")}
    server = ApiServer(settings)
    await server.start()
    yield server, keys
    await server.stop()


async def test_login_with_a_key_then_use_the_ui(
    browser: Browser, keyed_api: tuple[ApiServer, dict[str, str]], worker: WorkerRunner, shots: Path
) -> None:
    server, keys = keyed_api
    async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": keys["bob"]}) as bob:
        bobs = await submit(bob, params={"steps": 1}, title="bob's")
    context = await browser.new_context(base_url=server.url, viewport={"width": 1200, "height": 800})
    page = await context.new_page()
    try:
        await page.goto("/ui/jobs?status=completed")  # no session: sent to the login form
        await page.wait_for_url(re.compile(r"/ui/login\?next="))
        assert (await page.request.get("/api/v1/jobs", max_redirects=0)).status == 401  # the API stays JSON
        await page.fill("input[name=key]", "not a key")
        await page.click("button[type=submit]")
        await expect(page.locator(".error")).to_have_text("That key is not valid.")
        await shot(page, shots, "login")

        await page.fill("input[name=key]", keys["alice"])
        await page.click("button[type=submit]")
        await page.wait_for_url(re.compile(r"/ui/jobs\?status=completed$"))
        cookies = {c["name"]: c for c in await context.cookies()}
        assert cookies["jobcast_session"]["httpOnly"] is True
        assert keys["alice"] not in cookies["jobcast_session"]["value"]
        await expect(page.locator("header .who")).to_contain_text("alice")

        await page.goto("/ui")
        await page.locator("fieldset[data-op=noop] input[name=steps]").fill("2")
        await page.click("#submit-button")
        await page.wait_for_url(re.compile(r"/ui/jobs/[0-9a-f-]{36}$"))
        await expect(page.locator("#job")).to_have_attribute("data-status", "completed", timeout=15_000)
        await expect(page.locator(".live [role=progressbar]")).to_have_attribute("aria-valuenow", "100.0")
        alices = page.url.rsplit("/", 1)[1]

        await page.goto("/ui/jobs")
        assert await rows(page) == [alices]  # bob's job is not listed
        response = await page.goto(f"/ui/jobs/{bobs['id']}")
        assert response is not None
        assert response.status == 404
        await expect(page.locator(".error")).to_have_text(f"job {bobs['id']} not found")
        await page.goto("/ui/queue")
        assert await page.locator("table").count() == 0  # workers are for admins

        await page.click("header .who button")  # log out
        await page.wait_for_url(re.compile(r"/ui/login$"))
        await page.goto("/ui/jobs")
        await page.wait_for_url(re.compile(r"/ui/login\?next="))
    finally:
        await context.close()


async def test_login_redirect_stays_inside_the_ui(keyed_api: tuple[ApiServer, dict[str, str]]) -> None:
    server, keys = keyed_api
    async with httpx.AsyncClient(base_url=server.url) as anon:
        form = {"key": keys["alice"], "next": "https://evil.example/"}
        answer = await anon.post("/ui/login", data=form)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui"
        assert "jobcast_session=" in answer.headers["set-cookie"]
        anon.cookies.clear()
        page: Any = await anon.get("/ui/jobs")
        assert page.status_code == 303
        assert page.headers["location"] == "/ui/login?next=%2Fui%2Fjobs"


# server-rendered pages, read with httpx ----------------------------------------------------------

ROW = re.compile(r'<tr data-job-id="([^"]+)">(.*?)</tr>', re.S)


def listed_rows(html: str) -> dict[str, str]:
    """The recent-jobs table's rows: job id -> the row's markup, top to bottom."""
    return dict(ROW.findall(html))


def cell(row: str, role: str) -> str:
    """The text of a row's cell marked `data-role=role`."""
    found = re.search(rf'<td data-role="{role}">(.*?)</td>', row, re.S)
    assert found, row
    return found.group(1).strip()


@pytest.fixture
async def owners(nats_server: NatsServer, settings: Settings) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """The API with keys for alice and bob (users) and root (admin), and a client for each."""
    keys = {"alice": await put_key(nats_server.url, "alice"), "bob": await put_key(nats_server.url, "bob"),
            "root": await put_key(nats_server.url, "root", admin=True)}  # fmt: skip
    server = ApiServer(settings)
    await server.start()
    clients = {
        name: httpx.AsyncClient(base_url=server.url, timeout=30, headers={"X-API-Key": key})
        for name, key in keys.items()
    }
    try:
        yield clients
    finally:
        for http in clients.values():
            await http.aclose()
        await server.stop()


async def test_admins_filter_recent_jobs_by_owner(owners: dict[str, httpx.AsyncClient]) -> None:
    alice, bob, root = owners["alice"], owners["bob"], owners["root"]
    alices = await submit(alice, params={"steps": 0}, title="alice's")
    bobs = [(await submit(bob, params={"steps": 0}, title=f"bob's {i}"))["id"] for i in range(21)]

    page = await root.get("/ui/jobs")  # an admin sees every owner's jobs, and whose each is
    assert page.status_code == 200
    assert 'name="owner"' in page.text
    rows = listed_rows(page.text)
    assert list(rows)[:2] == [bobs[-1], bobs[-2]]
    assert cell(rows[bobs[-1]], "owner") == "bob"
    assert "Showing 20 of 22" in page.text

    page = await root.get("/ui/jobs", params={"owner": "bob"})
    assert list(listed_rows(page.text)) == bobs[::-1][:20]
    assert 'name="owner" value="bob"' in page.text  # the filter bar keeps what was chosen
    assert "Showing 20 of 21" in page.text
    next_url = re.search(r'<a href="([^"]+)" rel="next">', page.text)
    assert next_url
    assert "owner=bob" in next_url.group(1)  # paging keeps the filter
    page = await root.get(next_url.group(1).replace("&amp;", "&"))
    assert list(listed_rows(page.text)) == [bobs[0]]
    page = await root.get("/ui/jobs", params={"owner": "alice", "status": "pending"})
    assert list(listed_rows(page.text)) == [alices["id"]]
    page = await root.get(f"/ui/jobs/{alices['id']}")  # a row of the admin's list opens
    assert page.status_code == 200
    assert "alice&#39;s" in page.text

    page = await alice.get("/ui/jobs")  # a user has no owner filter and sees only theirs
    assert 'name="owner"' not in page.text
    assert list(listed_rows(page.text)) == [alices["id"]]
    assert 'data-role="owner"' not in page.text
    page = await alice.get("/ui/jobs", params={"owner": "alice"})
    assert list(listed_rows(page.text)) == [alices["id"]]
    page = await alice.get("/ui/jobs", params={"owner": "bob"})
    assert page.status_code == 403
    assert "only an admin key may list the jobs of other owners" in page.text
    assert not listed_rows(page.text)
    assert all(job_id not in page.text for job_id in bobs)


async def test_a_deleted_input_keeps_its_name_on_its_jobs(
    api: ApiServer, client: httpx.AsyncClient, settings: Settings
) -> None:
    stored = (await client.post("/api/v1/files", files={"file": ("talk.flac", b"fLaC", "audio/flac")})).json()
    job = await submit(client, type="transcribe", file_id=stored["id"], title="the talk")
    assert job["file_name"] == "talk.flac"
    answer = await client.post("/api/v1/jobs/batch", json={"type": "transcribe", "file_ids": [stored["id"]]})
    assert answer.status_code == 202, answer.text
    (child,) = (await client.get(f"/api/v1/jobs/{answer.json()['id']}/children")).json()
    assert child["file_name"] == "talk.flac"
    deleted = await client.delete(f"/api/v1/files/{stored['id']}")
    assert deleted.status_code == 204, deleted.text

    async def shown() -> None:
        page = await client.get("/ui/jobs")
        assert cell(listed_rows(page.text)[job["id"]], "file") == "talk.flac"
        page = await client.get(f"/ui/jobs/{job['id']}")
        assert re.search(r"<dt>Input</dt><dd>talk\.flac", page.text), page.text
        page = await client.get(f"/ui/jobs/{answer.json()['id']}")
        assert (
            cell(re.findall(r"<tr data-child-id=[^>]+>(.*?)</tr>", page.text, re.S)[0], "file") == "talk.flac"
        )
        assert (await client.get(f"/api/v1/jobs/{job['id']}")).json()["file_name"] == "talk.flac"

    await shown()
    await api.stop()  # the name is in the stream's submission: a database rebuilt from it has it too
    for suffix in ("", "-wal", "-shm"):
        (settings.data_dir / f"jobcast.db{suffix}").unlink(missing_ok=True)
    await api.start()
    await wait_ready(api.url)
    await shown()
