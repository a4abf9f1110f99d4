"""Validated configuration classes: frozen pydantic dataclasses whose bad values raise :class:`InputError`.

Configs are built from user input in many places (CLI flags, flow parameters, JSON spec files, Ray task
arguments, ``dataclasses.replace`` with overrides). Converting pydantic's error in the constructor itself keeps
the project's rule at every one of them: bad input is an ``InputError`` (never retried) whose message names the
field and the fix. They stay dataclasses, so ``dataclasses.replace`` (which validates again), ``asdict`` and
``fields`` keep working.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, StrictInt, ValidationError
from pydantic.dataclasses import dataclass

from mip_core.errors import InputError

T = TypeVar("T")

# The field types configs share. Integers are strict: True, 1.5 or "3" is a mistake, not a count.
Count = Annotated[StrictInt, Field(ge=1)]
Index = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Weight = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]


def config_class(cls: type[T]) -> type[T]:
    """``cls`` as a frozen pydantic dataclass that refuses unknown fields and raises InputError, not
    ValidationError (subclasses of both ValueError)."""
    built: Any = dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
    init: Callable[..., None] = built.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as err:
            raise input_error(built, err) from None

    built.__init__ = __init__
    return built  # type: ignore[no-any-return]


def input_error(cls: type, err: ValidationError) -> InputError:
    """One ``Class.field=value: fix`` clause per problem of ``cls``; of nested problems only the innermost."""
    errors = err.errors(include_url=False)
    locs = [tuple(e["loc"]) for e in errors]
    inner = [e for e, loc in zip(errors, locs, strict=True)
             if not any(other[:len(loc)] == loc and other != loc for other in locs)]
    return InputError("; ".join(_clause(cls, e) for e in inner))


def _clause(cls: type, e: Any) -> str:
    loc = tuple(e["loc"])
    path = cls.__name__ + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    kind = e["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        names = _field_names(cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{path} is not a field{hint}" + (f"; the fields are {names}" if names else "")
    if kind in ("missing", "missing_argument"):
        return f"{path} is missing; give it"
    if kind == "value_error" and not loc:  # a rule over several fields: its message names them
        return str(e["ctx"]["error"])
    msg = str(e["ctx"]["error"]) if kind == "value_error" else e["msg"]
    return f"{path}={e['input']!r}: {msg}"


def _field_names(cls: Any, loc: tuple[Any, ...]) -> list[str]:
    """The fields of the config class found at ``loc`` under ``cls`` (nested configs), or [] where there is none."""
    for part in loc:
        info = getattr(cls, "__pydantic_fields__", {}).get(part)
        cls = info.annotation if info is not None else None
    return sorted(f.name for f in fields(cls)) if is_dataclass(cls) else []


__all__ = ["Count", "Index", "Positive", "Share", "Weight", "config_class", "input_error"]
