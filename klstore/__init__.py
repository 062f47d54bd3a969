"""klstore: layer x generated-token KL-divergence maps of causal language models.

The Python API (see `klstore.api`):

    import klstore
    lens = klstore.load("smollm2-135m")
    res = lens.compute(["The capital of France is"], probes=["logit_lens"], layers="0,15-21,27", n=5)
    res.matrix(0, "logit_lens", "kl")     # numpy [layers x generated tokens], nats
    res.save("./klstore-data", run="nb")  # what `klstore compute --store` writes
    klstore.open_store("./klstore-data").sql("SELECT layer, avg(kl) FROM kl GROUP BY layer")

Importing the package does nothing but define names; heavy libraries (torch,
transformers, ray) are imported by the modules that need them. `load`, `open_store`,
`Lens`, `Result`, `StoreReader`, `KlstoreError`, `export_run` and `import_run` (a run as a
dataset, docs/dataset.md) are imported on first use.
"""

__version__ = "0.1.0"

__all__ = ["load", "open_store", "Lens", "Result", "StoreReader", "KlstoreError", "export_run", "import_run"]

_LAZY = {
    "load": "klstore.api",
    "open_store": "klstore.api",
    "Lens": "klstore.api",
    "Result": "klstore.api",
    "StoreReader": "klstore.api",
    "export_run": "klstore.api",
    "import_run": "klstore.api",
    "KlstoreError": "klstore.errors",
}


def __getattr__(name: str):
    """`klstore.load` etc.: the API's names, imported when first asked for."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'klstore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
