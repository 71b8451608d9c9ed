"""Every problem of a dataset in one report: a user fixing 40 files should not need 40 runs."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from rloss.errors import DataError, clip_message

LINE_CHARS = 400
T = TypeVar("T")


class DatasetProblems(DataError):
    """All the problems found, one line each. Other rloss errors clip their whole message, which here
    would hide the problems in the middle of the list; so each line is clipped instead."""

    def __init__(self, summary: str, problems: Sequence[str]):
        lines = [summary, *(f"  {clip_message(line, LINE_CHARS)}" for line in problems)]
        Exception.__init__(self, "\n".join(lines))
        self.problems = list(problems)


class Problems:
    """The problems noted so far, in the order found, each once."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def add(self, line: str) -> None:
        if line not in self._seen:
            self._seen.add(line)
            self.lines.append(line)

    def attempt(self, action: Callable[[], T]) -> T | None:
        """`action()`, or None with its DataError noted (the readers' errors name the file)."""
        try:
            return action()
        except DataError as error:
            self.add(str(error))
            return None

    def __len__(self) -> int:
        return len(self.lines)

    def raise_if_any(self, summary: str) -> None:
        """Raise DatasetProblems('summary: N problems ...') when any problem was noted."""
        if self.lines:
            count = len(self.lines)
            raise DatasetProblems(f"{summary}: {count} problem{'s' if count > 1 else ''}:", self.lines)
