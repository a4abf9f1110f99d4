"""Forget requests: the one schema every way in (CLI, API, queue file) is validated against.

A request names *whom* to forget (``subjects``: entity ids, i.e. benchmark profile ids) and/or *which facts*
(``items``: an item id, or a question the model is asked). Ids double as storage keys, so they are restricted
to a path-safe alphabet. Validation errors are collected per field, so a requester fixes everything in one
round.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from mip_core import names
from mip_core.errors import InputError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""Request ids, model names, entity ids: 1-128 chars, no '/' or whitespace: safe as storage keys."""
ID_RULE = ("1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit "
           "(it is a storage key: no '/', no spaces)")
MAX_SUBJECTS = 1000
MAX_ITEMS = 1000
MAX_REQUEST_BYTES = 1 << 20
"""A request is a list of ids and short questions: a megabyte of JSON is a mistake (or an attack), not a request."""
REASONS = ("privacy", "right_to_be_forgotten", "copyright", "toxicity", "other")
SCHEMA_FILE = "schemas/forget_request.schema.json"
SCHEMA_HINT = f"the schema is {SCHEMA_FILE} (`mip schema request` prints it)"

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000)]
RequestState = Literal["pending", "claimed", "done", "failed", "rejected"]
STATES: tuple[str, ...] = names.STATES
"""Terminal: ``done`` (a published version no longer knows it), ``failed`` (processing or the gate fell short: it
may be resubmitted as is), ``rejected`` (the request itself cannot be served, e.g. unknown entity ids: fix it)."""


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:12]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso_utc(t: datetime) -> str:
    """``2026-11-29T03:55:28.062342Z``: how the store writes timestamps."""
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class ForgetItem(BaseModel):
    """One fact to forget: a dataset item id, or the question (plus optional answer/image to disambiguate).

    Multimodal questions ("Where was this person born?") are shared by every profile; ``image`` (a dataset
    image name such as ``images/p0003.png``) or ``answer`` then picks the one meant.
    """

    model_config = ConfigDict(extra="forbid", title="ForgetItem")

    item_id: Name | None = Field(default=None, description="dataset item id, e.g. 'p0003-birthplace-text-qa'")
    question: Text | None = Field(default=None, description="the question whose answer must be forgotten")
    answer: Text | None = Field(default=None, description="the answer to forget (disambiguates a question)")
    image: Text | None = Field(default=None, description="disambiguates a question: an image file (path, "
                                                         "file:// or s3:// URI; PNG, JPEG or WebP, at most 10 "
                                                         "MiB and 4096x4096 pixels; copied into the store at "
                                                         "submit and matched by its pixels, not its name) or a "
                                                         "dataset image name, e.g. 'images/p0003.png'")

    @model_validator(mode="after")
    def _needs_id_or_question(self) -> ForgetItem:
        if self.item_id is None and self.question is None:
            raise ValueError("give `item_id` or `question`")
        return self


class ForgetRequest(BaseModel):
    """A request to make ``target_model`` forget ``subjects`` (entities) and/or ``items`` (facts)."""

    model_config = ConfigDict(extra="forbid", title="ForgetRequest")

    request_id: Id = Field(default_factory=new_request_id, description="unique id; generated when omitted. "
                           + ID_RULE)
    target_model: Id = Field(description="registered model name to edit. " + ID_RULE)
    target_version: Id | None = Field(default=None, description="the published version the data was seen in, "
                                      "e.g. 'v0002' (must exist; default: the current one). The edit always "
                                      "applies to the model's current version, which descends from it")
    subjects: list[Id] = Field(default_factory=list, max_length=MAX_SUBJECTS,
                               description="entity ids (benchmark profile ids, e.g. 'p0003'): forget all "
                                           "their facts")
    items: list[ForgetItem] = Field(default_factory=list, max_length=MAX_ITEMS,
                                    description="individual facts to forget")
    requester: Name = Field(description="who asked (person or system), for the audit trail")
    reason: Literal["privacy", "right_to_be_forgotten", "copyright", "toxicity", "other"] = Field(
        description="why the data must be forgotten")
    note: Annotated[str, StringConstraints(max_length=4000)] | None = Field(default=None,
                                                                           description="free text")
    created_at: AwareDatetime = Field(default_factory=utc_now,
                                      description="ISO 8601 with a timezone; default: now (UTC)")

    @model_validator(mode="after")
    def _check_forget_set(self) -> ForgetRequest:
        if not self.subjects and not self.items:
            raise ValueError("the forget set is empty: give `subjects` (entity ids) or `items`")
        dups = sorted(s for s, n in Counter(self.subjects).items() if n > 1)
        if dups:
            raise ValueError(f"duplicate subjects {dups}: list each entity once")
        return self


