"""The one exception type for user errors: bad spec, bad data, bad arguments, missing credentials."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix. The CLI prints it in one or two lines and exits with code 2."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.hint = hint

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "") + ": "
        field = f"field '{self.field}': " if self.field else ""
        text = f"{where}{field}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text
