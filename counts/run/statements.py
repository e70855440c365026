"""What a SQL statement writes, read from its text: ``(table, operation)`` pairs.

The statement is judged from its text, never parsed in full (this runs on every statement of
every request):

- a statement whose first keyword is not a write verb or ``WITH``, and that holds no ``;``,
  costs one anchored regex match and one ``find``: that is every SELECT Django sends; so does
  a write in Django's own form (``UPDATE "t" SET``, ``INSERT INTO "t" (``, ``DELETE FROM "t"``);
- otherwise a tokenizer reads the first :data:`HEAD` characters, skipping comments (nested
  ``/* */`` too), string literals, dollar-quoted bodies and quoted names whole, and finds each
  verb where a statement can start: at the beginning, after ``;``, as a CTE body
  (``AS [NOT] [MATERIALIZED] (``), or as the main statement after a CTE list. ``SELECT … FOR
  UPDATE``, ``ON DELETE``, a column called ``delete`` or ``'DELETE FROM t'`` are not there;
- a statement that starts with its verb is done once its table is read, unless a ``;`` follows
  (one C-speed ``find``): a bulk insert's megabyte of VALUES is never tokenized. Its ``ON
  CONFLICT … DO UPDATE``, which comes after the VALUES, is searched in its last :data:`TAIL`
  characters.

Not seen, and left to the scheduler's sweep (marks are written by the triggers regardless):
writes from plain ``psycopg`` or another client, psycopg's ``cursor.copy()`` (it bypasses
Django's wrappers), functions and procedures that write (``SELECT f()``, ``CALL``, ``DO``),
``EXPLAIN ANALYZE`` of a write, ``PREPARE``/``EXECUTE``, and a verb that starts beyond
:data:`HEAD` (a CTE list longer than that, a second statement after a long first one).
"""

from __future__ import annotations

import re

#: Characters of a statement read token by token. A verb is the first keyword of its
#: statement, so only data-modifying CTEs (and the statement after them) sit deeper; those are
#: hand-written (Django emits no CTE) and their CTE lists fit in a few kilobytes. 16 KiB of dense
#: SQL (a paren every 14 characters) reads in about 0.4 ms, paid only by WITH statements that
#: contain a verb word and by multi-statement strings; a verb beyond it waits for the sweep.
HEAD = 16384
#: Characters at the end of an INSERT searched for ``ON CONFLICT … DO UPDATE`` (Django puts it
#: after the VALUES; 4 KiB holds a SET list of about a hundred columns).
TAIL = 4096
#: Table name standing for every watched table: ``TRUNCATE … CASCADE`` also empties the tables
#: that reference the named ones, which the text does not name.
ANY_TABLE = "*"
#: Write verbs and the trigger operations each performs on its table.
VERBS = {
    "INSERT": ("insert",),
    "UPDATE": ("update",),
    "DELETE": ("delete",),
    "TRUNCATE": ("truncate",),
    "MERGE": ("insert", "update", "delete"),
    "COPY": ("insert",),  # only COPY … FROM; COPY … TO reads
}
#: How Django writes (``INSERT INTO "t" (``, ``UPDATE "t" SET``, ``DELETE FROM "t" WHERE``):
#: one anchored match answers for a single such statement.
_DJANGO = re.compile(r'(INSERT INTO|UPDATE|DELETE FROM) "([^"]+)" ')
#: First keywords of a statement that may write (EXPLAIN ANALYZE aside).
_STARTS = frozenset(VERBS) | {"WITH"}
#: The first keyword, when the statement starts with neither a comment nor a quote.
_LEAD = re.compile(r"[\s(]*([^\W\d]\w*)")
#: Any verb, searched in upper-cased text (``UPDATED_AT`` too: it only costs a closer look): a
#: WITH statement or a ``;`` tail without one is not read further.
_VERB_WORD = re.compile(r"INSERT|UPDATE|DELETE|TRUNCATE|MERGE|COPY")
#: Searched in upper-cased text: a literal prefix keeps the search at C speed.
_DO_UPDATE = re.compile(r"DO\s+UPDATE\b")
#: The word a run of text starts with.
_WORD = re.compile(r"\s*([^\W\d][\w$]*)")
#: A run of text ending in ``AS`` or ``MATERIALIZED``: a ``(`` after it opens a CTE body.
_ENDS_AS = re.compile(r"\b(?:AS|MATERIALIZED)\s*\Z", re.I)
#: What both readers skip whole: literals and comments. Unterminated ones run to the end of
#: the window (a VALUES list cut off by :data:`HEAD`).
_SKIPPED = r"""
    | (?P<string>'[^']*(?:''[^']*)*'?)
    | (?P<comment>--[^\n]*)
    | (?P<block>/\*)
    | (?P<dollar>\$(?:[^\W\d]\w*)?\$)
"""
#: The statement structure: parens and ``;``, between runs of anything else (quoted names
#: included) matched in one C-speed step, so a long SELECT list is not a Python step per word.
_SCAN = re.compile(
    r"""
      (?P<punct>[();])
    | "[^"]*(?:""[^"]*)*"?                     # a quoted name a run does not start with
    """
    + _SKIPPED
    + r"""
    | (?P<run>[^()'";$/-]*(?:(?:"[^"]*"|/(?!\*)|-(?!-))[^()'";$/-]*)*)
    """,
    re.X,
)
#: One token of a write's head, read after its verb to find the table(s).
_TOKEN = re.compile(
    r"""
      (?P<estring>[eE]'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'?)
    | (?P<w>[^\W\d][\w$]*)                      # keyword or unquoted name
    | "(?P<q>[^"]*(?:""[^"]*)*)"?               # quoted name
    | (?P<p>[(),;.*])
    """
    + _SKIPPED,
    re.X,
)
_ESTRING = re.compile(r"[eE]'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'?")
_BLOCK = re.compile(r"/\*|\*/")

