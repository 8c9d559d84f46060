"""`mcp-policy build`: the policy `serve` would load, as one OPA bundle made by the pinned OPA.

The directories are the ones `serve` loads: by default the shipped rego/ and policies/ (or
MCP_POLICY_POLICY_PATHS). Directories given on the command line are a team's policy: the
installed framework's Rego is added when none of them holds the decision entry point,
and the shipped data when none holds data (`source.with_framework`), so the bundle holds
everything needed to decide. They are read and checked as `serve` checks them at a load,
and a policy with any problem is refused whole, each problem on one line with its place,
and nothing is written:

- every file is readable UTF-8, every data file parses (`file:line:col`, as `validate`)
  and is JSON (a bundle carries JSON: no YAML dates, keys that are not strings, NaN);
- `read_bundle` places the data by directory and refuses conflicts (placed in the files);
- the data matches the policy schema (`file:line:col` and the most specific reason);
- OPA compiles the Rego (OPA's messages, with the module's file on disk), and
  `data.mcp.load_errors` reports nothing. OPA is the in-process library when it is built;
  without it, `validate`'s check with a supervised `opa run --server`.

The bundle is laid out in a temporary directory so that its data document is exactly the
one `read_bundle` made: the Rego modules under their ids (`mcp-policy/<dir>/<path>`, the
names the service gives them; never `*_test.rego`) and the data as one `data.json` at the
root (a bundle loads data only from files named `data.json`, and `opa build` writes all of
it as one `/data.json` anyway). The pinned `opa build -b` then writes the bundle, its
revision by default the policy's own (`sha256:...`, what `serve` reports for the same
files: identical policy, identical revision), signed when given a key. The output appears
whole or not at all: OPA writes it beside its destination, and it is renamed into place.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from engine.errors import EngineError, PolicyRejected, PolicyUnavailable
from engine.policy.inprocess import (
    ADMIN_TIMEOUT,
    DECISION_QUERY,
    LOAD_ERRORS_QUERY,
    InProcessOpa,
    library_version,
)
from engine.policy.opa_process import ToolMissing, find_opa
from engine.policy.schema import locate
from engine.policy.source import (
    DATA_SUFFIXES,
    MODULE_PREFIX,
    PolicyBundle,
    read_bundle,
    with_framework,
)

# `mcp-policy validate`'s checks (engine.authoring.validate), whose messages these are, are
# imported where a build uses them: they bring an OPA REST client that every other command
# would pay for at start.

EXIT_OK = 0
EXIT_FAILED = 1  # the policy has problems, OPA refused to build, or a bad argument
EXIT_TOOL_MISSING = 2  # no OPA (the message says how to get it), as every command
BUILD_TIMEOUT = 300.0
BUNDLE_NAME = "bundle.tar.gz"  # what OPA writes in the temporary directory

HELP = "build the policy into one OPA bundle (checked as serve checks it; optionally signed)"
DESCRIPTION = """\
Check the policy the way `serve` does when it loads it, then build it with the pinned
`opa build` into one bundle (.tar.gz) that holds all of it: the Rego modules (no tests)
and the data as JSON, the data document exactly the one `serve` loads. The directories
default to what `serve` loads (the shipped rego/ and policies/, or MCP_POLICY_POLICY_PATHS);
directories given are combined with the installed framework's Rego when none of them has
it (and with the shipped data when they hold none). Any problem is printed
with its place, and nothing is written (exit 1). The revision defaults to the policy's
own (sha256:...), the one `serve` reports for the same files.
"""


class BuildFailed(EngineError):
    """The bundle was not written: the lines say why (each a problem, or OPA's output)."""

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = lines or []


@dataclass(frozen=True)
class Signing:
    """How `opa build` signs the bundle: its --signing-key (a file: a PEM private key, or
    an HMAC secret for HS256), --signing-alg and --claims-file."""

    key: Path
    algorithm: str | None = None
    claims: Path | None = None


@dataclass(frozen=True)
class Built:
    output: Path
    revision: str
    modules: int
    data_files: int
    signed: str | None  # the algorithm, or None: unsigned

    def summary(self) -> str:
        signed = f"signed {self.signed}" if self.signed else "unsigned"
        return (
            f"wrote {self.output} (revision {self.revision}, {self.modules} Rego modules, "
            f"{self.data_files} data files, {signed})"
        )


# --- checks ------------------------------------------------------------------------------


def _directory_problems(paths: list[Path]) -> list[str]:
    return [
        f"{path}: {'not a directory' if path.exists() else 'no such directory'}"
        for path in paths
        if not path.is_dir()
    ]


def _policy_files(paths: list[Path]) -> tuple[list[Path], list[Path], list[str]]:
    """The Rego modules (tests excluded) and data files under `paths`, in the order
    `read_bundle` reads them, and the problems of each: not readable UTF-8 text, or data
    that does not parse or is not JSON, each with its place."""
    modules: list[Path] = []
    data: list[Path] = []
    problems: list[str] = []
    for root in paths:
        for path in sorted(root.rglob("*")):
            is_module = path.suffix == ".rego" and not path.name.endswith("_test.rego")
            if not path.is_file() or not (is_module or path.suffix in DATA_SUFFIXES):
                continue
            (modules if is_module else data).append(path)
            try:
                text = path.read_text("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{path}: not UTF-8 text (byte {exc.start})")
                continue
            except OSError as exc:
                problems.append(f"{path}: cannot read: {exc.strerror or exc}")
                continue
            if not is_module:
                where = path.relative_to(root).parent.parts
                problems += _data_problems(path, text, list(where))
    return modules, data, problems


def _data_problems(path: Path, text: str, where: list[str | int]) -> list[str]:
    """Why the data file `path` (its data placed at `where`) cannot go into a bundle: its
    syntax error (as `validate` says it), or the first value JSON cannot carry as it is
    (a YAML date, a key that is not a string, NaN), with its place."""
    from engine.authoring.validate import data_error

    try:
        problem = data_error(path, text)
        if problem is not None:
            return [problem]
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        found = _not_json(doc, [])
    except RecursionError:
        return [f"{path}: nested too deeply"]
    if found is None:
        return []
    inside, why = found
    place = locate(inside, [path]) or str(path)
    what = "data" + "".join(
        f".{part}" if isinstance(part, str) else f"[{part}]" for part in [*where, *inside]
    )
    return [f"{place}: {what}: {why}"]


# read_bundle's word for two data files setting one value.
_CONFLICT = re.compile(r"^data((?:\.[^.]+)+) is defined twice$")


def _place_conflict(message: str, paths: list[Path], files: list[Path]) -> str:
    """read_bundle's data conflict with the places in the files that set the value."""
    found = _CONFLICT.match(message)
    if found is None:
        return message
    parts: list[str | int] = list(found[1].split(".")[1:])
    places = []
    for root in paths:
        for file in files:
            if not file.is_relative_to(root):
                continue
            prefix = list(file.relative_to(root).parent.parts)
            inside = parts[len(prefix) :]
            if parts[: len(prefix)] == prefix and inside:
                place = locate(inside, [file])
                if place is not None:
                    places.append(place)
    if not places:
        return message
    also = f" (also at {', '.join(places[1:])})" if places[1:] else ""
    return f"{places[0]}: {message}{also}"


def _module_paths(paths: list[Path], modules: list[Path]) -> dict[str, Path]:
    """The file on disk of each module id `read_bundle` gives."""
    out: dict[str, Path] = {}
    for root in paths:
        for path in modules:
            if path.is_relative_to(root):
                out[f"{MODULE_PREFIX}{root.name}/{path.relative_to(root).as_posix()}"] = path
    return out


def _not_json(value: Any, path: list[str | int]) -> tuple[list[str | int], str] | None:
    """The first place in `value` JSON cannot say as it is, and why; None when it can."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return path, f"the key {key!r} is not a string (a bundle is JSON: quote it)"
            found = _not_json(item, [*path, key])
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _not_json(item, [*path, index])
            if found is not None:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return path, f"{value} is not a number JSON has (a bundle is JSON)"
    elif value is not None and not isinstance(value, str | int | float):
        return path, f"a {type(value).__name__} is not JSON (a bundle is JSON: quote it)"
    return None


async def _compile(
    bundle: PolicyBundle, module_paths: dict[str, Path], files: list[Path]
) -> list[str]:
    """OPA's compiler errors, then `data.mcp.load_errors`, with the in-process OPA the
    service uses (as `loader.Policy` loads a bundle); [] when the policy loads."""
    from engine.authoring.validate import _place_load_error, _with_paths

    opa = InProcessOpa(timeout=ADMIN_TIMEOUT)
    await opa.open()
    try:
        try:
            await opa.load(bundle, (DECISION_QUERY, LOAD_ERRORS_QUERY))
        except PolicyRejected as exc:
            errors = exc.errors or [exc.message]
            return [_with_paths(message, module_paths) for message in errors]
        try:
            value = await opa.query(LOAD_ERRORS_QUERY)
        except PolicyUnavailable as exc:
            return [f"{LOAD_ERRORS_QUERY} could not be evaluated: {exc.message}"]
    finally:
        await opa.close()
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(message, str) for message in value):
        return [f"{LOAD_ERRORS_QUERY} must be a set of strings, got {json.dumps(value)}"]
    return [_place_load_error(message, files) for message in sorted(value)]


async def checked_bundle(
    paths: list[Path], *, schema: Path | None, opa_binary: str = "opa"
) -> tuple[PolicyBundle, list[Path]]:
    """The bundle `serve` would load from `paths`, after every check `serve` makes when it
    loads it, and the data files it was read from; BuildFailed listing the problems (each
    with its place) otherwise."""
    problems = _directory_problems(paths)
    if problems:
        raise BuildFailed("a policy directory is not there", problems)
    modules, files, problems = _policy_files(paths)
    if problems:
        raise BuildFailed("the policy files have errors", problems)
    try:
        bundle = read_bundle(paths)
    except PolicyRejected as exc:
        problems = [_place_conflict(error, paths, files) for error in exc.errors or [exc.message]]
        raise BuildFailed("the policy files have errors", problems) from exc
    from engine.authoring.validate import schema_errors, validate

    problems = schema_errors(bundle.data, schema, files) if schema is not None else []
    if problems:
        raise BuildFailed("the policy data has errors", problems)
    try:
        library_version()
    except ToolMissing:
        # No in-process library: OPA compiles it as `validate` has it do, in a supervised
        # `opa run --server` of its own.
        problems = (await validate(paths, opa_binary=opa_binary, schema=schema)).errors
    else:
        problems = await _compile(bundle, _module_paths(paths, modules), files)
    if problems:
        raise BuildFailed("OPA refused the policy", problems)
    return bundle, files


# --- the bundle --------------------------------------------------------------------------


def stage(bundle: PolicyBundle, directory: Path) -> None:
    """Lay `bundle` out in `directory` as `opa build -b` reads a bundle: each module under
    its id, and the whole data document as the root `data.json`."""
    for module_id, text in bundle.modules.items():
        path = (directory / module_id).resolve()
        if not path.is_relative_to(directory.resolve()):
            raise BuildFailed(f"module {module_id} would be outside the bundle")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    (directory / "data.json").write_text(
        json.dumps(bundle.data, allow_nan=False, separators=(",", ":")), "utf-8"
    )


def _argument_problems(output: Path, signing: Signing | None, revision: str | None) -> list[str]:
    problems = []
    if output.is_dir():
        problems.append(f"-o {output}: is a directory; name the bundle file to write")
    elif not output.parent.is_dir():
        problems.append(f"-o {output}: the directory {output.parent} does not exist")
    if revision is not None and not revision.strip():
        problems.append("--revision: must not be empty")
    if signing is not None:
        # OPA takes a --signing-key that is not a file as the key itself (a misspelt path
        # would become an HMAC secret): only a file is passed on.
        for flag, path in (("--signing-key", signing.key), ("--claims-file", signing.claims)):
            if path is not None and not path.is_file():
                what = "not a file" if path.exists() else "no such file"
                problems.append(f"{flag} {path}: {what}")
    return problems


def _opa_build(
    opa: str, staging: Path, target: Path, revision: str, signing: Signing | None
) -> None:
    """Run `opa build -b` on `staging`, writing `target`; BuildFailed with OPA's output."""
    # --flag=value: a value that starts with "-" is never taken for a flag.
    command = [opa, "build", "--bundle", ".", f"--output={target}", f"--revision={revision}"]
    if signing is not None:
        command.append(f"--signing-key={signing.key.resolve()}")
        if signing.algorithm is not None:
            command.append(f"--signing-alg={signing.algorithm}")
        if signing.claims is not None:
            command.append(f"--claims-file={signing.claims.resolve()}")
    try:
        done = subprocess.run(
            command,
            cwd=staging,  # module names in the bundle are relative to it: no temporary path
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildFailed(f"`opa build` did not finish within {BUILD_TIMEOUT:.0f} s") from exc
    except OSError as exc:
        raise BuildFailed(f"cannot run {opa}: {exc.strerror or exc}") from exc
    if done.returncode != 0:
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise BuildFailed(f"`opa build` failed (exit status {done.returncode})", said)


def write_bundle(
    bundle: PolicyBundle,
    output: Path,
    *,
    opa: str,
    revision: str | None = None,
    signing: Signing | None = None,
) -> str:
    """Build `bundle` into `output` with `opa build`, atomically; the revision it carries."""
    revision = revision or bundle.revision
    parent = output.parent.resolve()
    with tempfile.TemporaryDirectory(prefix="mcp-policy-bundle.") as staging:
        stage(bundle, Path(staging))
        # OPA writes into a directory beside the output (the same file system), so the
        # finished bundle is renamed into place: never seen half written.
        beside = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
        try:
            written = beside / BUNDLE_NAME
            _opa_build(opa, Path(staging), written, revision, signing)
            with written.open("rb") as done:
                os.fsync(done.fileno())
            os.replace(written, output)
        finally:
            shutil.rmtree(beside, ignore_errors=True)
    return revision


async def build(
    paths: list[Path],
    output: Path,
    *,
    schema: Path | None,
    opa_binary: str = "opa",
    revision: str | None = None,
    signing: Signing | None = None,
) -> Built:
    """Check the policy under `paths` as `serve` would, and write it to `output` as one
    bundle; BuildFailed (nothing written) when anything is wrong."""
    problems = _argument_problems(output, signing, revision)
    if problems:
        raise BuildFailed("nothing to build into", problems)
    opa = find_opa(opa_binary)  # before the checks: without it nothing can be written
    bundle, files = await checked_bundle(paths, schema=schema, opa_binary=opa_binary)
    written = await asyncio.to_thread(
        write_bundle, bundle, output, opa=opa, revision=revision, signing=signing
    )
    return Built(
        output=output,
        revision=written,
        modules=len(bundle.modules),
        data_files=len(files),
        signed=(signing.algorithm or "RS256") if signing is not None else None,
    )


# --- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dirs",
        nargs="*",
        type=Path,
        metavar="DIR",
        help="policy directories, with the installed framework's Rego added when none has it "
        "(default: what serve loads, the shipped rego/ and policies/)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="the bundle to write (.tar.gz)"
    )
    parser.add_argument(
        "--revision", help="the bundle's revision (default: the policy's own, sha256:...)"
    )
    parser.add_argument(
        "--signing-key",
        type=Path,
        help="sign the bundle with this key file: a PEM private key (RSA, ECDSA), or an "
        "HMAC secret with --signing-alg HS256",
    )
    parser.add_argument("--signing-alg", help="the signing algorithm (OPA's default: RS256)")
    parser.add_argument(
        "--claims-file", type=Path, help="JSON claims to sign with the bundle (OPA's)"
    )
    parser.add_argument(
        "--opa-binary", help="the opa to build with (MCP_POLICY_OPA_BINARY; default: the pinned)"
    )


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`mcp-policy build`; the exit status."""
    from engine.settings import Settings

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    if (args.signing_alg or args.claims_file) and args.signing_key is None:
        print("mcp-policy build: --signing-alg and --claims-file need --signing-key", file=err)
        return EXIT_FAILED
    defaults: dict[str, Any] = {}
    settings = Settings(**defaults)  # MCP_POLICY_*: what serve would load
    signing = (
        Signing(args.signing_key, args.signing_alg, args.claims_file)
        if args.signing_key is not None
        else None
    )
    try:
        built = asyncio.run(
            build(
                with_framework(list(args.dirs)) if args.dirs else list(settings.policy_paths),
                args.output,
                schema=settings.policy_schema,
                opa_binary=args.opa_binary or settings.opa_binary,
                revision=args.revision,
                signing=signing,
            )
        )
    except ToolMissing as exc:
        print(f"mcp-policy build: {exc.message}", file=err)
        return EXIT_TOOL_MISSING
    except BuildFailed as exc:
        print(f"mcp-policy build: {exc.message}; nothing written", file=err)
        for line in exc.lines:
            print(f"  {line}", file=err)
        return EXIT_FAILED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mcp-policy build: {where}{exc.strerror or exc}; nothing written", file=err)
        return EXIT_FAILED
    print(f"mcp-policy build: {built.summary()}", file=out)
    return EXIT_OK
