"""SQL that a migration file shows one clause per line, so that a reviewer's diff shows what
changed.

A trigger's function is a few statements of a thousand characters or more each; written as one
Python string they made a new count's migration one 20 KB line (issue 23). The migration writer
(``counts.management.migrations_writer``) writes each as a parenthesised run of literals, one
per clause, cut by :func:`pieces`. Python joins them back into exactly the text that was
compiled, so what is installed, and its hash, are unchanged.
"""

from __future__ import annotations

import re

#: Where a long line is cut: before these keywords (the space before them starts the piece).
_CLAUSE = re.compile(
    r"(?= (?:UNION ALL|UNION|SELECT|FROM|WHERE|LEFT JOIN|CROSS JOIN|JOIN|GROUP BY|HAVING"
    r"|ORDER BY|ON CONFLICT|RETURNING|AND|WHEN|THEN|ELSE|EXECUTE) )"
)
#: A piece grows by clauses until the next would take it past ``WIDTH`` characters, and is never
#: cut shorter than ``SHORTEST``.
WIDTH, SHORTEST = 80, 40


def pieces(sql: str) -> list[str]:
    """``sql`` cut into pieces of about :data:`WIDTH` characters at line ends and before clause
    keywords; ``"".join(pieces(sql)) == sql``."""
    out: list[str] = []
    for line in sql.splitlines(keepends=True):
        current = ""
        for part in _CLAUSE.split(line):
            if len(current) >= SHORTEST and len(current) + len(part) > WIDTH:
                out.append(current)
                current = ""
            current += part
        if current:
            out.append(current)
    assert "".join(out) == sql
    return out
