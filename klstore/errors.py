"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class KlstoreError(Exception):
    """Bad input or an unusable environment; the message names the problem."""


class UnsupportedArchitecture(KlstoreError):
    """The model's structure (blocks, final norm, head) could not be found."""


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line (or its type name): what one-line messages quote."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
