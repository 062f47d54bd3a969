"""DuckDB over a store: a view per table (`kl`, `generations`, `prompts`, `runs`, `shards`, `tokens`),
the derived views `lens_tokens` and `settling`, the macros `settling_depth(g)` and
`deep_thinking(g, rho)`, and SQL on them.

Local stores are read with `read_parquet(..., hive_partitioning = true,
union_by_name = true)`, so files written by an older schema (fewer columns)
read with nulls in the new columns. The file globs reach the views as DuckDB
variables set with parameters (`SET VARIABLE klstore_kl = ?`), never pasted into
SQL text. S3 stores are read through pyarrow datasets registered in DuckDB (no
DuckDB extension download needed).

Every connection is confined: DuckDB's file access is limited to the store's own
folder (`allowed_directories`, `enable_external_access = false`), extensions are
neither installed nor autoloaded, and the configuration is locked. `sql()` (and so
`klstore sql`) further accepts exactly one read-only statement (a query, or EXPLAIN
of one), checked on DuckDB's parse, never by pattern matching (`check_read_only`).
"""

from __future__ import annotations

import pyarrow as pa

from klstore.errors import KlstoreError, first_line
from klstore.store.integrity import stray_message, unpartitioned, visible
from klstore.store.tables import TABLES, VIEW_COLUMNS, VIEW_DEFAULTS, Store, open_store

_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.float32(): "FLOAT",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.list_(pa.int32()): "INTEGER[]",
    pa.list_(pa.float32()): "FLOAT[]",
}

# Views and macros over the tables (docs/conventions.md, "Lens tokens" and "Settling depth").
# They read only the table views, so they work the same on local and S3 stores.
# Settling, in one pass per column: the good layers in order, those above the deepest bad
# layer (or -1), the first of them (null when there is none: the deepest layer is bad).
_SETTLE = (
    "list_filter(list(layer ORDER BY layer) FILTER (WHERE {good}), "
    "lambda x: x > coalesce(max(layer) FILTER (WHERE NOT ({good})), -1))[1]"
)
_METRIC = (
    "CASE metric WHEN 'kl' THEN kl WHEN 'kl_reverse' THEN kl_reverse WHEN 'js' THEN js "
    "ELSE error('settling_depth: metric must be kl, kl_reverse or js') END"
)
_SETTLING = """
        SELECT run_id, model, probe, prompt_id, any_value(prompt_group) AS prompt_group, gen_idx,
               any_value(n_layers) AS n_layers, {settle} AS settle_layer,
               (settle_layer + 1) / any_value(n_layers) AS settle_fraction
        FROM kl GROUP BY run_id, model, probe, prompt_id, gen_idx"""
DERIVED_VIEWS = {
    "lens_tokens": """
        SELECT k.run_id, k.model, k.probe, k.prompt_id, k.prompt_group, k.layer, k.gen_idx,
               k.rank, k.token_id, t.token_text, k.prob
        FROM (SELECT run_id, model, probe, prompt_id, prompt_group, layer, gen_idx,
                     unnest(range(1, len(topk_ids) + 1)) AS rank, unnest(topk_ids) AS token_id,
                     unnest(topk_probs) AS prob
              FROM kl WHERE topk_ids IS NOT NULL) k
        LEFT JOIN tokens t ON t.model = k.model AND t.token_id = k.token_id""",
    "settling": _SETTLING.format(settle=_SETTLE.format(good="top1_match")),
}
DERIVED_MACROS = {
    "settling_depth": (
        "g, metric := 'kl'",
        _SETTLING.format(settle=_SETTLE.format(good=f"coalesce({_METRIC} <= g, false)")),
    ),
    "deep_thinking": (
        "g, rho, metric := 'js'",
        """
        SELECT run_id, model, probe, prompt_id, any_value(prompt_group) AS prompt_group,
               count(*) AS n_tokens,
               count(*) FILTER (WHERE settle_layer IS NULL OR settle_fraction > rho) AS n_deep,
               n_deep / n_tokens AS deep_share
        FROM settling_depth(g, metric := metric)
        GROUP BY run_id, model, probe, prompt_id""",
    ),
}


def _column_types(table: str) -> dict[str, str]:
    schema, partitions = TABLES[table]
    types = {name: "VARCHAR" for name in partitions}
    types.update({field.name: _DUCK_TYPES[field.type] for field in schema})
    return types


