"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class KlstoreError(Exception):
    """Bad input or an unusable environment; the message names the problem."""


class UnsupportedArchitecture(KlstoreError):
    """The model's structure (blocks, final norm, head) could not be found."""
