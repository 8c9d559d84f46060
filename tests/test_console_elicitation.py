"""The whole approval loop as people live it: an agent's MCP client (the Python SDK, protocol
2025-11-25, with a URL-mode elicitation handler) calls through `mcp-policy proxy`; its
user is sent to the approval's console page; an approver opens that very URL in a real
Chromium, signs in and clicks Approve (or Deny with a comment); the waiting proxy forwards
the identical call, once (or the agent reads the comment). Nothing is approved through the
API here: the console is the only way in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import mcp_types
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.session import IncomingMessage
from mcp.client.stdio import stdio_client
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from engine.settings import PROJECT_ROOT
from tests.browser import chromium, screenshot, wait_for
from tests.conftest import HEALTHIMAGING, INTO_EXISTING
from tests.console_world import World, start_world
from tests.fixtures.proxy_harness import FIXTURE, PROXY, RECORD_ENV, calls, clean_env, copy_args

WAIT = 60.0  # how long a step may take before the test fails (never a timing assertion)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    found = start_world(tmp_path_factory.mktemp("console-elicitation"))
    yield found
    found.serve.stop()


class User:
    """The person behind the MCP client: notes the URL it is sent to and the completion."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.asked = asyncio.Event()
        self.completed = asyncio.Event()

    async def elicit(
        self, context: Any, params: mcp_types.ElicitRequestParams
    ) -> mcp_types.ElicitResult:
        assert isinstance(params, mcp_types.ElicitRequestURLParams), params
        self.urls.append(params.url)
        self.asked.set()
        return mcp_types.ElicitResult(action="accept")

    async def messages(self, message: IncomingMessage) -> None:
        if isinstance(message, mcp_types.ElicitCompleteNotification):
            self.completed.set()


@contextlib.asynccontextmanager
async def agent(world: World, tmp: Path, user: User) -> AsyncIterator[tuple[ClientSession, Path]]:
    """A 2025-11-25 client through a stdio proxy (the service's known client) in front of
    the fixture server, which records every call it runs."""
    record = tmp / "calls.jsonl"
    env = clean_env(**{RECORD_ENV: str(record), "MCP_POLICY_CLIENT_TOKEN": world.client_token})
    grpc_target = f"127.0.0.1:{world.serve.grpc_port}"
    args = [*PROXY[1:], "proxy", "--decision-url", grpc_target, "--agent-id", "agent-e"]
    args += ["--server-name", HEALTHIMAGING, "--", *FIXTURE]
    params = StdioServerParameters(command=PROXY[0], args=args, env=env, cwd=str(PROJECT_ROOT))
    with (tmp / "proxy.log").open("a") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(
                read, write, elicitation_callback=user.elicit, message_handler=user.messages
            ) as client,
        ):
            await client.initialize()
            assert client.protocol_version == "2025-11-25"
            yield client, record


def decide_in_browser(url: str, world: World, verb: str, comment: str, shots: Path) -> None:
    """Open the URL the client's user was given, sign in as alice, and click `verb`."""
    with chromium() as driver:
        driver.get(url)
        wait_for(driver, lambda d: d.find_elements(By.ID, "secret"))  # sent to sign in first
        driver.find_element(By.ID, "secret").send_keys(world.approvers["alice"])
        driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
        approval_id = url.rsplit("/", 1)[-1]
        wait_for(driver, lambda d: approval_id in d.page_source and d.current_url == url)
        screenshot(driver, shots / f"before-{verb}.png")
        if comment:
            driver.find_element(By.CSS_SELECTOR, "input[name=comment]").send_keys(comment)
        button(driver, verb).click()
        said = "Approved by" if verb == "approve" else "Denied by"
        # Read in the page (the live view may replace the card while it is read).
        outcome = (
            "return [...document.querySelectorAll('p.outcome')].map(e => e.textContent).join(' ')"
        )
        wait_for(driver, lambda d: said in d.execute_script(outcome))
        screenshot(driver, shots / f"after-{verb}.png")


def button(driver: WebDriver, verb: str) -> Any:
    for candidate in driver.find_elements(By.CSS_SELECTOR, "button"):
        if candidate.text.strip().lower() == verb:
            return candidate
    raise AssertionError(f"no {verb} button on {driver.current_url}")


async def test_the_user_is_sent_to_the_page_and_one_click_lets_the_call_through(
    world: World, tmp_path: Path
) -> None:
    user = User()
    async with agent(world, tmp_path, user) as (client, record):
        call = asyncio.create_task(
            client.call_tool("copy_image_set", copy_args(copy_image_set_information=INTO_EXISTING))
        )
        await asyncio.wait_for(user.asked.wait(), WAIT)
        url = user.urls[-1]
        assert url.startswith(world.url + "/console/approvals/apr_"), url
        assert not call.done(), "the proxy holds the call while a human decides"
        await asyncio.to_thread(decide_in_browser, url, world, "approve", "", tmp_path)
        result = await asyncio.wait_for(call, WAIT)
        await asyncio.wait_for(user.completed.wait(), WAIT)
    assert not result.is_error, result
    assert len(calls(record)) == 1, "the server ran the call once"


async def test_a_denial_in_the_console_reaches_the_agent_with_its_comment(
    world: World, tmp_path: Path
) -> None:
    user = User()
    async with agent(world, tmp_path, user) as (client, record):
        call = asyncio.create_task(
            client.call_tool("copy_image_set", copy_args(copy_image_set_information=INTO_EXISTING))
        )
        await asyncio.wait_for(user.asked.wait(), WAIT)
        await asyncio.to_thread(
            decide_in_browser, user.urls[-1], world, "deny", "use a new image set", tmp_path
        )
        result = await asyncio.wait_for(call, WAIT)
    assert result.is_error
    text = "\n".join(block.text for block in result.content if block.type == "text")
    assert "use a new image set" in text and "alice" in text
    assert calls(record) == [], "nothing ran"