Token = tuple[str, str]  # ("w", word as written) | ("q", quoted name) | ("p", punctuation)


def _skip(sql: str, m: re.Match, end: int) -> int:
    """Where a skipped token matched by ``m`` really ends (nested comments, dollar quotes)."""
    kind, pos = m.lastgroup, m.end()
    if kind == "block":
        depth = 1
        while depth:
            inner = _BLOCK.search(sql, pos, end)
            if inner is None:
                return end
            depth += 1 if inner.group() == "/*" else -1
            pos = inner.end()
    elif kind == "dollar":
        if m.start() and (sql[m.start() - 1].isalnum() or sql[m.start() - 1] in "_$"):
            return m.start() + 1  # a ``$`` inside a name such as ``a$b$c``
        close = sql.find(m.group(kind), pos, end)
        return end if close < 0 else close + len(m.group(kind))
    elif kind == "string" and m.start() and sql[m.start() - 1] in "eE":
        before = sql[m.start() - 2] if m.start() > 1 else " "
        if not (before.isalnum() or before in "_$"):  # E'…' takes backslash escapes
            return _ESTRING.match(sql, m.start() - 1, end).end()
    return pos


class _Tokens:
    """The tokens of ``sql[start:end]``, read lazily with one token of lookahead."""

    def __init__(self, sql: str, start: int, end: int) -> None:
        self.sql, self.pos, self.end = sql, start, end
        self._ahead: Token | None = None
        self._ahead_at = start

    @property
    def resume(self) -> int:
        """Where the text not yet taken starts."""
        return self._ahead_at if self._ahead is not None else self.pos

    def peek(self) -> Token | None:
        if self._ahead is None:
            self._ahead = self._read()
        return self._ahead

    def take(self) -> Token | None:
        token = self.peek()
        self._ahead = None
        return token

    def peek_word(self, *words: str) -> bool:
        token = self.peek()
        return token is not None and token[0] == "w" and token[1].upper() in words

    def _read(self) -> Token | None:
        sql, end = self.sql, self.end
        while (m := _TOKEN.search(sql, self.pos, end)) is not None:
            self._ahead_at, self.pos, kind = m.start(), m.end(), m.lastgroup
            if kind in ("w", "p"):
                return (kind, m.group(kind))
            if kind == "q":
                return ("q", m.group(kind).replace('""', '"'))
            self.pos = _skip(sql, m, end)
        self._ahead_at = self.pos = end
        return None


