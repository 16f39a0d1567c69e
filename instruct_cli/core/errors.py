"""The one exception type for user mistakes.

Every bad input (a missing file, a malformed row, an unknown recipe key, an incomplete run folder) raises
`UserError`. The CLI prints it as one paragraph — what was wrong, where, what to do — and exits non-zero,
never with a traceback. Anything else that escapes is a bug in instruct and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: `what` went wrong, `where` (a file, line, key or flag), and `fix`."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        """The message as one paragraph: what, where, what to do."""
        parts = [sentence(self.what)]
        if self.where:
            parts.append(f"Where: {self.where}.")
        if self.fix:
            parts.append(sentence(self.fix))
        return " ".join(parts)


def sentence(text: str) -> str:
    """`text` ending with exactly one full stop (or its own question or exclamation mark)."""
    text = text.rstrip()
    return text if text.endswith(("?", "!")) else text.rstrip(".") + "."