def _empty_view(table: str) -> str:
    types = _column_types(table)
    cols = ", ".join(f"CAST(NULL AS {types[c]}) AS {c}" for c in VIEW_COLUMNS[table])
    return f"SELECT {cols} WHERE false"


def _quote(text: str) -> str:
    """A SQL string literal; only for statements printed for the plain shell (see view_statements)."""
    return "'" + text.replace("'", "''") + "'"


def read_parquet_sql(table: str, source: str, present=None) -> str:
    """SELECT of a table's view columns from `read_parquet(<source>)`; `source` is SQL for the
    file list: a parameter (`$files`) or a variable (`getvariable('klstore_kl')`). Columns not
    in `present` (the files' columns, when known) read as typed nulls: files from before a column
    existed (see `present_columns`)."""
    _, partitions = TABLES[table]
    hive_types = ", ".join(f"{_quote(p)}: 'VARCHAR'" for p in partitions)
    types = _column_types(table)
    defaults = VIEW_DEFAULTS.get(table, {})

    def column(c: str) -> str:
        value = f"CAST({c if present is None or c in present else 'NULL'} AS {types[c]})"
        return f"COALESCE({value}, {_quote(defaults[c])}) AS {c}" if c in defaults else f"{value} AS {c}"

    cols = ", ".join(column(c) for c in VIEW_COLUMNS[table])
    return (
        f"SELECT {cols} FROM read_parquet({source}, hive_partitioning = true, "
        f"union_by_name = true, hive_types = {{{hive_types}}})"
    )


def present_columns(con, table: str, source: str, params=None) -> set[str]:
    """The columns that the files behind `source` have (their union, partition keys included)."""
    _, partitions = TABLES[table]
    hive_types = ", ".join(f"{_quote(p)}: 'VARCHAR'" for p in partitions)
    rows = con.execute(
        f"DESCRIBE SELECT * FROM read_parquet({source}, hive_partitioning = true, "
        f"union_by_name = true, hive_types = {{{hive_types}}})",
        params,
    ).fetchall()
    return {row[0] for row in rows}


def _derived_statements() -> list[str]:
    """CREATE statements of the derived views and macros (after the table views)."""
    out = [f"CREATE OR REPLACE VIEW {name} AS {body.strip()};" for name, body in DERIVED_VIEWS.items()]
    out += [
        f"CREATE OR REPLACE MACRO {name}({args}) AS TABLE {body.strip()};"
        for name, (args, body) in DERIVED_MACROS.items()
    ]
    return out


def view_statements(store: Store) -> dict[str, str]:
    """`CREATE VIEW` statements to paste into the plain duckdb shell (`sql --print-views`).

    The shell has no parameters, so the store's path is written as a quoted literal here;
    klstore's own connections use `connect()`, which passes paths as values.
    """
    import duckdb

    out = {}
    con = duckdb.connect(":memory:")
    for table in TABLES:
        if store.is_local and not store.files(table):
            body = _empty_view(table)
        elif store.is_local:
            present = present_columns(con, table, "$files", {"files": store.files(table)})
            body = read_parquet_sql(table, _quote(store.path(table, "**", "*.parquet")), present)
        else:
            body = read_parquet_sql(table, _quote(f"s3://{store.root}/{table}/**/*.parquet"))
        out[table] = f"CREATE OR REPLACE VIEW {table} AS {body};"
    for statement in _derived_statements():
        out[statement.split()[4].split("(")[0]] = statement
    return out


def connect(store: Store | str | None = None):
    """A DuckDB connection with the five views over the store (Python API for notebooks).

        con = klstore.store.connect("./klstore-data")
        con.sql("SELECT layer, avg(kl) FROM kl GROUP BY layer").df()

    The connection is confined (see the module docstring): it reads no file outside the
    store and loads no extension. For SQL from someone else, use `sql()`, which also
    refuses every statement but one read-only SELECT.
    """
    import duckdb

    if not isinstance(store, Store):
        store = open_store(store)
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    _create_views(con, store)
    _confine(con, store)
    return con


