"""The upload gate: hostile archives are refused without running anything; real ones pass.

Every hostile payload would only create a marker file if torch (or pickle, or sympy)
ran it; each test checks the refusal's class, code and member name, and that the
marker was never created.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from app.errors import PayloadTooLarge, ServiceError, Unprocessable, UnsupportedMediaType
from app.validation.gate import admit_upload
from app.validation.limits import ArchiveLimits
from tests.factories import evil_pickle, members_of, zip_bytes

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]
LIMITS = ArchiveLimits()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


# ---- real programs -------------------------------------------------------------------------

class _Block(torch.nn.Module):
    """A small transformer block, Hugging Face style, written from scratch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm1, self.norm2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                       torch.nn.Linear(32, 16))
        self.register_buffer("positions", torch.arange(8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.embed(self.positions[: ids.shape[1]])[None]
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm1(h + a)
        return self.norm2(h + self.mlp(h))


class _Lstm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(8, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class _Consts(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.arange(4.0)  # a tensor constant
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.register_buffer("scratch", torch.ones(4), persistent=False)

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor) -> torch.Tensor:
        return x * self.table * self.scale + self.scratch + bias


class _Dict(torch.nn.Module):
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["a"] @ inputs["b"].t()


def _conv() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU()).eval()


REAL = {
    "linear": lambda: (torch.nn.Linear(16, 8), (torch.randn(4, 16),), {}, None),
    "convnet": lambda: (_conv(), (torch.randn(2, 3, 8, 8),), {}, None),
    "lstm": lambda: (_Lstm(), (torch.randn(2, 5, 8),), {}, None),
    "dict": lambda: (_Dict(), ({"a": torch.randn(3, 4), "b": torch.randn(5, 4)},), {}, None),
    "consts_kwargs": lambda: (_Consts(), (torch.randn(4),), {"bias": torch.randn(4)}, None),
    "dynamic": lambda: (torch.nn.Linear(16, 8), (torch.randn(4, 16),), {},
                        {"input": {0: torch.export.Dim("batch", min=1, max=64)}}),
    "transformer": lambda: (_Block().eval(), (torch.randint(0, 50, (2, 8)),), {}, None),
}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tuple, dict]]:
    out = tmp_path_factory.mktemp("real")
    saved = {}
    for name, build in REAL.items():
        torch.manual_seed(0)
        model, args, kwargs, dynamic = build()
        with warnings.catch_warnings():  # LSTM's flat-weights notice, not ours to fix
            warnings.simplefilter("ignore")
            ep = torch.export.export(model.eval(), args, kwargs, dynamic_shapes=dynamic)
        torch.export.save(ep, str(out / f"{name}.pt2"))
        saved[name] = (out / f"{name}.pt2", args, kwargs)
    return saved


