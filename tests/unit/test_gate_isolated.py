"""The gate's own cost (issue 7, class 6): per-member caps, bounded JSON, and a fresh,
resource-limited child process per check, so a bomb cannot take the API down."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

from app.errors import PayloadTooLarge, ServiceError, Unprocessable
from app.validation import isolated
from app.validation.gate import admit_upload
from app.validation.isolated import GateResources, run_gate
from app.validation.limits import ArchiveLimits
from tests.factories import members_of, zip_bytes
from tests.unit.test_gate import edit, refused

torch = pytest.importorskip("torch")
from tests import models  # noqa: E402  (needs torch)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "data/weights/model_weights_config.json"
# Caps loosened so that a bomb gets past the in-process checks and into the parser: what
# the child's limits must then stop.
LOOSE = ArchiveLimits(max_ratio=1 << 30, max_config_bytes=1 << 30, max_json_bytes=1 << 30,
                      max_json_values=1 << 40, max_total_bytes=1 << 31,
                      max_member_bytes=1 << 31)


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.save_model("linear", tmp_path_factory.mktemp("iso") / "linear.pt2")


def deflated(members: dict[str, bytes]) -> bytes:
    return zip_bytes(members, compression=zipfile.ZIP_DEFLATED)


def json_bomb(path: Path, mib: int) -> bytes:
    """``path`` with its weights config replaced by a deflated ``[[],[],...]`` of ``mib`` MiB:
    a few hundred KB on the wire, ~25x its size in Python objects once parsed."""
    members = members_of(path)
    members[f"{path.stem}/{CONFIG}"] = b"[" + b"[]," * (mib * 1024 * 1024 // 3) + b"[]]"
    return deflated(members)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# ---- caps by member type, JSON bounded before parsing --------------------------------------

def test_config_json_has_its_own_cap(linear: Path, tmp_path: Path) -> None:
    """The reported attack: a deflated JSON array in a config member (ratio cap aside)."""
    data = json_bomb(linear, 16)
    limits = ArchiveLimits(max_ratio=1 << 30)
    started = time.monotonic()
    message = refused(data, tmp_path, PayloadTooLarge, "archive_too_large", CONFIG, limits)
    assert str(limits.max_config_bytes) in message
    assert time.monotonic() - started < 2


def test_json_values_are_bounded_before_parsing(linear: Path, tmp_path: Path) -> None:
    data = edit(linear, lambda m: m.update({
        f"linear/{CONFIG}": b'{"config": {}, "x": [' + b"0," * 5000 + b"0]}"}))
    message = refused(data, tmp_path, PayloadTooLarge, "archive_too_large", CONFIG,
                      ArchiveLimits(max_json_values=1000))
    assert "JSON values" in message


# ---- the child process --------------------------------------------------------------------

def test_isolated_gate_admits_like_the_in_process_one(linear: Path, tmp_path: Path) -> None:
    inline = admit_upload(linear, tmp_path / "inline.pt2", ArchiveLimits())
    report = run(run_gate(linear, tmp_path / "child.pt2", ArchiveLimits(), GateResources()))
    assert {k: v for k, v in asdict(report).items() if k != "elapsed_s"} == {  # type: ignore
        k: v for k, v in asdict(inline).items() if k != "elapsed_s"}
    assert (tmp_path / "child.pt2").read_bytes() == (tmp_path / "inline.pt2").read_bytes()


@pytest.mark.parametrize("case", ["unsafe_layout", "not_a_zip", "too_large"])
def test_isolated_gate_relays_refusals(linear: Path, tmp_path: Path, case: str) -> None:
    if case == "unsafe_layout":
        data = edit(linear, lambda m: m.update({"linear/data/aotinductor/x.so": b"\x7fELF"}))
    elif case == "not_a_zip":
        data = b"not a zip at all" * 10
    else:
        data = linear.read_bytes()
    limits = ArchiveLimits(max_members=3) if case == "too_large" else ArchiveLimits()
    src = tmp_path / "upload.pt2"
    src.write_bytes(data)
    with pytest.raises(ServiceError) as inline:
        admit_upload(src, tmp_path / "a.pt2", limits)
    with pytest.raises(ServiceError) as child:
        run(run_gate(src, tmp_path / "b.pt2", limits, GateResources()))
    assert type(child.value) is type(inline.value)
    assert (child.value.status, child.value.code, child.value.message) == (
        inline.value.status, inline.value.code, inline.value.message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload.pt2"]


def test_memory_bomb_stays_in_the_child(linear: Path, tmp_path: Path) -> None:
    src = tmp_path / "bomb.pt2"
    src.write_bytes(json_bomb(linear, 48))  # ~800 MB of lists once parsed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(Unprocessable) as caught:
        run(run_gate(src, tmp_path / "out.pt2", LOOSE,
                     GateResources(max_memory_bytes=256 << 20)))
    assert caught.value.code == "upload_too_complex", caught.value.message
    assert "memory" in caught.value.message and str(256 << 20) in caught.value.message
    assert time.monotonic() - started < 30
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"this process grew by {grown_kib} KiB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.pt2"]


def _slow_pickle(linear: Path) -> bytes:
    """Example inputs whose pickle is millions of cheap opcodes: seconds of CPU to walk."""
    def apply(members: dict[str, bytes]) -> None:
        name = "linear/data/sample_inputs/model.pt"
        inner = members_of(members[name])
        inner["archive/data.pkl"] = b"\x80\x02" + b"N0" * 3_000_000 + b"N."
        members[name] = deflated(inner)
    return edit(linear, apply)


@pytest.mark.parametrize("limit", ["cpu", "wall"])
def test_slow_check_is_cut_off(linear: Path, tmp_path: Path, limit: str) -> None:
    src = tmp_path / "slow.pt2"
    src.write_bytes(_slow_pickle(linear))
    resources = GateResources(max_cpu_s=1) if limit == "cpu" else GateResources(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(Unprocessable) as caught:
        run(run_gate(src, tmp_path / "out.pt2", LOOSE, resources))
    assert caught.value.code == "upload_too_complex", caught.value.message
    assert ("CPU" if limit == "cpu" else "longer than") in caught.value.message
    assert time.monotonic() - started < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.pt2"]


def test_concurrency_is_bounded(linear: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    active, peak = 0, 0
    real = isolated._run_child

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return await real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            active -= 1

    monkeypatch.setattr(isolated, "_run_child", counting)

    async def many() -> None:
        await asyncio.gather(*(run_gate(linear, tmp_path / f"{i}.pt2", ArchiveLimits(),
                                        GateResources(concurrency=2)) for i in range(5)))
    run(many())
    assert peak == 2
    assert len(list(tmp_path.glob("*.pt2"))) == 5


def test_child_and_gate_never_import_torch() -> None:
    code = ("import app.validation.isolated, app.validation.child, app.api.routes.lowerings, sys; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_child_rejects_a_malformed_request() -> None:
    proc = subprocess.run([sys.executable, "-S", "-m", "app.validation.child"], cwd=ROOT,
                          input=b"{not json", capture_output=True, timeout=30)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["error"]["status"] == 500
