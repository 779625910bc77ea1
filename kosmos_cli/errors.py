"""Typed errors: each carries the exit code the CLI returns and an optional hint."""

from __future__ import annotations


class KosmosError(Exception):
    """Base error with a user-facing message, an optional hint and an exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message with its hint, for logs and other tools' error lines: `message (hint: ...)`."""
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle with every attribute (errors cross into and out of the reader process and Ray)."""
        return (_restore, (type(self), self.message, self.__dict__))


def _restore(cls: type[KosmosError], message: str, state: dict[str, object]) -> KosmosError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InputError(KosmosError):
    """One input (file or page) cannot be read; the run goes on without it."""

    exit_code = 1


class UsageError(KosmosError):
    """The command line asks for something impossible."""

    exit_code = 2


class ModelLoadError(KosmosError):
    """The model, processor or device could not be set up."""

    exit_code = 3


class GenerationError(KosmosError):
    """The model failed on a page even alone (e.g. out of memory)."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """Return the first line of an exception's text, or its type's name when it has none."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
