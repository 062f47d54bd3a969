"""The results store: Parquet tables (tables), DuckDB views and SQL (views), upkeep.

Never imports torch, transformers or ray.

    tables  one pyarrow schema per table, the layout, the one atomic Parquet writer
    views   DuckDB views over a store; SQL with parameters
    upkeep  run summaries, verify, compact
"""

from klstore.store.tables import (  # noqa: F401 - the store's public names
    GENERATIONS_SCHEMA,
    KL_SCHEMA,
    PROMPTS_SCHEMA,
    RUNS_SCHEMA,
    SHARDS_SCHEMA,
    TABLES,
    VIEW_COLUMNS,
    Store,
    open_store,
    work_key,
)
from klstore.store.views import connect, sql  # noqa: F401

__all__ = [
    "GENERATIONS_SCHEMA",
    "KL_SCHEMA",
    "PROMPTS_SCHEMA",
    "RUNS_SCHEMA",
    "SHARDS_SCHEMA",
    "TABLES",
    "VIEW_COLUMNS",
    "Store",
    "open_store",
    "work_key",
    "connect",
    "sql",
]
