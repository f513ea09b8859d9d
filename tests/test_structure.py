"""The package's shape, read from its source: no import cycle among batchd's modules, the development tools
kept out of what the daemon imports, and docs/architecture.md's module table naming every module."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batchd"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every batchd module `path` imports, wherever the import stands: at the top, in a function (a lazy
    import still means one module needs the other) or under TYPE_CHECKING (mypy follows those)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # `from . import migrate` imports batchd.migrate; `from .store import sql`, batchd.store
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            known = target
            while known and known not in modules:
                known = known.rpartition(".")[0]  # `import batchd.store.x`: the module batchd.store
            if known and known != name:
                yield known


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: set(imported(path, modules)) for name, path in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules, the first repeated at the end), or [] when there is none."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        found: list[str] = error.args[1]
        return found
    return []


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    assert "batchd.store" in graph["batchd.flusher"]  # from .store import …
    assert "batchd.migrate" in graph["batchd.daemon"]  # from . import migrate, …
    assert "batchd.daemon" in graph["batchd.cli"]  # a lazy import, in run_daemon
    assert "batchd.config" in graph["batchd.cli"]  # under TYPE_CHECKING
    assert "batchd.emulator.app" in graph["batchd.emulator"]  # from .app import …
    found = cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert sorted(set(found)) == ["a", "b", "c"]
    assert found[0] == found[-1]


def test_no_module_of_batchd_imports_itself_back() -> None:
    assert cycle(import_graph()) == []


def test_the_daemon_imports_nothing_from_the_development_tools() -> None:
    """What a production host loads to run the daemon (`batchd run`: the command line, then the daemon and
    everything it imports) holds none of batchd.dev: the embedded PostgreSQL that, as root, creates an account
    and widens permissions; the demo; the emulator's tour; the SSE reader."""
    script = (
        "import json, sys\n"
        "import batchd.cli\n"
        "batchd.cli.build_parser().parse_args(['run'])\n"
        "import batchd.daemon, batchd.server\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'batchd' or m.startswith('batchd.'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = json.loads(done.stdout)
    assert "batchd.daemon" in loaded
    assert "batchd.events" in loaded
    assert [name for name in loaded if name == "batchd.dev" or name.startswith("batchd.dev.")] == []


def test_the_development_tools_are_in_their_own_subpackage() -> None:
    modules = package_modules()
    for tool in ("embedded_pg", "demo", "tour"):
        assert f"batchd.dev.{tool}" in modules
        elsewhere = [name for name in modules if name.endswith(f".{tool}") and name != f"batchd.dev.{tool}"]
        assert elsewhere == []
    runtime = {name for name in modules if not name.startswith("batchd.dev")}
    graph = import_graph()
    leaks = {name: sorted(t for t in graph[name] if t.startswith("batchd.dev")) for name in runtime}
    # The command line names the development commands (`batchd demo`), importing them when one runs.
    assert {name: found for name, found in leaks.items() if found} == {
        "batchd.cli": ["batchd.dev.demo", "batchd.dev.tour"]
    }


# A row of the module table: | `flusher.py` | … | or | `sql/queries.sql`, `store.py` | … |
TABLE_ROW = re.compile(r"^\| ((?:`[^`]+`(?:, )?)+) \|", re.MULTILINE)


def test_the_architecture_table_names_every_module() -> None:
    named: set[str] = set()
    for cell in TABLE_ROW.findall(ARCHITECTURE.read_text()):
        named.update(re.findall(r"`([^`]+)`", cell))
    on_disk = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and path.parent.name not in ("emulator", "sql")
    }
    # Each module by its path under batchd/; a subpackage (`emulator/`, `dashboard/`) by its folder.
    assert on_disk - named == set(), "modules missing from docs/architecture.md's table"
    stale = {
        name
        for name in named
        if not (PACKAGE / name).exists() and not name.startswith(("sql/", "`"))  # sql/ rows name files too
    }
    assert stale == set(), "docs/architecture.md's table names modules that are gone"
