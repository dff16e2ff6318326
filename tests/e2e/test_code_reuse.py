"""Compiled code reused end to end: a registry re-lowering a fine-tune (the same
structure, other weights) gets an archive verified with its weights without a compile;
anything else compiles."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.models import fine_tune

pytestmark = pytest.mark.slow


def _lower(client: httpx.Client, program: Path, **params: Any) -> dict[str, Any]:
    cache = params.pop("cache", None)
    url_params = {"cache": cache} if cache else {}
    response = client.post("/v1/lowerings", params={"wait": 300, **url_params},
                           data={"model_name": "m", **params},
                           files={"program": ("p.pt2", program.read_bytes())})
    assert response.status_code == 200, response.text
    job: dict[str, Any] = client.get(
        f"/v1/lowerings/{response.headers['x-lowering-id']}").json()
    job["archive"] = response.content
    return job


def _provenance(archive: bytes) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        return json.loads(zipped.read("archive/extra/provenance.json"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fine-tunes")
    programs = {"base": fine_tune(10), "tuned": fine_tune(11), "again": fine_tune(12),
                "wider_range": fine_tune(13, max_batch=128)}
    for name, program in programs.items():
        torch.export.save(program, str(out / f"{name}.pt2"))
    return {name: out / f"{name}.pt2" for name in programs}


def test_a_fine_tune_reuses_the_compiled_code(client: httpx.Client,
                                              saved: dict[str, Path]) -> None:
    base = _lower(client, saved["base"])
    assert base["code_reused_from"] is None
    tuned = _lower(client, saved["tuned"])
    assert tuned["code_reused_from"] == base["id"]
    assert tuned["cache_hit"] is False and tuned["attempts"] == 1
    assert tuned["verification"]["passed"] is True
    assert tuned["artifact"]["sha256"] != base["artifact"]["sha256"]
    provenance = _provenance(tuned["archive"])
    assert provenance["compiled_code"] == {"reused": True}
    assert provenance["code_key"] == _provenance(base["archive"])["code_key"]
    # No compiler ran for it: its g++ time is a small part of the compiling job's.
    assert tuned["resources"]["children_cpu_s"] < base["resources"]["children_cpu_s"] / 4

    # ?cache=bypass compiles afresh (and the bypassed job gives no code away).
    bypassed = _lower(client, saved["again"], cache="bypass")
    assert bypassed["code_reused_from"] is None
    assert _provenance(bypassed["archive"])["compiled_code"] == {"reused": False}


def test_another_dynamic_range_compiles(client: httpx.Client, saved: dict[str, Path]) -> None:
    _lower(client, saved["base"])  # a cache hit if the test above ran
    wider = _lower(client, saved["wider_range"])
    assert wider["code_reused_from"] is None
    assert wider["verification"]["passed"] is True
