"""docs/cookbook.md's recipes, used the way its introduction says: each added at the top of
the shipped config's ``sources`` (replacing the shipped rule of the same name), with
10.0.0.0/8 on the whitelist. Every recipe passes ``check``; every ``explain`` shown after a
recipe prints the source, rule and outcome the page says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from seadragon_proxy.cli import main

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "cookbook.md").read_text()
PROXY_KEYS = {
    "server", "upstream", "upstreams", "queue", "whitelist", "admin", "cors", "log", "history",
    "sources", "default_source", "defaults",
}  # fmt: skip
BLOCK = re.compile(r"```(yaml|sh|text)\n(.*?)```", re.DOTALL)


def recipes() -> list[tuple[str, dict[str, Any], list[tuple[list[str], str]]]]:
    """(heading, recipe, [(explain arguments, expected output)]) for each YAML block."""
    found: list[tuple[str, dict[str, Any], list[tuple[list[str], str]]]] = []
    for section in PAGE.split("\n## ")[1:]:
        heading = section.split("\n", 1)[0]
        blocks = BLOCK.findall(section)
        for i, (kind, text) in enumerate(blocks):
            if kind != "yaml":
                continue
            doc = yaml.safe_load(text)
            if not isinstance(doc, dict) or not set(doc) <= PROXY_KEYS:
                continue  # a client's own settings (Continue's config.yaml), not a recipe
            examples = []
            for j in range(i + 1, len(blocks) - 1):
                if blocks[j][0] == "yaml":
                    break
                command, output = blocks[j][1].strip(), blocks[j + 1]
                if blocks[j][0] == "sh" and output[0] == "text" and command.count("\n") == 0:
                    words = shlex.split(command.split(" #")[0])
                    if words[:2] == ["seadragon-proxy", "explain"]:
                        examples.append((words[2:], output[1]))
            found.append((heading, doc, examples))
    return found


RECIPES = recipes()


def _apply(recipe: dict[str, Any], shipped: dict[str, Any]) -> dict[str, Any]:
    config = dict(shipped)
    for key, value in recipe.items():
        if key == "sources":
            names = {s["name"] for s in value}
            config["sources"] = value + [s for s in shipped["sources"] if s["name"] not in names]
        else:
            config[key] = value
    return config


def _lines(text: str) -> list[str]:
    """What an example must match: the source, the rule that decided, the outcome."""
    return [
        line
        for line in text.strip().splitlines()
        if line.split(":", 1)[0] in ("source", "decided", "outcome")
    ]


def test_the_page_has_recipes_and_examples() -> None:
    assert len(RECIPES) >= 15
    assert sum(len(examples) for _, _, examples in RECIPES) >= 10


@pytest.mark.parametrize(
    ("heading", "recipe", "examples"),
    RECIPES,
    ids=[f"{h}-{i}" for i, (h, _, _) in enumerate(RECIPES)],
)
def test_each_recipe_passes_check_and_explains_as_shown(
    heading: str,
    recipe: dict[str, Any],
    examples: list[tuple[list[str], str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shipped = yaml.safe_load((ROOT / "config" / "seadragon.yaml").read_text())
    shipped["whitelist"] = {"database": str(tmp_path / "seadragon.db")}
    config = tmp_path / "seadragon.yaml"
    config.write_text(yaml.safe_dump(_apply(recipe, shipped), sort_keys=False))
    assert main(["check", "--config", str(config)]) == 0, capsys.readouterr()
    assert main(["whitelist", "add", "10.0.0.0/8", "--config", str(config)]) == 0
    for arguments, expected in examples:
        capsys.readouterr()
        assert main(["explain", "--config", str(config), *arguments]) == 0
        assert _lines(capsys.readouterr().out) == _lines(expected), (heading, arguments)
