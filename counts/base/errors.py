"""One error hierarchy for the counts engine.

Messages name the model and field they concern, so an operator reading a log line or a failed
``migrate`` knows which declaration to fix without a stack trace.
"""


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing): what one log line or
    one JSON error shows of a driver's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CountsError(Exception):
    """Base class of every error the engine raises on purpose."""


class DeclarationError(CountsError):
    """A ``CachedCountField`` declaration cannot be turned into a count.

    Raised at start-up (``AppConfig.ready``), never while serving a request.
    """

    def __init__(self, label: str, message: str) -> None:
        super().__init__(f"{label}: {message}")
        self.label = label


class UnknownTargetError(CountsError):
    """A mark, message or API call names a model that declares no cached counts."""

    def __init__(self, label: str) -> None:
        super().__init__(f"{label!r} declares no cached counts")
        self.label = label


class MigrationError(CountsError):
    """A count migration operation cannot run as configured (e.g. inside one transaction)."""
