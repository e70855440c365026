"""A scratch copy of the bench database, for sections that wipe or rewrite the engine's state.

The rebuild and backfill sections make the engine's state wrong on purpose (every count and
ledger gone, or one count's column and ledger entries cleared) and time what brings it back.
They do it in a copy, ``CREATE DATABASE <name>_bench_scratch TEMPLATE <name>``, so the dataset
the other sections (and later runs) reuse is never left half-rebuilt by an interrupted run.

PostgreSQL copies a database only while nobody is connected to it: this process closes its own
connections first and retries for a while when another client is connected (another run on the
same database). While the block runs, the default connection (and every thread's) points at
the copy; afterwards it points back and the copy is dropped, also when a section failed.
"""

from __future__ import annotations

import contextlib
import time

from django.db import OperationalError, connection, connections
from django.db.utils import DatabaseError


class Unavailable(RuntimeError):
    """The database could not be copied (other clients stayed connected to it)."""


#: How long to retry ``CREATE DATABASE … TEMPLATE`` while other clients are connected.
COPY_PATIENCE_S = 120.0
SUFFIX = "_bench_scratch"


def _name(source: str) -> str:
    return source[: 63 - len(SUFFIX)] + SUFFIX


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _admin(sql: str) -> None:
    """Run ``sql`` outside any database this bench uses (on the server's maintenance one)."""
    with connection._nodb_cursor() as cursor:
        cursor.execute(sql)


def _others_connected(source: str) -> int:
    with connection._nodb_cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [source],
        )
        return cursor.fetchone()[0]


@contextlib.contextmanager
def copy(log):
    """Point every connection at a fresh copy of the current database for the block."""
    settings_dict = connection.settings_dict
    source = settings_dict["NAME"]
    name = _name(source)
    connections.close_all()
    _admin(f"DROP DATABASE IF EXISTS {_quote(name)}")  # left by a run that died
    started = time.perf_counter()
    while True:
        try:
            _admin(f"CREATE DATABASE {_quote(name)} TEMPLATE {_quote(source)}")
            break
        except (OperationalError, DatabaseError) as exc:
            if "being accessed by other users" not in str(exc):
                raise
            if time.perf_counter() - started > COPY_PATIENCE_S:
                raise Unavailable(
                    f"cannot copy {source}: {_others_connected(source)} other connection(s) to"
                    f" it for {COPY_PATIENCE_S:.0f} s (another bench or client?)"
                ) from exc
            time.sleep(2)
    log(f"scratch copy {name} of {source} made in {time.perf_counter() - started:.1f} s")
    settings_dict["NAME"] = name
    try:
        yield name
    finally:
        connections.close_all()
        settings_dict["NAME"] = source
        _admin(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
        log(f"scratch copy {name} dropped")
