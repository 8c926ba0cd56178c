"""The unit that flows through the stages, and the record a stage leaves when it removes one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Removal:
    """Why a document left the pipeline; ``kept`` names the surviving copy of a duplicate."""

    stage: str
    reason: str
    kept: str | None = None


@dataclass(slots=True)
class Doc:
    """One document: an id (its ``id`` field, else ``file:record``) and its text.

    A stage never drops a document: it sets ``removed`` and yields it, and the pipeline writes it to the report.
    """

    id: str
    text: str
    removed: Removal | None = None

    def remove(self, stage: str, reason: str, kept: str | None = None) -> Doc:
        self.removed = Removal(stage, reason, kept)
        return self


class DataError(RuntimeError):
    """Bad input met with ``input.on_error = "stop"``; str(e) is the one line shown to the user."""
