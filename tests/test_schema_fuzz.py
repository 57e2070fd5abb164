"""schemathesis against /schema/openapi.json: no server errors, every answer as documented."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from tests.conftest import ApiServer

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


async def test_openapi_fuzzing_finds_no_server_error(api: ApiServer, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    proc = await asyncio.create_subprocess_exec(
        str(st), "run", f"{api.url}/schema/openapi.json", "--checks", CHECKS, "--phases", "examples,fuzzing",
        "--max-examples", "40", "--request-timeout", "10", "--seed", "20261125", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    async with asyncio.timeout(150):
        output, _ = await proc.communicate()
    report = output.decode(errors="replace")
    assert proc.returncode == 0, report[-4000:]
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    tested = re.search(r"Tested: (\d+)", report)
    assert selected is not None, report[-2000:]
    assert tested is not None, report[-2000:]
    assert int(tested[1]) == int(selected[1]) == int(selected[2]) >= 30  # every operation was exercised
    assert "Server error" not in report
