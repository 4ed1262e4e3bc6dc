"""The dashboard's colour per source (static/colours.js), checked in Node: a pure function of
the name, so a source keeps its colour across page loads whatever order sources appear in."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parent.parent / "seadragon_proxy" / "static"
SHIPPED = ["coding", "chat", "scripts", "direct_api", "(none)"]


def colours(names: list[str]) -> list[str]:
    """``seadragonColour`` of each name, called in this order in a fresh Node process."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("no node on PATH: the dashboard's colour check runs colours.js in Node")
    script = (
        "const vm = require('vm'), fs = require('fs');"
        f"vm.runInThisContext(fs.readFileSync({json.dumps(str(STATIC / 'colours.js'))}, 'utf8'));"
        f"console.log(JSON.stringify({json.dumps(names)}.map(seadragonColour)));"
    )
    done = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True)
    result: list[str] = json.loads(done.stdout)
    return result


def test_a_source_has_the_same_colour_whatever_order_sources_are_seen_in() -> None:
    forward = colours(SHIPPED)
    backward = colours(list(reversed(SHIPPED)))
    assert forward == list(reversed(backward))
    assert colours(["scripts"]) == [forward[2]]  # alone, first: still its own colour


def test_the_shipped_sources_get_colours_far_apart() -> None:
    hues = []
    for colour in colours(SHIPPED):
        found = re.fullmatch(r"hsl\((\d+) 62% (34|44|54)%\)", colour)
        assert found, colour
        hues.append(int(found.group(1)))
    gaps = [min(abs(a - b), 360 - abs(a - b)) for i, a in enumerate(hues) for b in hues[i + 1 :]]
    assert min(gaps) >= 30, hues


def test_the_page_loads_colours_js_before_admin_js_and_uses_it() -> None:
    html = (STATIC / "admin.html").read_text()
    assert html.index("/admin/colours.js") < html.index("/admin/admin.js")
    script = (STATIC / "admin.js").read_text()
    assert "seadragonColour(" in script and "colours.size" not in script
