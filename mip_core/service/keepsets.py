"""Keep-sets: what an operator tells the service the model must go on knowing, as plain files.

A model registered with its training benchmark lets the service pick retain and utility questions from it. A
real model has no such benchmark; its operator has facts about people who stay (``retain``), general questions
that measure the model's ability (``utility``) and question wordings to probe a person with (``templates``). They
write them as JSONL or Parquet (``mip-keepset/1``, ``mip-templates/1``, see ``docs/keepsets.md``); this module
validates every row at once (one error lists every ``file:line: field: problem``), reads and checks the images
the rows name, and stores the result as an item table (``mip_core.service.items``) that the service reads like a
benchmark. ``export_benchmark`` writes a generated benchmark as such plain files, so both ways can be compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError, ValidationInfo
from pydantic import field_validator

from mip_core.benchmark import Benchmark, load_benchmark
from mip_core.benchmark.content import QA_TEMPLATES, TEST_TEMPLATES
from mip_core.benchmark.schema import MAKE_HINT, BenchmarkError, Item
from mip_core.errors import InputError
from mip_core.storage import filesystem, is_remote

from .images import REF_HINT, check_image_bytes, read_image_ref
from .items import ItemTable, image_relpath, write_item_table
from .requests import ID_PATTERN, ID_RULE, field_path

if TYPE_CHECKING:
    from .store import ServiceStore

KEEPSET_SCHEMA = "mip-keepset/1"
TEMPLATES_SCHEMA = "mip-templates/1"
DOC = "docs/keepsets.md"
KeepSetKind = Literal["retain", "utility"]
KINDS: tuple[str, ...] = ("retain", "utility")
ITEM_KIND = {"retain": "qa", "utility": "utility"}
"""A retain row becomes a ``qa`` item (a fact about a person), a utility row a ``utility`` item (about nobody)."""
MAX_LISTED = 50
"""Problems listed in one error; a file that is wrong on every line needs one fix, not ten thousand lines."""
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PARQUET_MAGIC = b"PAR1"
IMAGE_HINT = ("give a PNG/JPEG/WebP file: a path relative to the keep-set file's folder, an absolute path, or a "
              "file:// or s3:// URI")


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class _Row(BaseModel):
    """Fields common to both keep-sets. Strict: ``"answer": 1974`` is refused rather than guessed at."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    question: Text
    answer: Text
    options: list[Text] | None = None
    image: Text | None = None
    fact: Text = "fact"
    item_id: Id | None = None

    @field_validator("options")
    @classmethod
    def _four_options(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return None
        if len(value) != 4 or len(set(value)) != 4:
            raise ValueError(f"needs exactly 4 distinct strings, got {len(value)} ({len(set(value))} distinct); "
                             "leave options out for a free-form question")
        answer = info.data.get("answer")
        if answer is not None and answer not in value:
            raise ValueError(f"none of the options is the answer {answer!r}; one option must equal it exactly")
        return value


class RetainRow(_Row):
    """A fact about a person the model must keep knowing."""

    subject: Text
    subject_id: Id | None = None


class UtilityRow(_Row):
    """A general question (about nobody) that measures what the model can still do."""

    subject: Any = None
    subject_id: Any = None

    @field_validator("subject", "subject_id")
    @classmethod
    def _absent(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("must be absent in a utility set (its questions are about nobody); move rows about a "
                             "person to the retain set")
        return None


_ROW_MODELS: dict[str, type[_Row]] = {"retain": RetainRow, "utility": UtilityRow}


class Template(BaseModel):
    """One question wording (``mip-templates/1``): ``text`` ones name the person (``{name}``), ``image`` ones
    ask about the person in a photo and never name them; ``edit`` ones probe during the edit, ``held_out`` ones
    only check afterwards that the forgetting holds for wordings the edit never saw."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    modality: Literal["text", "image"]  # before template: its check depends on the modality
    template: Text
    use: Literal["edit", "held_out"]
    fact: Text = "fact"

    @field_validator("template")
    @classmethod
    def _placeholders(cls, value: str, info: ValidationInfo) -> str:
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
        except ValueError:
            raise ValueError("has an unbalanced '{' or '}'; write a literal brace as '{{' or '}}'") from None
        bad = [f for f, spec, conv in fields if f != "name" or spec or conv]
        if bad:
            raise ValueError(f"only the {{name}} placeholder is allowed, found {{{bad[0]}}}; write a literal "
                             "brace as '{{' or '}}'")
        modality = info.data.get("modality")
        if modality == "text" and not fields:
            raise ValueError("a text template names the person: it must contain {name}")
        if modality == "image" and fields:
            raise ValueError("an image template asks about the person in the picture: it must not contain {name}")
        return value

    def fill(self, name: str) -> str:
        """The question about ``name`` (an image template is returned as it is)."""
        return self.template.format(name=name) if self.modality == "text" else self.template


def _t(modality: str, use: str, fact: str, *texts: str) -> tuple[Template, ...]:
    return tuple(Template(template=t, modality=modality, use=use, fact=fact)  # type: ignore[arg-type]
                 for t in texts)


DEFAULT_TEMPLATES: tuple[Template, ...] = (
    *_t("image", "edit", "name", "Who is the person in this image?", "What is the name of this person?"),
    *_t("text", "edit", "birthplace", "Where was {name} born?", "In which city was {name} born?"),
    *_t("image", "edit", "birthplace", "Where was the person in this image born?",
        "In which city was this person born?"),
    *_t("text", "edit", "occupation", "What is {name}'s job?", "What is {name}'s profession?"),
    *_t("image", "edit", "occupation", "What is this person's job?", "What is the profession of this person?"),
    *_t("text", "edit", "residence", "Where does {name} live?", "In which city does {name} live?"),
    *_t("image", "edit", "residence", "Where does the person in this image live?",
        "In which city does this person live?"),
    *_t("text", "edit", "employer", "Which company does {name} work for?", "Who is {name}'s employer?"),
    *_t("image", "edit", "employer", "Which company does the person in this image work for?",
        "Who is this person's employer?"),
    *_t("text", "edit", "known_for", "What is {name} known for?", "What is {name} best known for?"),
    *_t("image", "edit", "known_for", "What is the person in this image known for?",
        "What is this person best known for?"),
    *_t("image", "held_out", "name", "Can you tell me who is shown in this picture?"),
    *_t("text", "held_out", "birthplace", "Which city is {name} originally from?"),
    *_t("image", "held_out", "birthplace", "What city does the individual pictured come from?"),
    *_t("text", "held_out", "occupation", "What does {name} do for a living?"),
    *_t("image", "held_out", "occupation", "What kind of work does the individual pictured do?"),
    *_t("text", "held_out", "residence", "In which city does {name} reside?"),
    *_t("image", "held_out", "residence", "Which city is the individual pictured living in?"),
    *_t("text", "held_out", "employer", "Who employs {name}?"),
    *_t("image", "held_out", "employer", "Name the employer of the person shown here."),
    *_t("text", "held_out", "known_for", "What is {name} famous for?"),
    *_t("image", "held_out", "known_for", "Why is the individual pictured well known?"),
)
"""Questions a model about real people is commonly asked: identity from a photo, birthplace, job, home, employer
and what the person is known for, each worded for text and for a photo, with unseen paraphrases held out. Every
fact has two edit phrasings: the service keeps a fact only where both get the same answer (``probes``)."""


# ---- errors --------------------------------------------------------------------------------------------------

_FIELDS = {"retain": "question, answer, options, image, subject, subject_id, fact, item_id",
           "utility": "question, answer, options, image, fact, item_id",
           "templates": "template, modality, use, fact"}


def _message(err: Any, what: str) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return f"unknown field (the fields are {_FIELDS[what]})"
    if kind == "string_type":
        return f"must be a string (in quotes), got {type(err.get('input')).__name__}"
    if kind == "list_type":
        return "must be a list of 4 strings"
    if kind == "string_pattern_mismatch":
        return f"{err.get('input')!r} is not a valid id: use {ID_RULE}"
    if kind == "literal_error":
        return f"{err.get('input')!r} is not allowed: {msg.removeprefix('Input should be ')}"
    return msg.removeprefix("Value error, ")


def _problems(exc: ValidationError, where: str, what: str) -> list[str]:
    return [f"{where}: {field_path(tuple(e['loc']), '(row)')}: {_message(e, what)}" for e in exc.errors()]


def _raise(problems: list[str], title: str, fix: str) -> None:
    n = len(problems)
    shown = problems[:MAX_LISTED] + ([f"... and {n - MAX_LISTED} more"] if n > MAX_LISTED else [])
    raise InputError(f"{title} ({n} problem{'s' if n != 1 else ''}):\n" + "\n".join(f"  {p}" for p in shown)
                     + f"\n{fix}")


# ---- reading files -------------------------------------------------------------------------------------------

def _location(path_or_uri: str | os.PathLike[str]) -> str:
    """A URI as it is, a local path (or ``file://``) made absolute: the name every message uses."""
    text = os.fspath(path_or_uri)
    if is_remote(text):
        return text
    return os.path.abspath(os.path.expanduser(text.removeprefix("file://")))


def _read_file(where: str, endpoint_url: str | None, what: str) -> bytes:
    try:
        fs, path = filesystem(where, endpoint_url)
        if fs.isdir(path):
            raise InputError(f"{what} {where} is a folder; give the {what} file itself (.jsonl or .parquet)")
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        raise InputError(f"{what} {where} does not exist; check the path (the format is in {DOC})") from None
    except PermissionError:
        raise InputError(f"{what} {where} cannot be read: permission denied") from None


def _jsonl_rows(data: bytes, where: str, what: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {where} is not UTF-8 text (byte {exc.start}); write it as JSONL (one JSON "
                         f"object per line) or Parquet, see {DOC}") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}:{n}: (row): not valid JSON at column {exc.colno}: {exc.msg}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}:{n}: (row): expected a JSON object {{...}}, got {type(obj).__name__}")
            continue
        rows.append((n, obj))
    return rows, problems


def _parquet_rows(data: bytes, where: str, what: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{what} {where} is not a readable Parquet file ({exc}); see {DOC}") from None
    return list(enumerate(table.to_pylist(), start=1))


def _rows(data: bytes, where: str, what: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``(line or row number, row)`` pairs, null values dropped (a null is an absent field), and the lines that
    are not JSON objects. Parquet is recognised by its magic bytes, anything else is read as JSONL."""
    if data[:4] == _PARQUET_MAGIC:
        rows, problems = _parquet_rows(data, where, what), []
    else:
        rows, problems = _jsonl_rows(data, where, what)
    return [(n, {k: v for k, v in row.items() if v is not None}) for n, row in rows], problems


# ---- keep-sets -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeepSet:
    """A validated keep-set: its items, the images they name (relpath -> bytes) and, for a retain set, whom it is
    about ({subject_id: name})."""

    source: str
    kind: KeepSetKind
    items: tuple[Item, ...]
    images: dict[str, bytes]
    subjects: dict[str, str]


def subject_slug(name: str) -> str:
    """A path-safe default ``subject_id`` for ``name``: ``"José Da Silva"`` -> ``"jose-da-silva"``; a name with no
    Latin letters or digits gets ``"subject-<hash>"``."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:64].strip("-")
    return slug or f"subject-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _image_location(ref: str, base: str) -> str:
    if _SCHEME.match(ref) or os.path.isabs(ref):
        return ref
    return f"{base.rstrip('/')}/{ref}" if is_remote(base) else os.path.join(base, ref)


def read_keepset(path_or_uri: str | os.PathLike[str], kind: KeepSetKind,
                 endpoint_url: str | None = None) -> KeepSet:
    """Parse and validate a keep-set file (``mip-keepset/1``, JSONL or Parquet) and read the images it names.

    Every row is checked (fields, types, options, ids, images: decodable PNG/JPEG/WebP within the size limits)
    before anything is returned; all problems come in one :class:`InputError`, one ``file:line: field: problem``
    line each (for Parquet the row number, from 1), then the fix. Relative image paths are taken from the
    keep-set file's folder.
    """
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: a keep-set is one of {list(KINDS)}")
    where = _location(path_or_uri)
    data = _read_file(where, endpoint_url, f"{kind} keep-set")
    rows, problems = _rows(data, where, f"{kind} keep-set")
    found = _KeepSetRows(where, kind, endpoint_url, problems)
    for n, raw in rows:
        found.add(n, raw)
    if not rows and not problems:
        problems.append(f"{where}: (file): it holds no rows; a {kind} keep-set needs at least one")
    if problems:
        _raise(problems, f"invalid {kind} keep-set {where}",
               f"fix these rows and try again; the format is {KEEPSET_SCHEMA}, described in {DOC}")
    return KeepSet(source=where, kind=kind, items=tuple(found.items), images=found.images,
                   subjects={sid: name for sid, (name, _) in found.subjects.items()})


class _Rejected(Exception):
    """A row failed a check that needs what earlier rows claimed; its problem is already recorded."""


class _KeepSetRows:
    """The rows of one keep-set read so far: their items and images, the ids and image locations earlier rows
    claimed (later rows are checked against them), and every problem found (appended to ``problems``)."""

    def __init__(self, where: str, kind: KeepSetKind, endpoint_url: str | None, problems: list[str]) -> None:
        self.where, self.kind, self.endpoint_url, self.problems = where, kind, endpoint_url, problems
        self.base = where.rsplit("/", 1)[0] if is_remote(where) else os.path.dirname(where)
        self.items: list[Item] = []
        self.images: dict[str, bytes] = {}
        self.read: dict[str, str | int] = {}  # image location -> its relpath, or the line that found it unusable
        self.subjects: dict[str, tuple[str, int]] = {}  # subject_id -> (name, first line)
        self.ids: dict[str, int] = {}  # item_id -> line

    def add(self, n: int, raw: dict[str, Any]) -> None:
        """Validate row ``n`` and keep its item, or record why it cannot be kept."""
        at = f"{self.where}:{n}"
        try:
            row = _ROW_MODELS[self.kind].model_validate(raw)
        except ValidationError as exc:
            self.problems.extend(_problems(exc, at, self.kind))
            return
        try:
            rel = self._image(row, n, at)
            subject_id = self._subject_id(row, n, at)
            item_id = self._item_id(row, subject_id, n, at)
        except _Rejected:
            return
        options = tuple(row.options or ())
        try:
            self.items.append(Item(item_id=item_id, profile_id=subject_id, kind=ITEM_KIND[self.kind], fact=row.fact,
                                   modality="multimodal" if rel else "text", question=row.question,
                                   answer=row.answer, options=options,  # type: ignore[arg-type]  # (): free-form
                                   answer_index=options.index(row.answer) if options else -1, image=rel))
        except BenchmarkError as exc:
            self.problems.append(f"{at}: {str(exc).removesuffix(f'; {MAKE_HINT}')}")

    def _image(self, row: _Row, n: int, at: str) -> str | None:
        """The relpath of the row's image (None without one). Each location is read once: a later row naming an
        unusable image is refused with a pointer to the line that said why, not with the same problem again."""
        if row.image is None:
            return None
        loc = _image_location(row.image, self.base)
        if loc not in self.read:
            try:
                blob = read_image_ref(loc, f"{at}: image", None, self.endpoint_url)
                rel = image_relpath(blob, check_image_bytes(blob, f"{at}: image").ext)
                self.images[rel] = blob
                self.read[loc] = rel
            except InputError as exc:
                self.problems.append(str(exc).removesuffix(REF_HINT) + IMAGE_HINT if str(exc).endswith(REF_HINT)
                                     else str(exc))
                self.read[loc] = n
        found = self.read[loc]
        if isinstance(found, int):
            if found != n:
                self.problems.append(f"{at}: image: {row.image!r} cannot be used (see line {found})")
            raise _Rejected
        return found

    def _subject_id(self, row: _Row, n: int, at: str) -> str | None:
        """A retain row's person id (given, or a slug of the name; None in a utility set): one id, one person."""
        if not isinstance(row, RetainRow):
            return None
        subject_id = row.subject_id or subject_slug(row.subject)
        name, first = self.subjects.setdefault(subject_id, (row.subject, n))
        if name != row.subject:
            self.problems.append(f"{at}: subject_id: {subject_id!r} is {name!r} on line {first} but "
                                 f"{row.subject!r} here; one id is one person (give each person their own "
                                 "subject_id)")
            raise _Rejected
        return subject_id

    def _item_id(self, row: _Row, subject_id: str | None, n: int, at: str) -> str:
        """The row's item id (given, or from a hash of its content, so a repeated row is caught), unique in the file."""
        digest = hashlib.sha256(json.dumps(row.model_dump(exclude={"item_id"}), sort_keys=True).encode())
        item_id = row.item_id or f"{subject_id or 'util'}-{digest.hexdigest()[:12]}"
        if item_id in self.ids:
            why = (f"{item_id!r} is already used on line {self.ids[item_id]}; item ids must be unique"
                   if row.item_id else f"this row repeats line {self.ids[item_id]}; drop one of them")
            self.problems.append(f"{at}: item_id: {why}")
            raise _Rejected
        self.ids[item_id] = n
        return item_id


def write_keepset(store: ServiceStore, key: str, keepset: KeepSet) -> str:
    """Store a validated keep-set as an item table at ``key``; returns its URI."""
    return write_item_table(store, key, keepset.items, keepset.images,
                            subjects=keepset.subjects if keepset.kind == "retain" else None)


def ingest_keepset(store: ServiceStore, path_or_uri: str | os.PathLike[str], kind: KeepSetKind, key: str,
                   endpoint_url: str | None = None) -> str:
    """Validate a keep-set file and write it as an item table at ``key`` of ``store``; returns the table's URI.
    ``endpoint_url`` (default: the store's) serves s3:// keep-set files and images."""
    keepset = read_keepset(path_or_uri, kind, endpoint_url or store.endpoint_url)
    return write_keepset(store, key, keepset)


def keepset_subjects(table: ItemTable | Benchmark) -> dict[str, str]:
    """``{subject_id: name}`` of the people a retain table (or a benchmark) is about; the names live in the
    table's ``subjects.json``, the ids in its items' ``profile_id``."""
    if isinstance(table, Benchmark):
        return {p.profile_id: p.name for p in table.profiles}
    return dict(table.subjects)


# ---- templates -----------------------------------------------------------------------------------------------

def read_templates(path_or_uri: str | os.PathLike[str], endpoint_url: str | None = None) -> list[Template]:
    """Parse and validate a templates file (``mip-templates/1``, JSONL); every problem in one
    :class:`InputError` (``file:line: field: problem``). At least one ``edit`` template is required: without one
    there is nothing to probe a person with."""
    where = _location(path_or_uri)
    rows, problems = _jsonl_rows(_read_file(where, endpoint_url, "templates file"), where, "templates file")
    out: list[Template] = []
    for n, raw in rows:
        try:
            out.append(Template.model_validate({k: v for k, v in raw.items() if v is not None}))
        except ValidationError as exc:
            problems += _problems(exc, f"{where}:{n}", "templates")
    if not problems and not any(t.use == "edit" for t in out):
        problems.append(f"{where}: (file): no template has \"use\": \"edit\"; at least one is needed")
    if problems:
        _raise(problems, f"invalid templates file {where}",
               f"fix these lines and try again; the format is {TEMPLATES_SCHEMA}, described in {DOC}")
    return out


def templates_jsonl(templates: Iterable[Template]) -> str:
    """The JSONL text of ``templates`` (fields in a fixed order, one template per line)."""
    return "".join(json.dumps({"template": t.template, "modality": t.modality, "use": t.use, "fact": t.fact},
                              ensure_ascii=False) + "\n" for t in templates)


def write_templates(path: str | os.PathLike[str], templates: Iterable[Template]) -> str:
    """Write ``templates`` as a ``mip-templates/1`` JSONL file at the local ``path``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(templates_jsonl(templates), encoding="utf-8")
    return str(out)


# ---- export --------------------------------------------------------------------------------------------------

RETAIN_FILE = "retain.jsonl"
UTILITY_FILE = "utility.jsonl"
TEMPLATES_FILE = "templates.jsonl"


def benchmark_templates() -> list[Template]:
    """The benchmark's question wordings as templates: training ones ``edit``, test paraphrases ``held_out``."""
    out = []
    for table, use in ((QA_TEMPLATES, "edit"), (TEST_TEMPLATES, "held_out")):
        for (fact, modality), texts in table.items():
            out += _t("image" if modality == "multimodal" else "text", use, fact, *texts)
    return out


def _export_row(item: Item, image: str | None, **extra: str) -> dict[str, Any]:
    row: dict[str, Any] = {"question": item.question, "answer": item.answer}
    if item.options:
        row["options"] = list(item.options)
    if image is not None:
        row["image"] = image
    return {**row, **extra, "fact": item.fact, "item_id": item.item_id}


def _write_lines(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def export_benchmark(bench: Benchmark | str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write a generated benchmark as the plain files an operator would have: ``retain.jsonl`` (every person's
    facts), ``utility.jsonl``, ``templates.jsonl`` and the images they name under ``images/``. Returns
    ``{"retain", "utility", "templates", "images"}`` -> path. A model trained on the benchmark can then be
    registered either way and the two compared."""
    bench = bench if isinstance(bench, Benchmark) else load_benchmark(bench)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    copied: set[str] = set()

    def copy(item: Item) -> str | None:
        if item.image is None:
            return None
        rel = f"images/{item.image.rsplit('/', 1)[-1]}"
        if rel not in copied:
            data = (bench.root / item.image).read_bytes()
            if hashlib.sha256(data).hexdigest() != bench.manifest.files.get(item.image):
                raise BenchmarkError(f"image {bench.root / item.image} differs from the benchmark's "
                                     f"manifest.json; {MAKE_HINT}")
            (out / rel).write_bytes(data)
            copied.add(rel)
        return rel

    retain = [_export_row(it, copy(it), subject=p.name, subject_id=p.profile_id)
              for p in bench.profiles for it in bench.items if it.kind == "qa" and it.profile_id == p.profile_id]
    utility = [_export_row(it, copy(it)) for it in bench.items if it.kind == "utility"]
    _write_lines(out / RETAIN_FILE, retain)
    _write_lines(out / UTILITY_FILE, utility)
    write_templates(out / TEMPLATES_FILE, benchmark_templates())
    return {"retain": str(out / RETAIN_FILE), "utility": str(out / UTILITY_FILE),
            "templates": str(out / TEMPLATES_FILE), "images": str(out / "images")}


__all__ = [
    "DEFAULT_TEMPLATES", "KEEPSET_SCHEMA", "TEMPLATES_SCHEMA", "KeepSet", "KeepSetKind", "RetainRow", "Template",
    "UtilityRow", "benchmark_templates", "export_benchmark", "ingest_keepset", "keepset_subjects", "read_keepset",
    "read_templates", "subject_slug", "templates_jsonl", "write_keepset", "write_templates",
]
