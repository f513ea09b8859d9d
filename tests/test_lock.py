"""The locks agree with pyproject.toml and with each other (`make lock` writes both; a hand edit or a
pyproject.toml change without `make lock` shows here, before a fresh machine installs something untested)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def pins(name: str) -> dict[str, Version]:
    text = (ROOT / name).read_text()
    # One entry per package: a line at the left margin, then its hashes and comments, indented.
    entries = [entry for entry in re.split(r"\n(?=\S)", text) if not entry.startswith("#")]
    assert entries, f"{name} pins nothing"
    found: dict[str, Version] = {}
    for entry in entries:
        match = PIN.match(entry)
        assert match, f"{name}: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{name}: {match[1]} has no hash (pip wants them all)"
        found[canonicalize_name(match[1])] = Version(match[2])
    return found


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in extras:
        listed += project["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


def applies_here(requirement: Requirement) -> bool:
    return requirement.marker is None or requirement.marker.evaluate()


def test_every_requirement_is_pinned_within_its_range() -> None:
    locked = pins("requirements.lock")
    for requirement in filter(applies_here, requirements("test", "embedded")):
        version = locked.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {requirement.name}=={version}, outside {requirement}: run make lock"
        )


def test_the_runtime_lock_is_the_tested_lock_cut_down_to_what_batchd_run_needs() -> None:
    locked, runtime = pins("requirements.lock"), pins("requirements-runtime.lock")
    assert {name: locked.get(name) for name in runtime} == runtime, (
        "the runtime lock differs from the tested one"
    )
    for requirement in filter(applies_here, requirements()):
        assert canonicalize_name(requirement.name) in runtime
    for tool in ("pytest", "mypy", "ruff", "hypothesis"):
        assert tool not in runtime
