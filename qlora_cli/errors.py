"""The one error type for a user's mistakes, rendered once at the CLI edge (exit code 2)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: a recipe key, a data row, an argument, a missing file.

    `where` names the place (``recipe.yaml:12``, ``data.jsonl:7``, ``lora.r``) and `fix` says
    what to do about it; the CLI prints both and exits 2 without a traceback.
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text}\n  fix: {self.fix}" if self.fix else text


class UserErrors(UserError):
    """Several user mistakes found in one pass, reported together so they are fixed in one round."""

    def __init__(self, errors: list[UserError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __str__(self) -> str:
        return "\n".join(f"- {e}" for e in self.errors)
