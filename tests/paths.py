"""Where the repository is, for tests in any folder of ``tests/``."""

from pathlib import Path

#: The repository's root (where ``manage.py`` is).
ROOT = Path(__file__).resolve().parent.parent
