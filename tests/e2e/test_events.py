"""lowerctl follows a real lowering through the events stream of a real uvicorn: the
phases as lines, the final state, and no polling. Cheap: the program lowered by the
session's `linear` fixture, with another rtol (a new job, whose compiled code is reused)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.client.cli import main
from app.client.sdk import LoweringClient
from tests.conftest import Server


def test_lowerctl_shows_the_phases_from_the_events(
    server: Server, programs: Path, linear: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    polls: list[str] = []
    get = LoweringClient.get

    def counted(self: LoweringClient, job_id: str) -> dict[str, Any]:
        polls.append(job_id)
        return get(self, job_id)

    monkeypatch.setattr(LoweringClient, "get", counted)
    code = main(["--url", server.url, "submit", str(programs / "linear.pt2"),
                 "--model-name", "linear", "--rtol", "0.002", "--wait"])
    out, err = capsys.readouterr()
    job = json.loads(out)
    assert code == 0 and job["status"] == "succeeded", err
    # Reused from a lowering of the same structure: the fixture's or a later one (the
    # newest donor wins, and other tests lower linear.pt2 with other settings too).
    assert job["code_reused_from"] is not None and job["code_reused_from"] != job["id"]
    assert f"{job['id']}  running: " in err, err
    assert f"job {job['id']} succeeded after" in err
    assert polls == []  # followed through the stream, not polled
