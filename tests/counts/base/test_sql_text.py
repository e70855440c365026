"""Trigger SQL in migrations, one clause per line: the text is unchanged, the file readable."""

from __future__ import annotations

import ast

from counts.base.sql_text import SHORTEST, WIDTH, pieces
from counts.compile.triggers import compile_triggers
from counts.declare.graph import app_graph
from tests.paths import ROOT


def test_pieces_join_back_into_exactly_the_compiled_sql_cut_at_clauses():
    for trigger in compile_triggers(app_graph()):
        cut = pieces(trigger.sql)
        assert "".join(cut) == trigger.sql
        assert len(cut) > trigger.sql.count("\n")  # long statements are cut too
        for piece in cut[:-1]:
            # A piece ends at a line's end, or is cut before a clause once long enough.
            assert piece.endswith("\n") or len(piece) >= SHORTEST


def test_a_written_trigger_migration_is_short_lines_that_python_reads_back_as_the_sql():
    path = ROOT / "project/monitoring/migrations/0011_count_triggers.py"
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) > 300
    # Long lines left: a function's header, a trigger's CREATE and DROP, one statement each.
    assert sum(len(line) > WIDTH + 60 for line in lines) < len(lines) // 5
    literals = [
        value
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values, strict=True)
        if isinstance(key, ast.Constant) and key.value == "sql"
    ]
    assert literals and all(isinstance(v, ast.Constant) for v in literals)  # one str each
    assert all(v.value.startswith("CREATE OR REPLACE FUNCTION") for v in literals)
