"""The approvals console in a real browser: Debian's Chromium, driven by Selenium, against
a real `mcp-policy serve` (tests/console_world.py).

An approver signs in with their secret, sees a new approval arrive without a reload
(server-sent events), approves it with one click and the identical call goes through
exactly once; denies one with a comment and the agent reads the comment; a wrong secret
and an agent's key do not sign in; the call's own user sees no buttons and is refused;
a POST without the CSRF token is refused. Screenshots of the main pages are saved in each
test's temporary directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser import chromium, screenshot, wait_for
from tests.conftest import approval_call
from tests.console_world import World, start_world

COOKIE = "mcp_policy_console"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    found = start_world(tmp_path_factory.mktemp("console-browser"))
    yield found
    found.serve.stop()


@pytest.fixture
def driver() -> Iterator[WebDriver]:
    with chromium() as found:
        yield found


def sign_in(driver: WebDriver, world: World, secret: str) -> None:
    driver.get(world.url + "/console/sign-in")
    driver.find_element(By.ID, "secret").send_keys(secret)
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()


def signed_in_live(driver: WebDriver, world: World, secret: str) -> None:
    """Signed in, on the pending page, its event stream open."""
    sign_in(driver, world, secret)
    wait_for(driver, lambda d: d.find_elements(By.ID, "pending"))
    wait_for(driver, lambda d: d.find_element(By.ID, "live").is_displayed())


def card(driver: WebDriver, approval_id: str) -> Any:
    return wait_for(driver, lambda d: d.find_element(By.ID, f"approval-{approval_id}"))


def gone(driver: WebDriver, approval_id: str) -> None:
    wait_for(driver, lambda d: not d.find_elements(By.ID, f"approval-{approval_id}"))


def post_from_page(driver: WebDriver, path: str, headers: dict[str, str]) -> int:
    """The status of a POST the page's own script sends (same origin, its cookies)."""
    status: int = driver.execute_async_script(
        """
        const [path, headers, done] = arguments;
        fetch(path, {method: "POST", headers: {"Accept": "application/json", ...headers},
                     body: new URLSearchParams({comment: "from a script"}),
                     credentials: "same-origin"})
          .then((r) => done(r.status), (e) => done(-1));
        """,
        path,
        headers,
    )
    return status


def test_an_approval_arrives_live_and_one_click_lets_the_call_through_once(
    driver: WebDriver, world: World, tmp_path: Path
) -> None:
    signed_in_live(driver, world, world.approvers["alice"])
    driver.execute_script("window.notReloaded = true")
    call, approval_id = world.pending_approval()
    shown = card(driver, approval_id)
    assert driver.execute_script("return window.notReloaded === true"), "no reload happened"
    assert "copy_image_set" in shown.text and "user-1" in shown.text
    screenshot(driver, tmp_path / "pending.png")
    shown.find_element(By.CSS_SELECTOR, "button.approve").click()
    gone(driver, approval_id)
    assert world.decide(call)["verdict"] == "allow"
    again = world.decide(call)
    assert again["verdict"] == "approval_required", "one grant, one call"
    assert again["approval"]["id"] != approval_id
    driver.get(f"{world.url}/console/approvals/{approval_id}")
    page = wait_for(driver, lambda d: d.find_element(By.ID, "approval"))
    assert "used" in page.find_element(By.CSS_SELECTOR, ".badge").text
    assert "alice" in driver.find_element(By.CSS_SELECTOR, ".timeline").text
    screenshot(driver, tmp_path / "approval.png")


def test_a_denial_with_a_comment_reaches_the_agent(
    driver: WebDriver, world: World, tmp_path: Path
) -> None:
    signed_in_live(driver, world, world.approvers["alice"])
    call, approval_id = world.pending_approval()
    shown = card(driver, approval_id)
    comment = "not during the migration window, ask Dana"
    shown.find_element(By.CSS_SELECTOR, "input[name=comment]").send_keys(comment)
    shown.find_element(By.CSS_SELECTOR, "button.deny").click()
    gone(driver, approval_id)
    # The agent asks about its approval (as a waiting proxy does, by its id): the answer
    # is the denial, with the approver's words.
    answer = world.decide({**call, "approval_id": approval_id})
    assert answer["verdict"] == "deny"
    assert comment in answer["reason"] and "alice" in answer["reason"]
    assert comment in answer["mcp_result"]["content"][0]["text"]
    driver.get(f"{world.url}/console/history?status=denied")
    wait_for(driver, lambda d: approval_id in d.page_source)
    screenshot(driver, tmp_path / "history.png")


@pytest.mark.parametrize("who", ["a wrong secret", "an agent's key", "a proxy's token"])
def test_only_an_approver_secret_signs_in(
    driver: WebDriver, world: World, tmp_path: Path, who: str
) -> None:
    secret = {
        "a wrong secret": "mcpa_not-a-real-secret",
        "an agent's key": world.agent_key,
        "a proxy's token": world.client_token,
    }[who]
    sign_in(driver, world, secret)
    error = wait_for(driver, lambda d: d.find_element(By.ID, "sign-in-error"))
    assert "not an approver" in error.text
    assert COOKIE not in {c["name"] for c in driver.get_cookies()}
    screenshot(driver, tmp_path / "sign-in-refused.png")
    driver.get(world.url + "/console")
    assert driver.current_url.startswith(world.url + "/console/sign-in")


def test_the_calls_own_user_sees_no_buttons_and_is_refused(driver: WebDriver, world: World) -> None:
    """uma is the user of the test calls (four eyes): hers never show, even live, and a
    forged POST from her own page is refused; another user's call shows up for her."""
    signed_in_live(driver, world, world.approvers["uma"])
    _, own = world.pending_approval()
    others = approval_call()
    others["principal"]["user_id"] = "someone-else"
    _, theirs = world.pending_approval(others)
    card(driver, theirs)  # events are in order: uma's own came before and was not shown
    assert not driver.find_elements(By.ID, f"approval-{own}")
    csrf = driver.find_element(By.TAG_NAME, "body").get_attribute("data-csrf") or ""
    status = post_from_page(driver, f"/console/approvals/{own}/approve", {"X-CSRF-Token": csrf})
    assert status == 403
    driver.get(f"{world.url}/console/approvals/{own}")
    assert "no approval with this id" in driver.find_element(By.ID, "problem").text
    assert not driver.find_elements(By.CSS_SELECTOR, "form.decide")


def test_a_post_without_the_csrf_token_is_refused(driver: WebDriver, world: World) -> None:
    signed_in_live(driver, world, world.approvers["alice"])
    call, approval_id = world.pending_approval()
    card(driver, approval_id)
    assert post_from_page(driver, f"/console/approvals/{approval_id}/approve", {}) == 403
    assert (
        post_from_page(
            driver, f"/console/approvals/{approval_id}/approve", {"X-CSRF-Token": "forged"}
        )
        == 403
    )
    assert world.decide(call)["verdict"] == "approval_required", "still waiting for a human"


def test_the_console_reads_on_a_phone(driver: WebDriver, world: World, tmp_path: Path) -> None:
    driver.set_window_size(390, 844)
    driver.get(world.url + "/console/sign-in")
    screenshot(driver, tmp_path / "sign-in-phone.png")
    signed_in_live(driver, world, world.approvers["alice"])
    _, approval_id = world.pending_approval()
    shown = card(driver, approval_id)
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
    assert shown.find_element(By.CSS_SELECTOR, "button.approve").is_displayed()
    screenshot(driver, tmp_path / "pending-phone.png")
