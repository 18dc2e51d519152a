"""Errors that tunelab shows to users as one clear message (no traceback unless --debug)."""


class TunelabError(Exception):
    """A problem with the user's input or environment: what went wrong, where, and how to fix it."""


class ConfigError(TunelabError):
    """A config file (or --set override) that does not validate; lists every problem at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        n = len(problems)
        head = f"{n} problem{'s' if n != 1 else ''} in {source}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in problems)]))


class DataError(TunelabError):
    """A data file that cannot be used as asked: names the file, row and column."""


class ModelError(TunelabError):
    """A model that cannot be found or loaded."""


class RunError(TunelabError):
    """A run directory that is missing, unfinished or already exists."""