def _confine(con, store: Store) -> None:
    """No file access outside the store, no extensions, and no way to change that afterwards."""
    if store.is_local:
        con.execute("SET allowed_directories = ?", [[store.root.rstrip("/") + "/"]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _unreadable(store: Store, files: list[str]) -> str | None:
    """The first file whose footer cannot be read, as one line for the user."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            with store.fs.open_input_file(path) as handle:
                pq.read_metadata(handle)
        except (OSError, pa.ArrowInvalid) as exc:
            return f"{path} is unreadable ({first_line(exc)})"
    return None


def _failing_view(con, table: str, problem: str) -> None:
    """A view with the table's columns whose every query fails with `problem` and the cure."""
    message = f"table {table}: {problem}; run `klstore verify --quarantine` to move bad files aside"
    types = _column_types(table)
    cols = ", ".join(f"CAST(NULL AS {types[c]}) AS {c}" for c in VIEW_COLUMNS[table])
    variable = f"klstore_{table}_error"
    con.execute(f"SET VARIABLE {variable} = ?", [message])
    con.execute(
        f"CREATE VIEW {table} AS SELECT {cols} FROM (SELECT 1) WHERE error(getvariable({_quote(variable)})) IS NULL"
    )


# The read-only gate of `sql()` (and so of `klstore sql` and `open_store().sql`), judged on
# DuckDB's own parse, never by pattern matching on the text:
# - a SELECT statement: every query form DuckDB parses as one (FROM-first, TABLE x, VALUES,
#   SUMMARIZE, DESCRIBE, SHOW, PIVOT ... IN (...), UNPIVOT, WITH ... SELECT);
# - a MULTI statement that is a query: DuckDB parses a PIVOT without an IN list as
#   CREATE TYPE (an ENUM of the pivoted values), the query, DROP TYPE. The type lives in the
#   connection's in-memory catalog for the length of the statement and reaches no file, so
#   it is allowed. A MULTI is a query exactly when it parses as a subquery
#   (`SELECT * FROM (<it>)`): a COPY, CREATE or INSERT around a PIVOT does not;
# - EXPLAIN [ANALYZE] [(options)] of a statement that is itself accepted (EXPLAIN ANALYZE
#   executes its statement, so `EXPLAIN ANALYZE COPY ...` would write).
_EXPLAIN_ANALYZE = ("ANALYZE", "ANALYSE")


def _parse(con, query: str) -> list:
    import duckdb

    try:
        return con.extract_statements(query)
    except duckdb.Error as exc:
        raise KlstoreError(f"SQL error: {_sql_message(exc)}") from None


def _sql_message(exc) -> str:
    message = first_line(exc)
    if ".parquet" in message and "verify" not in message:
        message += "; run `klstore verify` to check the store's files"
    return message


def _tokens(text: str) -> list[tuple[int, str, str]]:
    """(position, kind, text) of DuckDB's tokens, comments left out."""
    import duckdb

    tokens = [(pos, kind.name) for pos, kind in duckdb.tokenize(text)]
    ends = [pos for pos, _ in tokens[1:]] + [len(text)]
    return [(pos, kind, text[pos:end].strip()) for (pos, kind), end in zip(tokens, ends) if kind != "comment"]


def _explained(con, text: str) -> list:
    """The parsed statements inside `EXPLAIN [ANALYZE] [(options)] <statement>`. A parenthesis
    after EXPLAIN opens its options, or the statement itself (`EXPLAIN (SELECT 1)`): the
    options reading is taken whenever what follows them parses, so a write is never missed."""
    import duckdb

    tokens = _tokens(text)[1:]  # after EXPLAIN
    if tokens and tokens[0][1] == "keyword" and tokens[0][2].upper() in _EXPLAIN_ANALYZE:
        tokens = tokens[1:]
    if not tokens:
        return []
    start = tokens[0][0]
    if tokens[0][2].startswith("("):
        depth = 0
        for index, (_, _, token) in enumerate(tokens):
            depth += token.count("(") - token.count(")")
            if depth <= 0:
                rest = tokens[index + 1 :]
                try:
                    after_options = con.extract_statements(text[rest[0][0] :]) if rest else []
                except duckdb.Error:  # not parsable after the options: a parenthesised query
                    after_options = []
                if after_options:
                    return after_options
                break
    return _parse(con, text[start:])


def _is_query(con, text: str) -> bool:
    """Whether `text` (one parsed statement) is a query expression: it parses as a subquery."""
    import duckdb

    try:
        wrapped = con.extract_statements(f"SELECT * FROM (\n{text}\n)")
    except duckdb.Error:
        return False
    return len(wrapped) == 1 and wrapped[0].type.name in ("SELECT", "MULTI")


def check_read_only(con, query: str) -> None:
    """One statement, and a read-only one (see the rule above), or a KlstoreError naming what it is."""
    statements = _parse(con, query)
    if len(statements) != 1:
        raise KlstoreError(f"give one SQL statement per call, got {len(statements)}")
    _check_statement(con, statements[0], inside_explain=False)


def _check_statement(con, statement, inside_explain: bool) -> None:
    kind = statement.type.name
    if kind == "SELECT":
        return
    tokens = _tokens(statement.query)
    head = tokens[0][2].upper() if tokens else kind
    if head == "EXPLAIN" and kind in ("EXPLAIN", "MULTI"):
        inner = _explained(con, statement.query)
        if len(inner) != 1:
            raise KlstoreError(f"EXPLAIN takes one statement, got {len(inner)}")
        _check_statement(con, inner[0], inside_explain=True)
        return
    if kind == "MULTI" and _is_query(con, statement.query):
        return
    name = head if kind == "MULTI" else kind
    where = " (also inside EXPLAIN)" if inside_explain else ""
    raise KlstoreError(
        f"the store is read-only here: {name} statements are refused{where} "
        "(use SELECT; klstore writes the store itself)"
    )


def execute(con, query: str, params=None):
    """Check `query` with `check_read_only`, run it on `con` with `params`; DuckDB's result.
    SQL errors are KlstoreErrors."""
    import duckdb

    check_read_only(con, query)
    try:
        return con.execute(query, params)
    except duckdb.Error as exc:
        raise KlstoreError(f"SQL error: {_sql_message(exc)}") from None


def _create_views(con, store: Store) -> None:
    """One view per table over its visible files (store.integrity: every row once, also during
    a compaction). A table whose files cannot be read gets a view that fails, when queried,
    with one line naming the bad file; the other tables stay usable."""
    import duckdb

    strays = {table: unpartitioned(store, table) for table in TABLES}
    if store.is_local:
        for table in TABLES:
            files = visible(store, table)
            if strays[table]:
                _failing_view(con, table, stray_message(table, strays[table][0]))
                continue
            if not files:
                con.execute(f"CREATE VIEW {table} AS {_empty_view(table)}")
                continue
            variable = f"klstore_{table}"
            con.execute(f"SET VARIABLE {variable} = ?", [files])
            source = f"getvariable({_quote(variable)})"
            try:
                try:
                    con.execute(f"CREATE VIEW {table} AS {read_parquet_sql(table, source)}")
                except duckdb.BinderException:  # only files from before some column: it reads as null
                    present = present_columns(con, table, source)
                    con.execute(f"CREATE VIEW {table} AS {read_parquet_sql(table, source, present)}")
            except duckdb.Error as exc:
                _failing_view(con, table, _unreadable(store, files) or first_line(exc))
        _create_derived(con)
        return
    import pyarrow.dataset as ds

    for table, (schema, partitions) in TABLES.items():
        files = visible(store, table)
        if strays[table]:
            _failing_view(con, table, stray_message(table, strays[table][0]))
            continue
        if not files:
            con.execute(f"CREATE VIEW {table} AS {_empty_view(table)}")
            continue
        part_schema = pa.schema([(p, pa.string()) for p in partitions])
        full = pa.schema(list(schema) + list(part_schema))
        dataset = ds.dataset(
            files,
            filesystem=store.fs,
            format="parquet",
            partition_base_dir=store.path(table),
            partitioning=ds.partitioning(part_schema, flavor="hive"),
            schema=full,
        )
        con.register(f"_{table}_dataset", dataset)
        cols = ", ".join(VIEW_COLUMNS[table])
        con.execute(f"CREATE VIEW {table} AS SELECT {cols} FROM _{table}_dataset")
    _create_derived(con)


def _create_derived(con) -> None:
    for statement in _derived_statements():
        con.execute(statement)


def sql(store: Store | str | None, query: str, params=None):
    """Run one read-only query over the views with its values as `params` (`?` or `$name`);
    returns (column names, rows). SQL errors and refused statements are KlstoreErrors."""
    import duckdb

    result = execute(connect(store), query, params)
    if result.description is None:
        return [], []
    try:
        return [d[0] for d in result.description], result.fetchall()
    except duckdb.Error as exc:
        raise KlstoreError(f"SQL error: {_sql_message(exc)}") from None
