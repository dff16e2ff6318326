"""Hostile uploads end to end: refused with the right 4xx, nothing run, queued or left."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server
from tests.factories import (
    evil_pickle,
    leftover_uploads,
    members_of,
    read_member,
    rewrite_zip,
    submit,
    zip_bytes,
)

JOB_FILE = re.compile(r"[0-9a-f]{32}\.pt2")


def _jobs(client: httpx.Client) -> set[str]:
    return {job["id"] for job in client.get("/v1/lowerings", params={"limit": 500}).json()["items"]}


def _graph_with(source: Path, expr: str) -> bytes:
    doc = json.loads(read_member(source, "dynamic/models/model.json"))
    doc["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = expr
    return rewrite_zip(source, add={"dynamic/models/model.json": json.dumps(doc).encode()})


def _linear_graph_with(source: Path, change: Callable[[dict], None]) -> bytes:
    doc = json.loads(read_member(source, "linear/models/model.json"))
    change(doc)
    return rewrite_zip(source, add={"linear/models/model.json": json.dumps(doc).encode()})


def _cpp_breakout(doc: dict) -> None:
    node = doc["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.ops.aten._assert_async.msg"
    node["inputs"] = [{"name": "self", "arg": {"as_tensor": {"name": "x"}}, "kind": 1},
                      {"name": "assert_msg", "arg": {"as_string": '"); abort(); //'},
                       "kind": 1}]


def _enum_spec(doc: dict) -> None:
    signature = doc["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(signature["in_spec"])
    spec[1]["context"] = json.dumps({"__enum__": True, "fqn": "os:system", "name": "x"})
    signature["in_spec"] = json.dumps(spec)


def _expanded_inputs(source: Path) -> bytes:
    """The example input (4, 16) floats rewritten as a stride-0 view of 2**32 x 16."""
    inputs = "linear/data/sample_inputs/model.pt"
    inner = members_of(read_member(source, inputs))
    pkl = inner["archive/data.pkl"]
    sizes, strides = b"K\x04K\x10\x86", b"K\x10K\x01\x86"
    assert pkl.count(sizes) == 1 and pkl.count(strides) == 1
    inner["archive/data.pkl"] = pkl.replace(sizes, b"\x8a\x05\x00\x00\x00\x00\x01K\x10\x86"
                                            ).replace(strides, b"K\x00K\x00\x86")
    return rewrite_zip(source, add={inputs: zip_bytes(inner)})


@pytest.mark.parametrize("case", ["pickled_inputs", "pickled_weights", "aoti_folder",
                                  "sympy_eval", "zip_slip", "bomb", "cpp_string",
                                  "enum_spec", "expanded_inputs", "pow_bomb"])
def test_hostile_upload_is_refused(client: httpx.Client, server: Server, programs: Path,
                                   tmp_path: Path, case: str) -> None:
    marker = tmp_path / "MARKER"
    evil = evil_pickle(marker)
    linear, dynamic = programs / "linear.pt2", programs / "dynamic.pt2"
    status, code = 422, "unsafe_pickle"
    if case == "pickled_inputs":
        payload = rewrite_zip(linear, add={"linear/data/sample_inputs/model.pt": evil})
    elif case == "pickled_weights":
        config = json.loads(read_member(linear, "linear/data/weights/model_weights_config.json"))
        config["config"]["linear.weight"]["use_pickle"] = True
        payload = rewrite_zip(linear, add={
            "linear/data/weights/model_weights_config.json": json.dumps(config).encode(),
            "linear/data/weights/weight_0": evil})
    elif case == "aoti_folder":
        payload = rewrite_zip(linear, add={"linear/data/aotinductor/model/x.so": b"\x7fELF"})
        code = "unsupported_layout"
    elif case == "sympy_eval":
        payload = _graph_with(dynamic, f"__import__('os').system('touch {marker}')")
        code = "unsafe_graph"
    elif case == "cpp_string":
        payload, code = _linear_graph_with(linear, _cpp_breakout), "unsafe_graph"
    elif case == "enum_spec":
        payload, code = _linear_graph_with(linear, _enum_spec), "unsafe_graph"
    elif case == "expanded_inputs":
        payload = _expanded_inputs(linear)
    elif case == "pow_bomb":
        payload = _graph_with(dynamic, "Pow(Integer(10), Integer(18446744073709551615))")
        code = "unsafe_graph"
    elif case == "zip_slip":
        payload = rewrite_zip(linear, add={"linear/../../../tmp/evil.so": b"x"})
        code = "unsafe_member_name"
    else:
        import io
        import zipfile

        buffer = io.BytesIO(rewrite_zip(linear))
        with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("linear/data/weights/weight_7", b"\0" * (64 << 20))
        payload, status, code = buffer.getvalue(), 413, "archive_too_large"
    before = _jobs(client)
    response = submit(client, payload, model_name="m")
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "member" in body["error"]["message"] or "archive" in body["error"]["message"]
    assert _jobs(client) == before
    assert not marker.exists()
    assert leftover_uploads(server.data_dir) == []
    uploads = sorted(p.name for p in (server.data_dir / "uploads").iterdir() if p.is_file())
    assert all(JOB_FILE.fullmatch(name) and name[:-4] in before for name in uploads), uploads
    assert client.get("/healthz").json() == {"status": "ok"}


def test_info_reports_gate_limits(client: httpx.Client) -> None:
    archive = client.get("/v1/info").json()["limits"]["archive"]
    assert archive["max_total_bytes"] == 2 * 8 * 1024 * 1024  # 2 x the server's upload cap
    assert {"max_members", "max_ratio", "max_json_depth", "max_json_bytes"} <= set(archive)
    assert {"max_config_bytes", "max_json_values", "max_extra_files", "max_extra_bytes",
            "max_example_tensor_bytes", "max_example_bytes"} <= set(archive)

