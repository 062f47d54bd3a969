"""Fault injection for the store: the k-th file operation fails."""

from klstore.store import Store


class Faulty:
    """Makes the k-th file operation (put_bytes, delete, move) of the store fail, once."""

    def __init__(self, monkeypatch, fail_at: int, error=OSError(5, "Input/output error (injected)")):
        self.calls, self.fail_at, self.error = 0, fail_at, error
        for name in ("put_bytes", "delete", "move"):
            original = getattr(Store, name)
            monkeypatch.setattr(Store, name, self._wrap(original))

    def _wrap(self, original):
        def op(store, *args):
            self.calls += 1
            if self.calls == self.fail_at:
                raise self.error
            return original(store, *args)

        return op
