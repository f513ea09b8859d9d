"""The tests' own settings builders: one set of defaults, as a Settings object and as a batchd.toml."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from support import PROCESS_SECTIONS, daemon_config, make_settings, settings_sections, to_toml

from batchd.config import load_settings

DATABASE, EMULATOR = "postgresql://postgres@127.0.0.1:5432/x", "http://127.0.0.1:8787"


def test_a_process_reads_the_same_settings_as_a_daemon_in_the_test_s_process_but_the_process_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in os.environ:
        if name.startswith("BATCHD_"):
            monkeypatch.delenv(name)
    config = daemon_config(tmp_path / "batchd.toml", DATABASE, EMULATOR, daemon={"lease_s": 7})
    from_file = load_settings(config)  # as `batchd run --config` reads it
    in_process = make_settings(DATABASE, EMULATOR)
    assert from_file.daemon.lease_s == 7
    assert from_file.batching.max_requests == PROCESS_SECTIONS["batching"]["max_requests"]
    assert from_file.job_types == in_process.job_types
    assert from_file.database == in_process.database
    assert from_file.polling == in_process.polling
    # Everything but what PROCESS_SECTIONS (and the override) change is the same.
    file_values, process_values = from_file.model_dump(), in_process.model_dump()
    differs = {
        (section, key)
        for section, keys in process_values.items()
        if isinstance(keys, dict)
        for key, value in keys.items()
        if file_values[section][key] != value
    }
    expected = {(s, k) for s, keys in PROCESS_SECTIONS.items() for k in keys} | {("daemon", "lease_s")}
    assert differs == expected


def test_the_toml_renderer_writes_what_tomllib_reads_back() -> None:
    tables = {
        "plain": {"text": 'quote " backslash \\ newline \n tab \t é ∑', "n": 3, "x": 0.25, "yes": True},
        "lists": {"empty": [], "words": ["a", "b c"], "numbers": [1, 2.5]},
        "nested": {"top": 1, "inner": {"deep": {"k": "v"}}, "dotted.key": {"ok": False}},
    }
    assert tomllib.loads(to_toml(tables)) == tables
    sections = settings_sections(DATABASE, EMULATOR, process=True)
    assert tomllib.loads(to_toml(sections)) == sections


def test_a_test_that_reaches_no_database_is_marked_nodb(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("nodb") is not None