@pytest.mark.parametrize("name", list(REAL))
def test_real_programs_pass_and_still_load(real: dict, tmp_path: Path, name: str) -> None:
    path, args, kwargs = real[name]
    dest = tmp_path / "rebuilt.pt2"
    report = admit_upload(path, dest, LIMITS)
    assert report.model == "model" and report.rebuilt_bytes == dest.stat().st_size
    with zipfile.ZipFile(path) as before, zipfile.ZipFile(dest) as after:
        assert after.namelist() == before.namelist()
        for info in after.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert after.read(info) == before.read(info.filename)
    expected = torch.export.load(str(path)).module()(*args, **kwargs)
    got = torch.export.load(str(dest)).module()(*args, **kwargs)
    torch.testing.assert_close(got, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rebuilt.pt2"]


def test_gate_never_imports_torch() -> None:
    code = "import app.validation.gate, app.api.routes.lowerings, sys; " \
           "assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_evil_pickle_is_live(marker: Path) -> None:
    """The payload used below really runs when unpickled (so the gate tests mean something)."""
    pickle.loads(evil_pickle(marker))
    assert marker.exists()


# ---- helpers to build hostile variants of a real archive ------------------------------------

def refused(data: bytes, tmp_path: Path, error: type[ServiceError], code: str,
            says: str, limits: ArchiveLimits = LIMITS) -> str:
    """Assert the gate refuses ``data`` with ``error``/``code``, a message containing
    ``says`` (every caller names a part of the message it expects), and writes nothing."""
    assert says, "name a substring of the expected message"
    src, dest = tmp_path / "upload.pt2", tmp_path / "out" / "job.pt2"
    dest.parent.mkdir(exist_ok=True)
    src.write_bytes(data)
    with pytest.raises(error) as caught:
        admit_upload(src, dest, limits)
    assert caught.value.code == code, caught.value.message
    assert says in caught.value.message or repr(says)[1:-1] in caught.value.message
    assert list(dest.parent.iterdir()) == []
    return caught.value.message


def edit(path: Path, change: Callable[[dict[str, bytes]], None]) -> bytes:
    members = members_of(path)
    change(members)
    return zip_bytes(members)


def edit_json(path: Path, rel: str, change: Callable[[dict], None]) -> bytes:
    def apply(members: dict[str, bytes]) -> None:
        name = f"{path.stem}/{rel}"
        doc = json.loads(members[name])
        change(doc)
        members[name] = json.dumps(doc).encode()
    return edit(path, apply)


def nested_inputs(path: Path, change: Callable[[dict[str, bytes]], None]) -> bytes:
    def apply(members: dict[str, bytes]) -> None:
        name = f"{path.stem}/data/sample_inputs/model.pt"
        inner = members_of(members[name])
        change(inner)
        members[name] = zip_bytes(inner)
    return edit(path, apply)


# ---- zip framing ---------------------------------------------------------------------------

@pytest.fixture
def linear(real: dict) -> Path:
    return real["linear"][0]


def test_not_a_zip(tmp_path: Path) -> None:
    refused(b"PK\x03\x04 not really" * 50, tmp_path, UnsupportedMediaType, "not_a_pt2_archive",
            "end record")


def central_entries(data: bytes | bytearray) -> list[int]:
    """Offsets of the outer archive's central directory entries."""
    start = struct.unpack_from("<I", data, len(data) - 22 + 16)[0]
    return [i for i in range(start, len(data) - 22) if data[i:i + 4] == b"PK\x01\x02"]


def test_encrypted_member(linear: Path, tmp_path: Path) -> None:
    data = bytearray(edit(linear, lambda m: None))
    data[6] |= 1  # the first member's local header
    data[central_entries(data)[0] + 8] |= 1
    refused(bytes(data), tmp_path, UnsupportedMediaType, "not_a_pt2_archive", "encrypted")


def test_duplicate_names(linear: Path, tmp_path: Path, marker: Path) -> None:
    buffer = io.BytesIO(edit(linear, lambda m: None))
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "a") as archive:
        warnings.simplefilter("ignore")
        archive.writestr("linear/data/weights/model_weights_config.json", b"{}")
    refused(buffer.getvalue(), tmp_path, Unprocessable, "unsafe_member_name",
            "model_weights_config.json")
    assert not marker.exists()


def test_overlapping_members(linear: Path, tmp_path: Path) -> None:
    data = bytearray(edit(linear, lambda m: None))
    central = central_entries(data)
    first = struct.unpack_from("<I", data, central[0] + 42)[0]
    struct.pack_into("<I", data, central[1] + 42, first)  # second entry points at the first
    refused(bytes(data), tmp_path, UnsupportedMediaType, "not_a_pt2_archive",
            "overlaps another member")


def test_data_before_first_member(linear: Path, tmp_path: Path) -> None:
    refused(b"#!/bin/sh\ntouch x\n" + linear.read_bytes(), tmp_path, UnsupportedMediaType,
            "not_a_pt2_archive", "torch.export.save")


def test_crc_mismatch(linear: Path, tmp_path: Path) -> None:
    data = bytearray(edit(linear, lambda m: None))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("linear/data/weights/weight_0")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 3] ^= 0xFF
    refused(bytes(data), tmp_path, UnsupportedMediaType, "not_a_pt2_archive", "weight_0")


@pytest.mark.parametrize("name", ["linear/../../etc/cron.d/x", "/linear/abs", "linear/a\\b",
                                  "linear/./x", "linear//x"])
def test_unsafe_member_names(linear: Path, tmp_path: Path, name: str) -> None:
    data = edit(linear, lambda m: m.update({name: b"x"}))
    refused(data, tmp_path, Unprocessable, "unsafe_member_name", name)


def test_nul_in_member_name(linear: Path, tmp_path: Path) -> None:
    data = edit(linear, lambda m: m.update({"linear/extraXXsh": b"x"}))
    refused(data.replace(b"extraXXsh", b"extra\0\0sh"), tmp_path, Unprocessable,
            "unsafe_member_name", "linear/extra\0\0sh")


