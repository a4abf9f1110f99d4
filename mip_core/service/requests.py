"""Forget requests: the one schema every way in (CLI, API, queue file) is validated against.

A request names *whom* to forget (``subjects``: a person by name, with optional aliases, photos and known facts;
or, as a convenience for models registered with their training benchmark, a profile id of it) and/or *which
facts* (``items``: an item id, or a question the model is asked). Ids double as storage keys, so they are
restricted to a path-safe alphabet. Validation errors are collected per field, so a requester fixes everything in one
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
    Discriminator,
    Field,
    StringConstraints,
    Tag,
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
MAX_PER_PERSON = 20
"""Aliases, photos and known facts per person: a handful identifies someone; hundreds is a dataset, not a request."""
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


class KnownFact(BaseModel):
    """Something the model is known to say about the person: edited like a probe, whatever the model answers."""

    model_config = ConfigDict(extra="forbid", title="KnownFact")

    question: Text = Field(description="a question about the person, e.g. 'Where does Jane Doe live?'")
    answer: Text = Field(description="the answer the model gives and must stop giving, e.g. 'Lisbon'")


class Person(BaseModel):
    """A person to forget, as a requester knows them: a name, perhaps other names, photos and known facts.

    The service builds its own probes from these (the model's registered question templates, answered by the
    model itself), so nothing about the person needs to be in any dataset."""

    model_config = ConfigDict(extra="forbid", title="Person")

    name: Name = Field(description="the person's name as the model would know it, e.g. 'Jane Doe'")
    aliases: list[Name] = Field(default_factory=list, max_length=MAX_PER_PERSON,
                                description="other names of the person (asked about as held-out probes)")
    photos: list[Text] = Field(default_factory=list, max_length=MAX_PER_PERSON,
                               description="photos of the person: image files (path, file:// or s3:// URI; PNG, "
                                           "JPEG or WebP, at most 10 MiB and 4096x4096 pixels), copied into the "
                                           "store at submit")
    facts: list[KnownFact] = Field(default_factory=list, max_length=MAX_PER_PERSON,
                                   description="facts the model is known to state about the person")


def _subject_kind(value: Any) -> str:
    return "id" if isinstance(value, str) else "person"


Subject = Annotated[Annotated[Id, Tag("id")] | Annotated[Person, Tag("person")], Discriminator(_subject_kind)]
"""A plain string is a profile id of the model's registered benchmark (the demo's convenience); an object is a
person."""


def norm_text(text: str) -> str:
    """``text`` with runs of whitespace collapsed, casefolded: how names and questions are compared."""
    return " ".join(text.split()).casefold()


def subject_key(subject: Id | Person) -> str:
    """What makes two subjects the same: the id, or the normalised name."""
    return subject if isinstance(subject, str) else "name:" + norm_text(subject.name)


def subject_label(subject: Id | Person) -> str:
    return subject if isinstance(subject, str) else subject.name


class ForgetRequest(BaseModel):
    """A request to make ``target_model`` forget ``subjects`` (entities) and/or ``items`` (facts)."""

    model_config = ConfigDict(extra="forbid", title="ForgetRequest")

    request_id: Id = Field(default_factory=new_request_id, description="unique id; generated when omitted. "
                           + ID_RULE)
    target_model: Id = Field(description="registered model name to edit. " + ID_RULE)
    target_version: Id | None = Field(default=None, description="the published version the data was seen in, "
                                      "e.g. 'v0002' (must exist; default: the current one). The edit always "
                                      "applies to the model's current version, which descends from it")
    subjects: list[Subject] = Field(default_factory=list, max_length=MAX_SUBJECTS,
                                    description="people to forget: each a person object (`name`, optional "
                                                "`aliases`, `photos`, `facts`), or the profile id of a model "
                                                "registered with its benchmark (e.g. 'p0003')")
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
        dups = sorted(s.removeprefix("name:") for s, n in Counter(map(subject_key, self.subjects)).items() if n > 1)
        if dups:
            raise ValueError(f"duplicate subjects {dups}: list each person once")
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
    held_back_in: list[str] = Field(default_factory=list, description="batches whose gate held this request back "
                                    "together with others, before it was retried in a smaller batch")

    @property
    def request_id(self) -> str:
        return self.request.request_id


_UNION_TAGS = ("id", "person")
"""Pydantic puts the chosen member's tag in an error's location (``subjects[0].person.name``): dropped."""


def field_path(loc: tuple[Any, ...], empty: str = "(request)") -> str:
    """A pydantic error location as a field path, ``subjects[0].photos[1]``; ``empty`` for the whole object."""
    out = ""
    for k, part in enumerate(loc):
        if part in _UNION_TAGS and k > 0 and isinstance(loc[k - 1], int):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or empty


def _message(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} is not a valid id: use {ID_RULE}"
    if kind == "model_attributes_type" and "Person" in msg or kind == "model_type":
        return "a subject is a profile id (a string) or a person object {\"name\": ..., \"photos\": [...]}"
    if kind == "extra_forbidden":
        return "unknown field (check the spelling against the schema)"
    if kind == "missing":
        return "required field is missing"
    return msg.removeprefix("Value error, ")


def format_validation_error(exc: ValidationError, *, what: str = "forget request") -> str:
    """One ``field.path: reason`` line per problem, then how to fix it."""
    lines = [f"  {field_path(tuple(e['loc']))}: {_message(e)}" for e in exc.errors()]
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
    "ID_PATTERN", "MAX_ITEMS", "MAX_PER_PERSON", "MAX_REQUEST_BYTES", "MAX_SUBJECTS", "REASONS", "SCHEMA_FILE",
    "STATES", "ForgetItem", "ForgetRequest", "KnownFact", "Person", "RequestRecord", "RequestState", "Subject",
    "check_request_size", "field_path", "format_validation_error", "iso_utc", "new_request_id", "parse_request",
    "norm_text", "request_json_schema", "schema_text", "subject_key", "subject_label", "utc_now",
]
