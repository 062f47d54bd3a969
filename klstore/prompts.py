"""Prompt files: JSON Lines, one record per line: {"id", "text", "group"?, "source"?}."""

from __future__ import annotations

import json
from pathlib import Path

from klstore.engine import Prompt
from klstore.errors import KlstoreError


def parse_record(record, where: str) -> Prompt:
    """One prompt record (a dict) -> Prompt; `where` names it in errors (file:line)."""
    if not isinstance(record, dict):
        raise KlstoreError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("id", "text"):
        if key not in record:
            raise KlstoreError(f"{where}: missing {key!r}")
    unknown = set(record) - {"id", "text", "group", "source"}
    if unknown:
        raise KlstoreError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                           "(allowed: id, text, group, source)")
    pid, text = record["id"], record["text"]
    if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "":
        raise KlstoreError(f"{where}: 'id' must be a non-empty string or integer, got {pid!r}")
    if not isinstance(text, str):
        raise KlstoreError(f"{where}: 'text' must be a string")
    if not text.strip():
        raise KlstoreError(f"{where}: prompt {str(pid)!r} is empty")
    group = record.get("group", "default")
    source = record.get("source")
    if not isinstance(group, str) or not group:
        raise KlstoreError(f"{where}: 'group' must be a non-empty string")
    if source is not None and not isinstance(source, str):
        raise KlstoreError(f"{where}: 'source' must be a string")
    return Prompt(str(pid), text, group, source)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read and validate a JSONL prompt file; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise KlstoreError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KlstoreError(f"cannot read prompts file {path}: {exc}") from None
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KlstoreError(f"{where}: invalid JSON ({exc.msg})") from None
        prompt = parse_record(record, where)
        if prompt.id in seen:
            raise KlstoreError(f"{where}: duplicate id {prompt.id!r} (first on line {seen[prompt.id]})")
        seen[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise KlstoreError(f"{path}: no prompts")
    return prompts
