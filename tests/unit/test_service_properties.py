"""Property-based tests (hypothesis) of the forget-request schema and of the storage-key builders.

Two promises are checked over generated input rather than hand-picked cases: every request the schema accepts
survives the JSON round trip through the queue unchanged, and no id or key, however odd, can address a file
outside the store's root.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mip_core.errors import InputError
from mip_core.service.requests import ID_PATTERN, REASONS, ForgetRequest, RequestRecord, parse_request
from mip_core.service.store import ServiceStore, check_id

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.from_regex(ID_PATTERN, fullmatch=True)
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)
items = st.builds(lambda item_id, question, answer: {k: v for k, v in (("item_id", item_id), ("question", question),
                                                                        ("answer", answer)) if v is not None},
                  st.one_of(st.none(), texts), texts, st.one_of(st.none(), texts))
requests = st.fixed_dictionaries(
    {"request_id": ids, "target_model": ids, "requester": texts, "reason": st.sampled_from(REASONS)},
    optional={"subjects": st.lists(ids, max_size=5, unique=True), "items": st.lists(items, max_size=3),
              "note": texts, "target_version": ids},
).filter(lambda d: d.get("subjects") or d.get("items"))


@PROPERTY
@given(requests)
def test_valid_requests_round_trip_through_the_queue(data):
    request = parse_request(json.dumps(data))
    assert request.request_id == data["request_id"] and request.subjects == data.get("subjects", [])
    again = parse_request(request.model_dump_json())
    assert again == request
    record = RequestRecord(request=request)
    assert RequestRecord.model_validate_json(record.model_dump_json()) == record


@PROPERTY
@given(requests, st.text(max_size=30).filter(lambda s: not re.fullmatch(ID_PATTERN, s)))
def test_bad_request_ids_are_rejected_by_name(data, bad_id):
    with pytest.raises(InputError, match=r"request_id: .*(not a valid id|should be a valid string)"):
        parse_request(json.dumps({**data, "request_id": bad_id}))
    with pytest.raises(InputError, match=r"target_version: .*(not a valid id|should be a valid string)"):
        parse_request(json.dumps({**data, "target_version": bad_id}))


@PROPERTY
@given(requests, st.text(min_size=1, max_size=20).filter(lambda k: k not in ForgetRequest.model_fields))
def test_unknown_fields_are_rejected_by_name(data, key):
    with pytest.raises(InputError, match="unknown field"):
        parse_request(json.dumps({**data, key: 1}))


@PROPERTY
@given(st.text(max_size=40))
@example("0\n")  # found by this test: `$` also matches before a final newline, so ids need a full match
def test_ids_are_path_safe_or_rejected(value):
    try:
        check_id(value, "request_id")
    except InputError as exc:
        assert "request_id=" in str(exc) and "no '/'" in str(exc)
        return
    assert "/" not in value and "\\" not in value and value not in (".", "..") and not value.startswith(".")
    assert value == value.strip() and 1 <= len(value) <= 128


@PROPERTY
@given(key=st.lists(st.text(max_size=12), min_size=1, max_size=5).map("/".join))
def test_no_key_escapes_the_root(tmp_path, key):
    store = ServiceStore(str(tmp_path / "root"))
    try:
        path = store.uri(key)
    except InputError as exc:
        assert "may not contain" in str(exc)
        return
    resolved = os.path.normpath(path)
    assert resolved == store.root or resolved.startswith(store.root + os.sep)


@PROPERTY
@given(batch_id=st.text(max_size=30), part=st.text(max_size=20))
def test_batch_keys_stay_in_their_batch(tmp_path, batch_id, part):
    store = ServiceStore(str(tmp_path / "root"))
    try:
        key = store.batch_key(batch_id, part)
        path = os.path.normpath(store.uri(key))
    except InputError:
        return
    assert path.startswith(os.path.join(store.root, "batches", batch_id))
