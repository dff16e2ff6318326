"""Fuzz the gate: any mutation of a real archive either passes or is one of our 4xx errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import ServiceError
from app.validation.gate import admit_upload
from app.validation.limits import ArchiveLimits
from tests.factories import members_of, zip_bytes

FUZZ = settings(max_examples=60, deadline=3000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
LIMITS = ArchiveLimits(max_member_bytes=16 << 20, max_total_bytes=32 << 20)
ENUM_SPEC = json.dumps([1, {"type": "builtins.tuple", "children_spec": [], "context": json.dumps(
    {"__enum__": True, "fqn": "os:system", "name": "x"})}])
NASTY = st.one_of(
    st.sampled_from(["__import__('os').system('x')", "", "a" * 5000, "\x00", "../..",
                     "torch.os.system", "Symbol('s0')", "L['x'].size()[0]", "NaN",
                     '"); abort(); //', "a\u202eb", ENUM_SPEC,
                     "torch.ops.aten._unsafe_index.Tensor",
                     "Pow(Integer(10), Integer(18446744073709551615))", "Rational('1e999999999')",
                     "poids_é", "layer-1.weight"]),
    st.sampled_from([10**30, -(10**30), {"__enum__": True, "fqn": "os:system", "name": "x"}]),
    st.integers(min_value=-(1 << 70), max_value=1 << 70), st.none(), st.booleans(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.none(),
                                                          max_size=2), st.text(max_size=30),
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Three real archives, exported here: the session `programs` fixture exports every
    model in a child process, seconds this tier need not spend."""
    pytest.importorskip("torch")
    from tests import models

    out = tmp_path_factory.mktemp("fuzz_bases")
    return [models.save_model(name, out / f"{name}.pt2").read_bytes()
            for name in ("linear", "dynamic", "dict_io")]


def _admit(data: bytes, tmp_path: Path) -> None:
    src, dest = tmp_path / "in.pt2", tmp_path / "out.pt2"
    src.write_bytes(data)
    dest.unlink(missing_ok=True)
    try:
        admit_upload(src, dest, LIMITS)
    except ServiceError as exc:
        assert 400 <= exc.status < 500, exc.message
        assert not dest.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("in.pt2", "out.pt2")]
    assert leftovers == []


@FUZZ
@given(data=st.data())
def test_byte_mutations(bases: list[bytes], tmp_path: Path, data: st.DataObject) -> None:
    blob = bytearray(data.draw(st.sampled_from(bases)))
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    _admit(bytes(blob), tmp_path)


@FUZZ
@given(data=st.data())
def test_member_mutations(bases: list[bytes], tmp_path: Path, data: st.DataObject) -> None:
    members = members_of(data.draw(st.sampled_from(bases)))
    name = data.draw(st.sampled_from(sorted(members)))
    action = data.draw(st.sampled_from(["drop", "replace", "rename", "flip", "add"]))
    if action == "drop":
        members.pop(name)
    elif action == "replace":
        members[name] = data.draw(st.binary(max_size=256))
    elif action == "rename":
        members[data.draw(st.text(min_size=1, max_size=40))] = members.pop(name)
    elif action == "flip" and members[name]:
        payload = bytearray(members[name])
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] ^= data.draw(st.integers(1, 255))
        members[name] = bytes(payload)
    else:
        root = name.split("/", 1)[0]
        members[f"{root}/{data.draw(st.text(min_size=1, max_size=30))}"] = b"x"
    try:
        blob = zip_bytes(members)
    except (ValueError, UnicodeEncodeError):
        return  # names zipfile itself cannot write
    _admit(blob, tmp_path)


def _set_somewhere(doc: Any, data: st.DataObject, value: Any) -> None:
    node = doc
    for _ in range(data.draw(st.integers(0, 12))):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            if not isinstance(node[key], (dict, list)) or data.draw(st.booleans()):
                node[key] = value
                return
            node = node[key]
        elif isinstance(node, list) and node:
            node = node[data.draw(st.integers(0, len(node) - 1))]
        else:
            return


@FUZZ
@given(data=st.data())
def test_json_mutations(bases: list[bytes], tmp_path: Path, data: st.DataObject) -> None:
    members = members_of(data.draw(st.sampled_from(bases)))
    name = data.draw(st.sampled_from(sorted(n for n in members if n.endswith(".json"))))
    doc = json.loads(members[name])
    for _ in range(data.draw(st.integers(1, 3))):
        # A copy: NASTY's sampled dict is one object, and a later mutation descending into
        # it would change the strategy itself (hypothesis: FlakyStrategyDefinition).
        _set_somewhere(doc, data, copy.deepcopy(data.draw(NASTY)))
    members[name] = json.dumps(doc).encode()
    _admit(zip_bytes(members), tmp_path)


@FUZZ
@given(data=st.data())
def test_pickle_mutations(bases: list[bytes], tmp_path: Path, data: st.DataObject) -> None:
    members = members_of(data.draw(st.sampled_from(bases)))
    outer = next(n for n in members if "/data/sample_inputs/" in n)
    inner = members_of(members[outer])
    pkl = next(n for n in inner if n.endswith("data.pkl"))
    payload = bytearray(inner[pkl])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        if data.draw(st.booleans()):
            payload[at] = data.draw(st.integers(0, 255))
        else:
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    inner[pkl] = bytes(payload)
    members[outer] = zip_bytes(inner)
    _admit(zip_bytes(members), tmp_path)
