"""`batchd migrate`: the versioned SQL in `sql/migrations/`, applied once each, in order.

Safe to run twice (what is recorded is skipped) and from two processes at once (an advisory lock makes the
second wait, then find nothing to do). A migration that was changed after it was applied is refused: the
database would no longer match the files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

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
        done: list[Migration] = []
        for migration in shipped_migrations():
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


async def pending(connection: Connection) -> list[Migration]:
    """Migrations not yet applied (all of them when batchd's schema is missing)."""
    exists = await connection.fetchval(sql("migrations_table_exists"))
    versions = (
        {row["version"] for row in await connection.fetch(sql("applied_migrations"))} if exists else set()
    )
    return [m for m in shipped_migrations() if m.version not in versions]


async def require_current(connection: Connection) -> None:
    """Refuses a database this code's queries would fail on: one without every shipped migration."""
    missing = await pending(connection)
    if missing:
        raise MigrationError(f"{len(missing)} migration(s) not applied; run `batchd migrate`")
