"""Statements on a catalog connection (SQLite file and PostgreSQL): each SQL text prepared
once and run again with new parameters, dropped when it fails, closed with its connection."""

from __future__ import annotations

import gc

import adbc_driver_manager
import pytest

from lavender_flight.catalog import Database, open_catalog
from lavender_flight.catalog._database import MAX_STATEMENTS


def test_a_statement_is_prepared_once_and_run_again_with_new_parameters(
    catalog_target: str,
) -> None:
    catalog = open_catalog(catalog_target)
    for name in ("a", "b", "c"):
        catalog.create_dataset(name, "uid")
    db: Database = catalog._db
    conn = db.connection()
    try:
        sql = db.dialect.sql("SELECT name FROM datasets WHERE name = ?")
        first = conn.statement(sql)
        for name in ("a", "b", "c", "a", "nope"):
            expected = [] if name == "nope" else [(name,)]
            assert Database._execute(conn, sql, db.dialect.params([name])) == expected
        assert conn.statement(sql) is first  # one statement for the five runs

        # a failing statement is dropped (a fresh statement next time), the others stay
        bad = db.dialect.sql("SELECT no_such_column FROM datasets WHERE name = ?")
        with pytest.raises(adbc_driver_manager.Error):
            Database._execute(conn, bad, db.dialect.params(["a"]))
        assert conn.statement(sql) is first
        assert bad not in conn._statements
        if catalog.backend == "postgresql":
            Database._execute(conn, "ROLLBACK")  # autocommit off: the failure ended it
        assert Database._execute(conn, sql, db.dialect.params(["b"])) == [("b",)]

        # past MAX_STATEMENTS texts, the connection starts over: never more kept
        for number in range(MAX_STATEMENTS + 5):
            text = db.dialect.sql(f"SELECT {number} AS n, name FROM datasets WHERE name = ?")
            assert Database._execute(conn, text, db.dialect.params(["c"])) == [(number, "c")]
            assert len(conn._statements) <= MAX_STATEMENTS
    finally:
        db.release(conn)
    catalog.close()  # the kept statements close first: no "open AdbcStatement" on the way
    gc.collect()
