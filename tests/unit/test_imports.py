"""Import boundaries: the layer loads no torch; plugins import nothing of the gateway.

vLLM's API-server process imports the middleware; torch there only costs start
time and memory (the engine runs elsewhere), and the wire format of decision
reports is the one thing both ends share.
"""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_middleware_alone_loads_no_torch():
    loaded = _modules_after("import refusal_gateway.middleware")
    assert "refusal_gateway.middleware" in loaded
    assert not {m for m in loaded if m == "torch" or m.startswith("torch.")}


def test_plugins_import_nothing_of_the_gateway():
    loaded = _modules_after("import refusal_plugins.v1, refusal_plugins.wire, refusal_plugins.core")
    assert not {m for m in loaded if m.startswith("refusal_gateway")}
