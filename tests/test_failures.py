"""Every failure of a console command is one line on stderr and a non-zero status; the
traceback comes too only at --log-level DEBUG (engine/cli.py's one top-level handler)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine import cli
from tests.processes import CLI


def mcp_policy(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MCP_POLICY_")}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**base, **env},
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_bad_setting_is_one_line_naming_the_variable() -> None:
    result = mcp_policy("serve", MCP_POLICY_HTTP_PORT="notaport")
    assert result.returncode == 3
    assert one_line(result) == (
        "mcp-policy serve: invalid settings: MCP_POLICY_HTTP_PORT: input should be a valid "
        "integer, unable to parse string as an integer (got 'notaport')"
    )


def test_a_bad_flag_value_is_named_as_the_flag() -> None:
    result = mcp_policy("decide", "--opa-timeout-ms", "0")
    assert result.returncode == 3
    assert one_line(result).startswith(
        "mcp-policy decide: invalid settings: --opa-timeout-ms: input should be greater than "
        "or equal to 1"
    )


def test_a_list_setting_that_is_not_json_is_one_line() -> None:
    result = mcp_policy("serve", MCP_POLICY_POLICY_PATHS="rego:policies")
    assert result.returncode == 3
    assert one_line(result).startswith(
        "mcp-policy serve: invalid settings: MCP_POLICY_POLICY_PATHS: not valid JSON"
    )


def test_settings_that_do_not_go_together_are_one_line_without_secrets() -> None:
    result = mcp_policy(
        "serve",
        MCP_POLICY_REDIS_CLUSTER="true",
        MCP_POLICY_REDIS_URL="redis://:hunter2@127.0.0.1:6379/3",
    )
    assert result.returncode == 3
    assert one_line(result) == (
        "mcp-policy serve: invalid settings: redis_cluster needs database 0 in redis_url "
        "(a cluster has no other)"
    )
    assert "hunter2" not in result.stderr + result.stdout


def test_the_other_commands_share_the_handler() -> None:
    """`validate` (engine/proxy/cli.py) reads the settings too."""
    result = mcp_policy("validate", MCP_POLICY_GRPC_PORT="-1")
    assert result.returncode == 3
    assert one_line(result).startswith(
        "mcp-policy validate: invalid settings: MCP_POLICY_GRPC_PORT: input should be greater"
    )


@pytest.mark.parametrize(("listener", "name"), [("http", "HTTP"), ("grpc", "gRPC")])
def test_a_port_in_use_is_one_line(taken_port: int, listener: str, name: str) -> None:
    other = "grpc" if listener == "http" else "http"
    result = mcp_policy(
        "serve",
        "--state-dir",
        os.devnull,  # never reached: the ports are looked at first
        f"--{listener}-port",
        str(taken_port),
        f"--{other}-port",
        "0",
    )
    assert result.returncode == 3
    assert one_line(result) == (
        f"mcp-policy: cannot listen for {name} on 127.0.0.1:{taken_port} "
        f"(--{listener}-port, MCP_POLICY_{listener.upper()}_PORT): in use (another process "
        "listens there: a service already running?)"
    )
    assert result.stdout == ""


def test_an_unexpected_failure_is_one_line_and_a_traceback_only_at_debug() -> None:
    args = ("serve", "--http-port", "0", "--grpc-port", "0")
    quiet = mcp_policy(*args, MCP_POLICY_STATE_STORE="redis")
    assert quiet.returncode == 1
    message = "mcp-policy serve: state_store redis needs MCP_POLICY_REDIS_URL"
    assert one_line(quiet) == message + " (--log-level DEBUG shows where)"

    for debug in (
        mcp_policy(*args, "--log-level", "DEBUG", MCP_POLICY_STATE_STORE="redis"),
        mcp_policy(*args, MCP_POLICY_STATE_STORE="redis", MCP_POLICY_LOG_LEVEL="debug"),
    ):
        assert debug.returncode == 1
        assert "Traceback (most recent call last):" in debug.stderr
        assert 'raise ValueError("state_store redis needs MCP_POLICY_REDIS_URL")' in debug.stderr
        assert debug.stderr.strip().splitlines()[-1] == message


@pytest.mark.parametrize(
    ("variable", "path", "said", "status"),
    [
        ("MCP_POLICY_POLICY_SCHEMA", "/nonexistent/schema.json", "No such file or directory", 1),
        ("MCP_POLICY_APPROVERS_FILE", "/nonexistent/approvers.yaml", "no such file", 4),
        ("MCP_POLICY_DECISION_LOG", "/proc/nonexistent/decisions.jsonl", "No such file", 1),
    ],
    ids=["schema", "approvers", "decision-log"],
)
def test_a_file_that_is_not_there_is_one_line(
    tmp_path: Path, variable: str, path: str, said: str, status: int
) -> None:
    result = mcp_policy(
        "serve",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--state-dir",
        str(tmp_path),
        MCP_POLICY_STATE_STORE="memory",
        **{variable: path},
    )
    assert result.returncode == status
    text = one_line(result)
    assert text.startswith(f"mcp-policy serve: {path.rsplit('/', 1)[0]}") and said in text


def test_a_secret_setting_that_is_refused_is_named_but_never_shown() -> None:
    refused = ValidationError.from_exception_data(
        "Settings",
        [
            {
                "type": "string_too_short",
                "loc": ("approver_token",),
                "input": "hunter2",
                "ctx": {"min_length": 32, "actual_length": 7},
            },
            {"type": "int_parsing", "loc": ("http_port",), "input": "eighty"},
        ],
    )
    message, status = cli._failure(refused, argparse.Namespace(command="serve"), debug=False)
    assert status == 3
    assert message == (
        "invalid settings: MCP_POLICY_APPROVER_TOKEN: string should have at least 32 "
        "characters; MCP_POLICY_HTTP_PORT: input should be a valid integer, unable to parse "
        "string as an integer (got 'eighty')"
    )
