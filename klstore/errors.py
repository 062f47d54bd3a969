"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class KlstoreError(Exception):
    """Bad input or an unusable environment; the message names the problem."""


class StoreWriteError(KlstoreError, OSError):
    """A store file could not be written, moved or deleted (full disk, read-only folder, S3 error).
    Also an OSError, so code that handles file errors handles it."""


class UnsupportedArchitecture(KlstoreError):
    """The model's structure (blocks, final norm, head) could not be found."""


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line (or its type name): what one-line messages quote."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def remote_message(exc: BaseException) -> str:
    """The message of the error behind a Ray failure: the `KlstoreError: ...` line of the remote
    traceback when there is one, else its last `SomethingError: ...` line, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        marker = "KlstoreError: "
        if marker in line and not line.startswith(("raise ", "File ")):
            return line.split(marker, 1)[1]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head and ": " in line:
            return line
    return first_line(exc)
