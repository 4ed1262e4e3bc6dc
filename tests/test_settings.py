"""Loading the YAML file: defaults, the shipped config, and errors that name file and key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from seadragon_proxy.exceptions import ConfigError
from seadragon_proxy.settings import config_path, load_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"sources": [{"name": "all", "priority": 1}], "default_source": "all"}


def write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "seadragon.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def test_shipped_config_loads_with_the_documented_values() -> None:
    settings = load_settings(ROOT / "config" / "seadragon.yaml")
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 11435)
    assert str(settings.upstream.url) == "http://127.0.0.1:11434"
    assert settings.upstream.slots == 1
    assert (settings.queue.max_size, settings.queue.max_wait, settings.queue.aging) == (512, 0, 0)
    assert [s.name for s in settings.policy.sources] == ["coding", "chat", "scripts", "direct_api"]
    assert settings.policy.default.name == "direct_api"
    assert settings.whitelist.database == ROOT / "config" / "data" / "seadragon.db"
    # The high-priority rules cannot be claimed by a spoofed header alone.
    coding, chat = settings.policy.sources[:2]
    assert coding.match is not None and coding.match.whitelisted is True
    assert chat.match is not None and chat.match.whitelisted is True


def test_defaults_fill_everything_but_sources(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.server.port == 11435
    assert settings.server.max_body == 64 * 1024 * 1024
    assert settings.upstream.idle_timeout == 600
    assert settings.admin.token is None
    assert settings.whitelist.database == tmp_path / "data" / "seadragon.db"


def test_admin_token_comes_from_the_named_variable_and_never_shows(tmp_path: Path) -> None:
    doc = {**MINIMAL, "admin": {"token_env": "MY_TOKEN"}}
    settings = parse_settings(doc, file="f", base=tmp_path, environ={"MY_TOKEN": "s3cret"})
    assert settings.admin.token is not None and settings.admin.token.reveal() == "s3cret"
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (65536, 65536),
        ("64MiB", 64 * 1024**2),
        ("512 KB", 512_000),
        ("1g", 10**9),
        ("2GiB", 2 * 1024**3),
    ],
)
def test_sizes(tmp_path: Path, value: object, expected: int) -> None:
    doc = {**MINIMAL, "server": {"max_body": value}}
    assert parse_settings(doc, file="f", base=tmp_path).server.max_body == expected


def test_flags_override_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL)).override(
        host="0.0.0.0", port=9999, upstream="http://gpu-box:11434"
    )
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9999)
    assert str(settings.upstream.url) == "http://gpu-box:11434"


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEADRAGON_CONFIG", raising=False)
    assert config_path(None) == Path("config/seadragon.yaml")
    monkeypatch.setenv("SEADRAGON_CONFIG", "/etc/seadragon.yaml")
    assert config_path(None) == Path("/etc/seadragon.yaml")
    assert config_path("mine.yaml") == Path("mine.yaml")


@pytest.mark.parametrize(
    ("doc", "key", "problem"),
    [
        ({**MINIMAL, "queue": {"max_size": 0}}, "queue.max_size", "at least 1"),
        ({**MINIMAL, "queue": {"max_size": "lots"}}, "queue.max_size", "whole number"),
        ({**MINIMAL, "queue": {"max_wait": True}}, "queue.max_wait", "number of seconds"),
        ({**MINIMAL, "queue": {"colour": 1}}, "queue.colour", "unknown key"),
        ({**MINIMAL, "servr": {}}, "servr", "unknown key"),
        ({**MINIMAL, "server": {"port": 70000}}, "server.port", "at most 65535"),
        (
            {**MINIMAL, "server": {"trusted_proxies": ["10.0.0.1/8"]}},
            "server.trusted_proxies",
            "host bits",
        ),
        ({**MINIMAL, "server": {"max_body": "huge"}}, "server.max_body", "size such as"),
        ({**MINIMAL, "upstream": {"url": "ftp://x"}}, "upstream.url", "http:// or https://"),
        ({**MINIMAL, "upstream": {"slots": 0}}, "upstream.slots", "at least 1"),
        ({**MINIMAL, "log": {"format": "xml"}}, "log.format", "one of auto, json, console"),
        ({**MINIMAL, "cors": {"allow_origins": "x", "extra": 1}}, "cors.extra", "unknown key"),
        ({"sources": [], "default_source": "a"}, "sources", "non-empty list"),
        ({"default_source": "a"}, "sources", "is missing"),
        ({"sources": [{"name": "a", "priority": 1}]}, "default_source", "is missing"),
        ({**MINIMAL, "default_source": "nobody"}, "default_source", "'nobody' names no source"),
        (
            {
                "sources": [{"name": "a", "priority": 1}, {"name": "a", "priority": 2}],
                "default_source": "a",
            },
            "sources[1].name",
            "used by an earlier source",
        ),
        ({"sources": [{"name": "a"}], "default_source": "a"}, "sources[0].priority", "is missing"),
        (
            {"sources": [{"name": "a", "priority": "high"}], "default_source": "a"},
            "sources[0].priority",
            "whole number",
        ),
        ({"sources": [{"priority": 1}], "default_source": "a"}, "sources[0].name", "is missing"),
        ({"sources": ["coding"], "default_source": "a"}, "sources[0]", "must be a mapping"),
        (
            {
                "sources": [{"name": "a", "priority": 1, "match": {"user_agnet": "x"}}],
                "default_source": "a",
            },
            "sources[0].match.user_agnet",
            "unknown key",
        ),
        (
            {
                "sources": [{"name": "a", "priority": 1, "match": {"user_agent": []}}],
                "default_source": "a",
            },
            "sources[0].match.user_agent",
            "empty list",
        ),
        (
            {
                "sources": [{"name": "a", "priority": 1, "match": {"client_ip": ["10.0.0.300"]}}],
                "default_source": "a",
            },
            "sources[0].match.client_ip",
            "not an IP address",
        ),
        (
            {
                "sources": [{"name": "a", "priority": 1, "match": {"header": {"X-A": 5}}}],
                "default_source": "a",
            },
            "sources[0].match.header.X-A",
            "string or a list of strings",
        ),
        (
            {
                "sources": [{"name": "a", "priority": 1, "require_whitelist": "yes"}],
                "default_source": "a",
            },
            "sources[0].require_whitelist",
            "true or false",
        ),
    ],
)
def test_errors_name_the_file_and_the_key(
    tmp_path: Path, doc: dict, key: str, problem: str
) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "the file is empty"),
        ("sources: [\n  - name: a\n", "line 2, column 3: not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        (
            "server: {port: 1}\nserver: {port: 2}\n",
            "line 2, column 1: not valid YAML: duplicate key 'server'",
        ),
    ],
)
def test_broken_files(tmp_path: Path, text: str, problem: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert str(caught.value).startswith(str(tmp_path / "seadragon.yaml"))
    if problem:
        assert problem in str(caught.value)


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no such file.*SEADRAGON_CONFIG"):
        load_settings(tmp_path / "absent.yaml")


def _alias_bomb(levels: int) -> str:
    """The billion-laughs file: each anchor is a list of nine copies of the one before."""
    lines = ["a0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    # The bomb sits in a value that fails validation, whose message quotes it.
    lines.append(f"server: {{port: *a{levels}}}")
    lines.append("sources: [{name: all, priority: 1}]\ndefault_source: all")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_by_counting_its_aliases(tmp_path: Path) -> None:
    path = write(tmp_path, _alias_bomb(12))  # 9**12 items if expanded: it never is
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}: line ")
    assert "more than 100 YAML aliases" in caught.value.problem
    assert len(str(caught.value)) < 300


def test_a_few_aliases_still_load(tmp_path: Path) -> None:
    text = (
        "sources:\n"
        "  - {name: a, priority: 0, match: {user_agent: &ua ['*aider*']}}\n"
        "  - {name: b, priority: 1, match: {user_agent: *ua, model: 'x*'}}\n"
        "default_source: b\n"
    )
    settings = load_settings(write(tmp_path, text))
    a, b = settings.policy.sources
    assert a.match is not None and b.match is not None
    assert a.match.user_agent == b.match.user_agent


@pytest.mark.parametrize(
    ("doc", "key", "filler"),
    [
        ({**MINIMAL, "server": {"port": "9" * 5000}}, "server.port", "9"),
        ({**MINIMAL, "server": {"port": [["x" * 1000] * 1000] * 1000}}, "server.port", "x"),
        ({**MINIMAL, "upstream": {"url": "ftp://" + "h" * 5000}}, "upstream.url", "h"),
        ({**MINIMAL, "server": {"trusted_proxies": ["1" * 5000]}}, "server.trusted_proxies", "1"),
        ({**MINIMAL, "default_source": "n" * 5000}, "default_source", "n"),
        ({**MINIMAL, "server": {"k" * 5000: 1}}, "server." + "k" * 5000, "k"),
    ],
)
def test_error_messages_quote_a_bounded_part_of_a_value(
    tmp_path: Path, doc: dict[str, object], key: str, filler: str
) -> None:
    """Values are quoted up to 60 characters, keys up to 120, whatever their size."""
    with pytest.raises(ConfigError) as caught:
        parse_settings(doc, file="f.yaml", base=tmp_path)
    assert caught.value.key == key
    limit = 120 if filler == "k" else 60
    assert filler * (limit + 1) not in str(caught.value)
    assert filler * 20 in str(caught.value)  # still quoted: the reader sees what was wrong


def test_a_file_that_is_not_a_mapping_is_not_quoted(tmp_path: Path) -> None:
    """--config pointed at a token file by mistake must not print the token."""
    secret = tmp_path / "token"
    secret.write_text("sk-live-0123456789abcdef\n")
    link = tmp_path / "seadragon.yaml"
    link.symlink_to(secret)
    with pytest.raises(ConfigError) as caught:
        load_settings(link)
    assert "must be a mapping" in caught.value.problem
    assert "sk-live" not in str(caught.value)


def test_twenty_thousand_sources_load_in_linear_time(tmp_path: Path) -> None:
    """The duplicate-name check is a set: 20 000 sources take about a second, not 17 s."""
    lines = ["sources:"]
    lines += [f"  - {{name: s{i}, priority: {i % 10}}}" for i in range(20_000)]
    lines += ["  - {name: s19999, priority: 1}", "default_source: s0"]
    path = write(tmp_path, "\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert time.perf_counter() - started < 8  # 1.1 s here; the quadratic check took 17 s
    assert caught.value.key == "sources[20000].name"
    assert "'s19999' is used by an earlier source" in caught.value.problem


def test_every_settings_key_is_in_the_configuration_reference() -> None:
    """docs/configuration.md has a table row for every key the file can set."""
    from dataclasses import fields

    from seadragon_proxy import settings as s

    reference = (ROOT / "docs" / "configuration.md").read_text()
    sections = {
        "server": s.ServerSettings,
        "upstream": s.UpstreamSettings,
        "queue": s.QueueSettings,
        "whitelist": s.WhitelistSettings,
        "admin": s.AdminSettings,
        "cors": s.CorsSettings,
        "log": s.LogSettings,
        "history": s.HistorySettings,
    }
    from_environment = {"token", "metrics_token"}  # read from the variables the file names
    spelt = {"output_weight": "fairness.output_weight", "redis": "redis.url"}  # sub-sections
    for section, kind in sections.items():
        part = reference.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
        for field in fields(kind):
            if field.name not in from_environment:
                key = spelt.get(field.name, field.name)
                assert f"| `{key}` |" in part, f"{section}.{key}"
