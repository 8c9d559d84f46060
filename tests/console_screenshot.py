"""The README's picture of the console: `python -m tests.console_screenshot [PATH]`.

Starts a real service (tests/console_world.py), opens two approvals (their long
argument folded), signs in as an approver in headless Chromium and saves the pending page
with them on it to PATH (default docs/console.png). Run by hand when the console's look
changes; the result is committed.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By

from tests.browser import chromium, screenshot, wait_for
from tests.conftest import approval_call, session
from tests.console_world import start_world

DEFAULT = Path(__file__).resolve().parent.parent / "docs" / "console.png"


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else DEFAULT
    with tempfile.TemporaryDirectory(prefix="console-screenshot-") as tmp:
        world = start_world(Path(tmp))
        try:
            with chromium(width=1100, height=900) as driver:
                driver.get(world.url + "/console/sign-in")
                driver.find_element(By.ID, "secret").send_keys(world.approvers["alice"])
                driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
                wait_for(driver, lambda d: d.find_elements(By.ID, "pending"))
                wait_for(driver, lambda d: d.find_element(By.ID, "live").is_displayed())
                for agent in ("claude-code", "release-bot"):
                    call = approval_call(session())
                    call["principal"]["agent_id"] = agent
                    _, approval_id = world.pending_approval(call)
                wait_for(driver, lambda d: d.find_elements(By.ID, f"approval-{approval_id}"))
                # (the highlight of a card that just arrived fades first)
                wait_for(
                    driver, lambda d: d.execute_script("return !document.getAnimations().length")
                )
                path = screenshot(driver, target, full=False)
        finally:
            world.serve.stop()
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
