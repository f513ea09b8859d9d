"""docs/logging.md lists every log event batchd's code can emit, at the level it is emitted at, and nothing
else: read from the code itself, so the list cannot go stale."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batchd"
DOC = ROOT / "docs" / "logging.md"
LEVELS = "debug|info|warning|error|exception|critical"
NAME = r"[a-z0-9_]+(?:\.[a-z0-9_]+)+"
# log.info("batch.applied", …), bound.warning(\n "x.y", …): any logger, the event's name a literal.
LITERAL_CALL = re.compile(rf"\b\w+\.({LEVELS})\(\s*\"({NAME})\"")
# embedded_pg's one helper that logs an event named by its caller (always at info).
HELPER_CALL = re.compile(rf"\b_say\(\s*\"({NAME})\"")
# A logging call whose first argument is not a string literal: its event could not be checked.
ANY_CALL = re.compile(rf"\b(?:log|logger|bound)\.({LEVELS})\((?!\s*\")\s*(\w*)")
DYNAMIC_ALLOWED = {("embedded_pg.py", "event")}  # _say's own call, its names found through HELPER_CALL
DOC_ROW = re.compile(rf"^\| `({NAME})` \| ([a-z /]+) \|", re.MULTILINE)


def logged_events() -> dict[str, set[str]]:
    """event name -> the levels the code logs it at."""
    events: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for level, name in LITERAL_CALL.findall(text):
            events[name].add(level)
        for name in HELPER_CALL.findall(text):
            events[name].add("info")
    return dict(events)


def documented_events() -> dict[str, set[str]]:
    documented: dict[str, set[str]] = {}
    for name, levels in DOC_ROW.findall(DOC.read_text()):
        assert name not in documented, f"{name} is listed twice in docs/logging.md"
        documented[name] = {level.strip() for level in levels.split("/")}
    return documented


def test_the_code_is_read() -> None:
    events = logged_events()
    # A few that must be found, whatever the formatting of their call.
    assert events["batch.applied"] == {"info"}  # a call split over lines
    assert events["job.failed"] == {"info", "warning"}
    assert events["embedded_pg.started"] == {"info"}  # through the helper
    assert len(events) > 50


def test_every_logging_call_names_its_event_literally() -> None:
    dynamic = [
        (path.name, argument)
        for path in sorted(PACKAGE.rglob("*.py"))
        for _, argument in ANY_CALL.findall(path.read_text())
    ]
    assert set(dynamic) <= DYNAMIC_ALLOWED, f"log calls whose event is not a literal: {dynamic}"


def test_every_event_is_documented_at_its_level() -> None:
    events = logged_events()
    documented = documented_events()
    missing = sorted(set(events) - set(documented))
    assert not missing, f"logged but not in docs/logging.md: {missing}"
    wrong_level = {
        name: (sorted(levels), sorted(documented[name]))
        for name, levels in events.items()
        if not levels <= documented[name]
    }
    assert not wrong_level, f"logged at (code, docs): {wrong_level}"


def test_every_documented_event_is_still_logged() -> None:
    stale = sorted(set(documented_events()) - set(logged_events()))
    assert not stale, f"in docs/logging.md but logged nowhere: {stale}"


def test_the_readme_links_the_list() -> None:
    assert "(docs/logging.md)" in (ROOT / "README.md").read_text()
