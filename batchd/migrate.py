"""`batchd migrate`: the versioned SQL in `sql/migrations/`, applied once each, in order.

Safe to run twice (what is recorded is skipped) and from two processes at once (an advisory lock makes the
second wait, then find nothing to do). A migration that was changed after it was applied is refused: the
database would no longer match the files. So is a database that a newer batchd migrated further than this
one knows (SchemaAhead): this batchd's queries were written for an older schema, and the fix is to upgrade
batchd, not to run it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from . import __version__
from .store import Connection, sql

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class MigrationError(Exception):
    pass


class SchemaAhead(MigrationError):  # noqa: N818 - reads as the condition it reports
    """The database holds migrations this batchd does not ship: a newer batchd migrated it."""


def _label(version: int, name: str) -> str:
    return f"{version:04d}_{name}"


def _ahead(applied: dict[int, str], shipped: list[Migration]) -> SchemaAhead | None:
    """The refusal for a database migrated past this batchd's newest migration (None: it is not)."""
    newest = shipped[-1]
    beyond = sorted(version for version in applied if version > newest.version)
    if not beyond:
        return None
    theirs = _label(beyond[-1], applied[beyond[-1]])
    return SchemaAhead(
        f"the database is ahead of this batchd: its newest migration is {theirs}, this batchd's "
        f"({__version__}) is {_label(newest.version, newest.name)}; a newer batchd migrated it, so upgrade "
        "batchd to that version (or newer) rather than run this one"
    )


def shipped_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("batchd.sql.migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 1, 2, 3, ... without gaps; found {versions}")
    return found


async def migrate(connection: Connection) -> list[Migration]:
    """Applies what is missing, in one transaction; returns what it applied."""
    async with connection.transaction():
        await connection.execute(sql("lock_migrations"))
        await connection.execute(sql("create_migrations_table"))
        applied = {row["version"]: row for row in await connection.fetch(sql("applied_migrations"))}
        shipped = shipped_migrations()
        ahead = _ahead({version: row["name"] for version, row in applied.items()}, shipped)
        if ahead is not None:
            raise ahead
        done: list[Migration] = []
        for migration in shipped:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    name = f"{migration.version:04d}_{migration.name}"
                    raise MigrationError(
                        f"migration {name} was changed after it was applied "
                        "(its checksum differs from the one recorded); restore the file as it was, since a "
                        "change to an applied schema belongs in a new migration"
                    )
                continue
            await connection.execute(migration.text)
            await connection.execute(
                sql("record_migration"), migration.version, migration.name, migration.checksum
            )
            done.append(migration)
        return done


async def applied(connection: Connection) -> dict[int, str]:
    """The migrations the database records, version to name (none when batchd's schema is missing)."""
    if not await connection.fetchval(sql("migrations_table_exists")):
        return {}
    return {row["version"]: row["name"] for row in await connection.fetch(sql("applied_migrations"))}


async def pending(connection: Connection) -> list[Migration]:
    """Migrations not yet applied (all of them when batchd's schema is missing)."""
    versions = await applied(connection)
    return [m for m in shipped_migrations() if m.version not in versions]


async def require_current(connection: Connection) -> str:
    """Refuses a database this code's queries would fail on: one without every shipped migration, or one a
    newer batchd migrated further (SchemaAhead). Returns the newest migration's name, e.g. 0013_instances."""
    versions = await applied(connection)
    shipped = shipped_migrations()
    ahead = _ahead(versions, shipped)
    if ahead is not None:
        raise ahead
    missing = [m for m in shipped if m.version not in versions]
    if missing:
        raise MigrationError(f"{len(missing)} migration(s) not applied; run `batchd migrate`")
    return _label(shipped[-1].version, shipped[-1].name)
