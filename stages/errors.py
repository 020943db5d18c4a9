"""Errors raised by jacana's stages: each names the file, the object and what was expected."""

from __future__ import annotations

from jacana.protocol.errors import JacanaError

#: Characters of a value shown in an error message (a schema error quotes the whole value).
MAX_SHOWN = 300


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


class ConfigError(JacanaError, ValueError):
    """An analysis config, a parameter or an override is invalid; the message says what to fix."""


class FilesetError(JacanaError, ValueError):
    """A fileset is malformed or points to nothing."""


class InputFileError(JacanaError, OSError):
    """An input file is missing, unreadable, truncated or lacks a tree or branch."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class MissingBranchError(InputFileError, KeyError):
    """A branch named by the analysis config is absent from a file."""

    def __init__(self, path, branch: str, suggestions: list[str]):
        self.branch = branch
        self.suggestions = list(suggestions)
        hint = f"; closest available: {', '.join(self.suggestions)}" if self.suggestions else ""
        super().__init__(path, f"branch {branch!r} not found{hint}")

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.args[0]


class ModelStructureError(JacanaError, ValueError):
    """Yields changed the structure of a statistical model (e.g. which bins carry staterror)."""