def test_zip_bomb_ratio(linear: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO(edit(linear, lambda m: None))
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("linear/data/weights/weight_9", b"\0" * (8 << 20))
    refused(buffer.getvalue(), tmp_path, PayloadTooLarge, "archive_too_large", "weight_9")


@pytest.mark.parametrize(("limits", "says"), [
    (ArchiveLimits(max_members=5), "members"),
    (ArchiveLimits(max_member_bytes=1000), "bytes uncompressed"),
    (ArchiveLimits(max_total_bytes=4000), "expands to more than"),
])
def test_caps(linear: Path, tmp_path: Path, limits: ArchiveLimits, says: str) -> None:
    refused(linear.read_bytes(), tmp_path, PayloadTooLarge, "archive_too_large", says, limits)


# ---- layout --------------------------------------------------------------------------------

@pytest.mark.parametrize(("rel", "code", "says"), [
    ("data/aotinductor/model/model.so", "unsupported_layout", "aotinductor"),
    ("data/constants/custom_obj_0", "unsupported_layout", "custom_obj_0"),
    ("data/constants/opaque_obj_0", "unsupported_layout", "opaque_obj_0"),
    ("data/weights/model.pt", "unsupported_layout", "model.pt"),
    ("extra/notes.txt", "unsupported_layout", "extra/notes.txt"),
    ("models/second.json", "unsupported_layout", "one program"),
])
def test_members_torch_never_writes(linear: Path, tmp_path: Path, marker: Path, rel: str,
                                    code: str, says: str) -> None:
    data = edit(linear, lambda m: m.update({f"linear/{rel}": evil_pickle(marker)}))
    refused(data, tmp_path, Unprocessable, code, says)
    assert not marker.exists()


def test_missing_and_empty_example_inputs(linear: Path, tmp_path: Path) -> None:
    name = "linear/data/sample_inputs/model.pt"
    refused(edit(linear, lambda m: m.pop(name)), tmp_path, Unprocessable,
            "missing_example_inputs", "example inputs")
    refused(edit(linear, lambda m: m.update({name: b""})), tmp_path, Unprocessable,
            "missing_example_inputs", name)


def test_wrong_archive_version(linear: Path, tmp_path: Path) -> None:
    data = edit(linear, lambda m: m.update({"linear/archive_version": b"7"}))
    refused(data, tmp_path, Unprocessable, "unsupported_layout", "archive_version")


@pytest.mark.parametrize("config", ["data/weights/model_weights_config.json",
                                    "data/constants/model_constants_config.json"])
def test_pickled_weights_and_constants(real: dict, tmp_path: Path, marker: Path,
                                       config: str) -> None:
    path = real["consts_kwargs"][0]

    def poison(members: dict[str, bytes]) -> None:
        name = f"{path.stem}/{config}"
        doc = json.loads(members[name])
        fqn, meta = next(iter(doc["config"].items()))
        meta["use_pickle"] = True
        members[name] = json.dumps(doc).encode()
        folder = config.rsplit("/", 1)[0]
        members[f"{path.stem}/{folder}/{meta['path_name']}"] = evil_pickle(marker)
    refused(edit(path, poison), tmp_path, Unprocessable, "unsafe_pickle", config)
    assert not marker.exists()


def test_empty_record_declared_huge(linear: Path, tmp_path: Path) -> None:
    def zero(members: dict[str, bytes]) -> None:
        members["linear/data/weights/weight_0"] = b""
    refused(edit(linear, zero), tmp_path, Unprocessable, "unsupported_layout", "weight_0")


def test_record_bigger_than_its_file(linear: Path, tmp_path: Path) -> None:
    def grow(doc: dict) -> None:
        doc["config"]["weight"]["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 16}]
    refused(edit_json(linear, "data/weights/model_weights_config.json", grow), tmp_path,
            Unprocessable, "unsupported_layout", "weight")


# ---- graph JSON ----------------------------------------------------------------------------

GRAPH = "models/model.json"


def _first_node(doc: dict) -> dict:
    return doc["graph_module"]["graph"]["nodes"][0]


def _touch(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


@pytest.mark.parametrize("case", [
    "target_torch_os", "target_builtin_eval", "expr_str", "guard", "range_key",
    "parameter_name", "node_name", "tensor_value_key", "pytree_type", "custom_obj",
    "schema_version",
])
def test_hostile_graph(real: dict, tmp_path: Path, marker: Path, case: str) -> None:
    path = real["dynamic"][0]

    def poison(doc: dict) -> None:
        graph = doc["graph_module"]["graph"]
        if case == "target_torch_os":
            _first_node(doc)["target"] = "torch.os.system"
        elif case == "target_builtin_eval":
            _first_node(doc)["target"] = "builtins.eval"
        elif case == "expr_str":
            size = graph["tensor_values"]["input"]["sizes"][0]
            size["as_expr"]["expr_str"] = _touch(marker)
        elif case == "guard":
            doc["guards_code"] = [f"L['input'].size()[0] <= 64 or {_touch(marker)}"]
        elif case == "range_key":
            doc["range_constraints"][_touch(marker)] = {"min_val": 1, "max_val": 2}
        elif case == "parameter_name":
            spec = doc["graph_module"]["signature"]["input_specs"][0]
            spec["parameter"]["parameter_name"] = "weight\nimport os; os.system('x')"
        elif case == "node_name":
            _first_node(doc)["name"] = "x = __import__('os')"
        elif case == "tensor_value_key":
            graph["tensor_values"]["a; b"] = graph["tensor_values"]["input"]
        elif case == "pytree_type":
            sig = doc["graph_module"]["module_call_graph"][0]["signature"]
            sig["in_spec"] = json.dumps([1, {"type": "os.system('x')", "context": "null",
                                             "children_spec": []}])
        elif case == "custom_obj":
            graph["custom_obj_values"] = {"obj": {"class_fqn": "__torch__.Evil"}}
        elif case == "schema_version":
            doc["schema_version"]["major"] = 3
    refused(edit_json(path, GRAPH, poison), tmp_path, Unprocessable, "unsafe_graph", GRAPH)
    assert not marker.exists()


def test_graph_not_json_or_too_deep(linear: Path, tmp_path: Path) -> None:
    name = f"linear/{GRAPH}"
    refused(edit(linear, lambda m: m.update({name: b"{not json"})), tmp_path, Unprocessable,
            "unsafe_graph", GRAPH)
    deep = b"[" * 500 + b"]" * 500
    refused(edit(linear, lambda m: m.update({name: deep})), tmp_path, Unprocessable,
            "unsafe_graph", "deeper")


def test_expression_grammars() -> None:
    from app.validation import exprs

    exprs.check_sympy_repr("Mul(Integer(2), Symbol('s65', positive=True, integer=True))")
    exprs.check_sympy_repr("StrictLessThan(Symbol('u0', integer=True), Integer(10))")
    exprs.check_arith("2*s65 + Max(1, s0) // 3")
    exprs.check_guard("(L['y'].size()[0] // 2) <= L['x'].size()[0]")
    for bad in ("Symbol('x').__class__", "eval('1')", "Integer(1) if 1 else 2",
                "(lambda: 1)()", "Symbol(__import__('os'))", "[x for x in ()]"):
        with pytest.raises(exprs.GrammarError):
            exprs.check_sympy_repr(bad)
    for bad in ("L['x'].__class__", "L['x'].size()[0] or open('f')", "L['x;y']", "f'{1}'"):
        with pytest.raises(exprs.GrammarError):
            exprs.check_guard(bad)


# ---- example inputs pickle -----------------------------------------------------------------

PKL = "archive/data.pkl"


@pytest.mark.parametrize("payload", ["reduce_os_system", "global_eval", "build", "ext",
                                     "persid", "missing_storage", "raw_pickle_not_zip"])
def test_hostile_example_inputs(linear: Path, tmp_path: Path, marker: Path,
                                payload: str) -> None:
    evil = evil_pickle(marker)
    if payload == "raw_pickle_not_zip":
        data = edit(linear, lambda m: m.update(
            {"linear/data/sample_inputs/model.pt": evil}))
    else:
        body = {
            "reduce_os_system": evil,
            "global_eval": b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",
            "build": b"\x80\x02ccollections\nOrderedDict\n)R}b.",
            "ext": b"\x80\x02\x82\x01)R.",
            "persid": b"\x80\x02P0\n.",
            "missing_storage": b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
                               b"X\x02\x00\x00\x0099X\x03\x00\x00\x00cpuK\x04tQ.",
        }[payload]
        data = nested_inputs(linear, lambda inner: inner.update({PKL: body}))
    message = refused(data, tmp_path, Unprocessable, "unsafe_pickle",
                      "data/sample_inputs/model.pt")
    assert "model.pt" in message
    assert not marker.exists()


def test_nested_inputs_framing(linear: Path, tmp_path: Path) -> None:
    data = nested_inputs(linear, lambda inner: inner.update({"archive/../x": b"1"}))
    refused(data, tmp_path, Unprocessable, "unsafe_member_name", "archive/../x")
    data = nested_inputs(linear, lambda inner: inner.update({"archive/run.py": b"1"}))
    refused(data, tmp_path, Unprocessable, "unsupported_layout", "run.py")