class _Reader:
    """Finds the (table, operation) pairs of the statements in one SQL string.

    State while reading: paren ``depth``; ``withs``, the depths at which a WITH's list of CTEs
    is open (a ``)`` back to that depth may be followed by the main statement); ``expect``, the
    next word starts a statement; ``as_before``, the text before a ``(`` ended in ``AS``.
    """

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.end = min(len(sql), HEAD)
        self.found: set[tuple[str, str]] = set()
        self.inserted: str | None = None  # table of the last INSERT, for its DO UPDATE

    def read(self) -> frozenset[tuple[str, str]]:
        sql, end = self.sql, self.end
        pos, depth, withs, expect, as_before = 0, 0, [], True, False
        while pos < end:
            if expect and (word := _WORD.match(sql, pos, end)) is not None:
                expect, verb = False, word.group(1).upper()
                if verb == "WITH":
                    withs.append(depth)
                elif withs and withs[-1] == depth and verb != "AS":  # AS: after (columns)
                    withs.pop()  # the main statement after a CTE list
                if verb in VERBS:
                    pos = self._statement(verb, word.end())
                    if not withs and sql.find(";", pos) < 0 and not self._tail(verb, pos):
                        break  # nothing after a plain write's table writes again
                    continue
            m = _SCAN.search(sql, pos, end)
            if m is None:
                break
            start, pos, kind = m.start(), m.end(), m.lastgroup
            if kind == "run":
                if start == pos:  # a lone character no token starts with
                    pos += 1
                    continue
                if self.inserted and _DO_UPDATE.search(sql[start:pos].upper()):
                    self.found.add((self.inserted, "update"))
                expect = False
                as_before = _ENDS_AS.search(sql, max(start, pos - 16), pos) is not None
            elif kind == "punct":
                if m.group(kind) == "(":
                    expect, depth = expect or as_before, depth + 1
                elif m.group(kind) == ")":
                    depth -= 1
                    while withs and withs[-1] > depth:
                        withs.pop()
                    expect = bool(withs) and withs[-1] == depth
                else:
                    depth, withs, expect = 0, [], True
                as_before = False
            else:
                pos = _skip(sql, m, end)
                if kind not in ("comment", "block"):  # comments are blank; literals are not
                    expect = as_before = False
        return frozenset(self.found)

    def _statement(self, verb: str, start: int) -> int:
        """Read the table(s) a write verb names; return where reading resumes."""
        tokens = _Tokens(self.sql, start, self.end)
        if verb in ("INSERT", "MERGE", "DELETE"):
            if not tokens.peek_word("FROM" if verb == "DELETE" else "INTO"):
                return tokens.resume
            tokens.take()
        if verb == "TRUNCATE" and tokens.peek_word("TABLE"):
            tokens.take()
        names = [self._name(tokens)]
        if verb == "TRUNCATE":
            while tokens.peek() == ("p", ","):
                tokens.take()
                names.append(self._name(tokens))
            while tokens.peek_word("RESTART", "CONTINUE", "IDENTITY", "CASCADE", "RESTRICT"):
                if tokens.take()[1].upper() == "CASCADE":
                    names.append(ANY_TABLE)
        if verb == "COPY" and (names[0] is None or not self._copies_in(tokens)):
            return tokens.resume
        if verb == "INSERT":
            self.inserted = names[0]
        for name in names:
            if name is not None:
                self.found.update((name, op) for op in VERBS[verb])
        return tokens.resume

    @staticmethod
    def _name(tokens: _Tokens) -> str | None:
        """A table name as PostgreSQL folds it, schema dropped: ``public."T"`` is ``T``."""
        if tokens.peek_word("ONLY"):
            tokens.take()
        name = None
        while (token := tokens.peek()) is not None and token[0] != "p":
            tokens.take()
            name = token[1].lower() if token[0] == "w" else token[1]
            if tokens.peek() != ("p", "."):
                break
            tokens.take()
        if tokens.peek() == ("p", "*"):
            tokens.take()
        return name

    @staticmethod
    def _copies_in(tokens: _Tokens) -> bool:
        """After ``COPY table``: skip a column list, then FROM writes and TO reads."""
        if tokens.peek() == ("p", "("):
            while (token := tokens.take()) is not None and token != ("p", ")"):
                pass
        return tokens.peek_word("FROM")

    def _tail(self, verb: str, pos: int) -> bool:
        """Whether to read on to find an INSERT's ``ON CONFLICT … DO UPDATE``.

        It lies after the VALUES. A statement longer than the window is judged by a search of
        its last :data:`TAIL` characters; a shorter one is read on, to skip literals.
        """
        if verb != "INSERT" or self.inserted is None:
            return False
        if not _DO_UPDATE.search(self.sql[max(pos, len(self.sql) - TAIL) :].upper()):
            return False
        if len(self.sql) > self.end:
            self.found.add((self.inserted, "update"))
            return False
        return True


def statement_writes(sql: str) -> frozenset[tuple[str, str]]:
    """The ``(table, operation)`` pairs ``sql`` writes, judged from its text (see the module).

    ``operation`` is a trigger event (``insert``, ``update``, ``delete``, ``truncate``); table
    :data:`ANY_TABLE` means "whatever a cascade reaches".
    """
    plain = _DJANGO.match(sql)
    if plain is not None and sql.find(";", plain.end()) < 0:
        verb = plain.group(1)[:6]
        if verb != "INSERT" or not _DO_UPDATE.search(sql[max(0, len(sql) - TAIL) :].upper()):
            return frozenset({(plain.group(2), VERBS[verb][0])})
    lead = _LEAD.match(sql)
    if lead is not None:
        first = lead.group(1).upper()
        if first not in _STARTS:
            semicolon = sql.find(";")
            if semicolon < 0 or not _VERB_WORD.search(sql[semicolon:HEAD].upper()):
                return frozenset()
        elif first == "WITH" and not _VERB_WORD.search(sql[:HEAD].upper()):
            return frozenset()
    return _Reader(sql).read()
