"""How a validation failure becomes the one line users see, and the base of every value.

Every value of klstore.spec is a `Value`: a pydantic model with `extra="forbid"`, strict types,
no NaN or infinity, frozen. `validate` builds one from plain data (YAML, JSON, CLI values) and
`describe` turns its first validation error into one line:

    <where>: <key path> must be <what>, got <value>
    <where>: <key path>: unknown key (allowed: ...)

A value built directly (`GenerationSpec(max_new_tokens=0)`) raises the same line as a
KlstoreError. Rules written as plain checks that raise KlstoreError join pydantic through
`rule` (or `fail` for a message of their own), so their text follows the key path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from klstore.errors import KlstoreError

_Init = TypeVar("_Init", bound=Callable[..., None])


def schema_init(init: _Init) -> _Init:
    """Marks a value's own `__init__` as one pydantic does not call when it validates the value
    nested in another, or in `validate` (`model_validate`): those go through the schema alone, so
    their errors keep their key path (`generation.max_new_tokens`) and reach `describe` whole.
    Only an `__init__` that maps its arguments to fields may carry it (the rules live in
    validators, which run either way). The marker is pydantic's own: BaseModel.__init__ has it."""
    init.__pydantic_base_init__ = True  # type: ignore[attr-defined]
    return init


class Value(BaseModel):
    """Base of every validated value: unknown keys, wrong types and non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)
    where: ClassVar[str] = ""  # how the messages of a directly built value name it ("prompt")

    @schema_init
    def __init__(self, /, **data: Any) -> None:
        """A value built directly (`Prompt(...)`): a validation error is a one-line KlstoreError."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise KlstoreError(describe(exc, self.where)) from None


def fail(message: str) -> PydanticCustomError:
    """A rule's own message (used verbatim after the key path)."""
    return PydanticCustomError("klstore", message)


def rule(check, *args):
    """Run a plain check inside a validator: its KlstoreError becomes this key's error."""
    try:
        return check(*args)
    except KlstoreError as exc:
        raise fail(str(exc)) from None


def checked(check, *args):
    """A field's plain check as a validator (`Annotated[str, checked(check_dtype)]`): run after
    the type is checked, its KlstoreError is the key's error (`rule`)."""
    return AfterValidator(lambda value: rule(check, value, *args))


_TYPE_PHRASES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "dataclass_type": "a mapping",
    "finite_number": "a finite number",
}


def _path(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (isinstance(part, str) and ("[" in part or part.startswith(("function-", "union")))):
            out += f".{part}" if out else str(part)
    return out


def _what_of(error: ErrorDetails) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _TYPE_PHRASES:
        return _TYPE_PHRASES[kind]
    if kind == "greater_than_equal":
        bound = ctx["ge"]
        return f"at least {bound}" if isinstance(bound, int) else f">= {bound:g}"
    if kind == "greater_than":
        return f"> {ctx['gt']:g}"
    if kind == "less_than":
        return f"< {ctx['lt']}"
    if kind == "less_than_equal":
        bound = ctx["le"]
        return f"at most {bound}" if isinstance(bound, int) else f"<= {bound:g}"
    if kind == "literal_error":
        return str(ctx.get("expected", "")).replace("'", "")
    return error["msg"][0].lower() + error["msg"][1:]


def describe(exc: ValidationError, where: str, allowed: dict | None = None) -> str:
    """The first validation error as one line: where, key path, what was expected, the value."""
    error = exc.errors(include_url=False)[0]
    key = _path(error["loc"])
    head = f"{where}: {key}" if where and key else (where or key)
    if error["type"] == "klstore":
        message = error["msg"]
        return f"{head} {message}" if message.startswith("must") else (f"{head}: {message}" if head else message)
    if error["type"] == "extra_forbidden":
        parent = re.sub(r"\[\d+\]", "", key).rpartition(".")[0]
        return f"{head}: unknown key" + (f" (allowed: {allowed[parent]})" if allowed and parent in allowed else "")
    if error["type"] == "too_short":
        return f"{head}: empty"
    if error["type"] == "missing":
        return f"{head}: missing (required)"
    return f"{head} must be {_what_of(error)}, got {error.get('input')!r}"


def validate(model: type[Value], data: Any, where: str = "") -> Any:
    """Build `model` from plain data (YAML, JSON, CLI values); errors are KlstoreErrors naming `where`."""
    if not isinstance(data, dict):
        raise KlstoreError(f"{where or model.__name__} must be a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise KlstoreError(describe(exc, where, _allowed_keys(model))) from None


def _allowed_keys(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    """Key path prefix -> the allowed keys there, for 'unknown key' messages."""
    out = {prefix: ", ".join(sorted(k for k, f in model.model_fields.items() if not f.exclude))}
    for name, info in model.model_fields.items():
        inner = getattr(info.annotation, "__args__", (info.annotation,))
        for arg in inner:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out.update(_allowed_keys(arg, f"{prefix}.{name}" if prefix else name))
    return out