class RequestRecord(BaseModel):
    """A request plus its place in the queue; stored as ``requests/<state>/<request_id>.json``."""

    model_config = ConfigDict(extra="forbid", title="RequestRecord")

    request: ForgetRequest
    state: RequestState = "pending"
    submitted_at: AwareDatetime = Field(default_factory=utc_now)
    claimed_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    batch_id: str | None = None
    reason: str | None = Field(default=None, description="why it failed or was rejected")
    model_version: str | None = Field(default=None, description="the model version that no longer knows it")
    report_uri: str | None = None
    metrics: dict[str, float] | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(request)"


def _message(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} is not a valid id: use {ID_RULE}"
    if kind == "extra_forbidden":
        return "unknown field (check the spelling against the schema)"
    if kind == "missing":
        return "required field is missing"
    return msg.removeprefix("Value error, ")


def format_validation_error(exc: ValidationError, *, what: str = "forget request") -> str:
    """One ``field.path: reason`` line per problem, then how to fix it."""
    lines = [f"  {_loc(tuple(e['loc']))}: {_message(e)}" for e in exc.errors()]
    return (f"invalid {what} ({len(lines)} problem{'s' if len(lines) != 1 else ''}):\n" + "\n".join(lines)
            + f"\nfix these fields and submit again; {SCHEMA_HINT}")


def check_request_size(nbytes: int) -> None:
    if nbytes > MAX_REQUEST_BYTES:
        raise InputError(f"invalid forget request: {nbytes:,} bytes is over the {MAX_REQUEST_BYTES:,}-byte limit; "
                         f"split it into several requests (at most {MAX_SUBJECTS} subjects and {MAX_ITEMS} items "
                         "each)")


def parse_request(text: str) -> ForgetRequest:
    """Validate a JSON forget request; :class:`InputError` lists every bad field and the fix."""
    check_request_size(len(text.encode("utf-8", "surrogatepass")))  # before parsing: a huge body costs memory
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid forget request: not valid JSON at line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg}; send one JSON object, {SCHEMA_HINT}") from None
    if not isinstance(data, dict):
        raise InputError(f"invalid forget request: expected a JSON object, got {type(data).__name__}; "
                         f"{SCHEMA_HINT}")
    try:
        return ForgetRequest.model_validate(data)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc)) from None


def request_json_schema() -> dict[str, Any]:
    """JSON Schema of :class:`ForgetRequest` (committed as ``schemas/forget_request.schema.json``)."""
    schema = ForgetRequest.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "forget_request.schema.json",
            **schema}


def schema_text() -> str:
    """The committed schema file's exact text."""
    return json.dumps(request_json_schema(), indent=2, sort_keys=True) + "\n"


__all__ = [
    "ID_PATTERN", "MAX_ITEMS", "MAX_REQUEST_BYTES", "MAX_SUBJECTS", "REASONS", "SCHEMA_FILE", "STATES", "ForgetItem",
    "ForgetRequest", "RequestRecord", "RequestState", "check_request_size", "format_validation_error", "iso_utc", "new_request_id",
    "parse_request", "request_json_schema", "schema_text", "utc_now",
]
