"""What a client sees of verification carries no value the compiled code computed."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import httpx

from tests.leaks import assert_no_values, leaked_numbers


def test_job_provenance_and_log_carry_no_output_values(
    client: httpx.Client, linear: dict[str, Any]
) -> None:
    job = linear["job"]
    tolerances = (job["rtol"], job["atol"])
    verification = job["verification"]
    assert verification["passed"] is True
    assert verification["error_magnitude"] is not None
    assert "max_abs_error" not in json.dumps(verification)
    assert_no_values(verification, allowed=tolerances)
    for case in verification["cases"]:
        assert case["mismatched_outputs"] == []
        assert [o["index"] for o in case["outputs"]] == list(range(len(case["outputs"])))

    with zipfile.ZipFile(io.BytesIO(linear["archive"])) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("extra/provenance.json")]
        provenance = json.loads(archive.read(name))
    assert provenance["verification"] == verification

    log = client.get(f"/v1/lowerings/{job['id']}/log").text
    lines = [line for line in log.splitlines() if "case " in line or "verification" in line]
    assert lines, log[-2000:]
    # Strip the timestamp each line starts with; what is left must hold no measured value.
    leaked = [(line, leaked_numbers(line.partition(" app.")[2], allowed=tolerances))
              for line in lines]
    assert not [item for item in leaked if item[1]], leaked
