"""Tenants on their own: who a request counts for, the config keys, the per-tenant book,
and the cookbook's fair-share recipes passing ``check``."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict

from seadragon_proxy.cli import main
from seadragon_proxy.exceptions import ConfigError
from seadragon_proxy.settings import load_settings
from seadragon_proxy.tenants import HOUR, TenantBook, key_hash, tenant_name, tenant_value

ROOT = Path(__file__).resolve().parent.parent


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})


def test_tenant_values_for_each_fair_by() -> None:
    h = headers(X_OpenWebUI_User_Id="u-17", Authorization="Bearer sk-secret")
    assert tenant_value("none", "10.0.0.7", h) is None
    assert tenant_value("client_ip", "10.0.0.7", h) == "10.0.0.7"
    assert tenant_value("header:x-openwebui-user-id", "10.0.0.7", h) == "u-17"
    assert tenant_value("header:X-Missing", "10.0.0.7", h) == "-"
    assert tenant_value("api_key", "10.0.0.7", headers()) == "-"
    assert tenant_value("header:X-Long", "", headers(X_Long="x" * 500)) == "x" * 64
    assert tenant_name("scripts", None) == "scripts"
    assert tenant_name("scripts", "10.0.0.7") == "scripts/10.0.0.7"


def test_an_api_key_tenant_is_a_hash_never_the_token() -> None:
    value = tenant_value("api_key", "10.0.0.7", headers(Authorization="Bearer sk-secret"))
    assert value == "key:" + hashlib.sha256(b"sk-secret").hexdigest()[:12]
    assert value is not None and "sk-secret" not in value
    assert key_hash("sk-secret") != key_hash("sk-secreT")
    assert tenant_value("api_key", "", headers(Authorization="Basic dXNlcjpwdw==")) == "-"


def write(tmp_path: Path, source: dict[str, Any], queue: dict[str, Any] | None = None) -> Path:
    doc: dict[str, Any] = {
        "sources": [{"name": "s", "priority": 1, **source}],
        "default_source": "s",
        "whitelist": {"database": str(tmp_path / "db")},
    }
    if queue is not None:
        doc["queue"] = queue
    path = tmp_path / "seadragon.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_fair_share_keys_are_read(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            {
                "fair_by": "header:X-User",
                "weights": {"alice": 2, "bob": 0.5},
                "limits": {"max_queued": 3, "max_in_flight": 1, "tokens_per_hour": 9000},
            },
            {"fairness": {"output_weight": 3}},
        )
    )
    fairness = settings.policy.sources[0].fairness
    assert fairness.fair_by == "header:X-User"
    assert (fairness.weight("alice"), fairness.weight("bob"), fairness.weight("carol")) == (
        2,
        0.5,
        1,
    )
    limits = fairness.limits
    assert (limits.max_queued, limits.max_in_flight, limits.tokens_per_hour) == (3, 1, 9000)
    assert settings.queue.output_weight == 3
    assert load_settings(write(tmp_path, {})).queue.output_weight == 2


@pytest.mark.parametrize(
    ("source", "queue", "key", "problem"),
    [
        ({"fair_by": "user"}, None, "sources[0].fair_by", "must be one of none, client_ip"),
        ({"fair_by": "header:"}, None, "sources[0].fair_by", "names no valid header"),
        ({"fair_by": "header:X User"}, None, "sources[0].fair_by", "names no valid header"),
        ({"fair_by": 3}, None, "sources[0].fair_by", "must be a non-empty string"),
        ({"weights": {"a": 2}}, None, "sources[0].weights", "needs fair_by"),
        (
            {"fair_by": "client_ip", "weights": {"10.0.0.7": 0}},
            None,
            "sources[0].weights.10.0.0.7",
            "above 0",
        ),
        (
            {"fair_by": "client_ip", "weights": {"a": "two"}},
            None,
            "sources[0].weights.a",
            "above 0",
        ),
        ({"fair_by": "client_ip", "weights": [1]}, None, "sources[0].weights", "mapping"),
        ({"limits": {"max_queued": -1}}, None, "sources[0].limits.max_queued", "at least 0"),
        ({"limits": {"max_in_flight": 1.5}}, None, "sources[0].limits.max_in_flight", "whole"),
        ({"limits": {"tokens": 5}}, None, "sources[0].limits.tokens", "unknown key"),
        ({}, {"fairness": {"output_weight": -1}}, "queue.fairness.output_weight", "0 to 100"),
        ({}, {"fairness": {"output_weight": True}}, "queue.fairness.output_weight", "0 to 100"),
        ({}, {"fairness": {"ratio": 2}}, "queue.fairness.ratio", "unknown key"),
    ],
)
def test_bad_fair_share_keys_name_the_file_and_the_key(
    tmp_path: Path,
    source: dict[str, Any],
    queue: dict[str, Any] | None,
    key: str,
    problem: str,
) -> None:
    path = write(tmp_path, source, queue)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: {key}: ")


def test_the_book_counts_the_last_hour_by_the_minute_and_says_when_it_frees_up() -> None:
    book = TenantBook()
    book.used("s/a", 300, 400.0, now=100.0)  # minute 1 (60-120 s): counts until 3720 s
    book.used("s/a", 300, 400.0, now=200.0)  # minute 3 (180-240 s): until 3840 s
    book.used("s/a", 50, 400.0, now=230.0)  # the same minute: one entry, not one per request
    assert len(book._tenants["s/a"].window) == 2
    assert book.tokens_last_hour("s/a", 250.0) == 650
    assert book.over_tokens("s/a", 1000, 250.0) is None
    assert book.over_tokens("s/a", 650, 250.0) == 3720 - 250  # when minute 1 ages out
    assert book.over_tokens("s/a", 200, 250.0) == 3840 - 250  # both must age out
    assert book.tokens_last_hour("s/a", 3720.0) == 350
    assert book.tokens_last_hour("s/a", 3840.0) == 0
    assert book.estimate("s/a", 4000) == 400.0  # the recent average, not the body's size
    assert book.estimate("s/new", 4000) == 1000.0  # bytes / 4


def test_the_book_forgets_idle_tenants_and_bounds_its_shares() -> None:
    book = TenantBook()
    for i in range(1000):
        book.used(f"s/{i}", i + 1, float(i), now=0.0)
    shares = book.shares(1.0, top=10)
    assert len(shares) == 11 and shares[-1][0] == "other"
    assert [s[0] for s in shares[:3]] == ["s/999", "s/998", "s/997"]
    assert sum(s[1] for s in shares) == sum(range(1, 1001))
    for i in range(300):
        book.used(f"t/{i}", 1, 1.0, now=2 * HOUR)  # the first thousand are an hour old
    assert len(book) < 700
    book.joined("w/x")
    assert book.waiting("w/x") == 1
    book.left("w/x")
    book.left("w/x")
    assert book.waiting("w/x") == 0


@pytest.mark.parametrize(
    "heading", ["## Fair between users of Open WebUI", "## Fair between scripts by API key"]
)
def test_the_cookbook_fair_share_recipes_pass_check_and_explain_as_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, heading: str
) -> None:
    page = (ROOT / "docs" / "cookbook.md").read_text()
    section = page.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    recipe = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    command = section.split("```sh\n", 1)[1].split("```", 1)[0].strip()
    expected = section.split("```text\n", 1)[1].split("```", 1)[0].strip()
    doc = yaml.safe_load((ROOT / "config" / "seadragon.yaml").read_text())
    doc.update(recipe)  # its sources and default_source replace the shipped ones
    doc["whitelist"]["database"] = str(tmp_path / "seadragon.db")
    config = tmp_path / "seadragon.yaml"
    config.write_text(yaml.safe_dump(doc))
    assert main(["check", "--config", str(config)]) == 0
    assert "[fair by " in capsys.readouterr().out
    words = shlex.split(command)
    assert words[0] == "seadragon-proxy"
    assert main([*words[1:], "--config", str(config)]) == 0
    out = capsys.readouterr().out
    for line in expected.splitlines():
        assert line in out
