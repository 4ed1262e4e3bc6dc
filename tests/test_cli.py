"""The command line: check, explain and whitelist, their output and exit codes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seadragon_proxy.cli import main

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "seadragon.yaml"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """The shipped config, with its database moved into the test's directory."""
    doc = yaml.safe_load(SHIPPED.read_text())
    doc["whitelist"]["database"] = "data/seadragon.db"
    path = tmp_path / "seadragon.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_prints_the_rules_in_order(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, err = run(capsys, "check", "--config", str(config))
    assert code == 0 and err == ""
    assert out.splitlines()[0] == f"{config}: OK"
    rules = [line.split()[1] for line in out.splitlines() if line.startswith("  [")]
    assert rules == ["coding", "chat", "scripts", "direct_api"]
    assert "path_prefix /s/coding; whitelisted true" in out  # Continue's apiBase, not its UA
    assert "api_key scripts  [requires whitelist]" in out
    assert "note: match.api_key names 'scripts', which is not a key yet" in out
    assert main(["keys", "add", "scripts", "--config", str(config)]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "check", "--config", str(config))
    assert code == 0 and "note:" not in out
    assert "[requires whitelist]" in out and "default_source: direct_api" in out


def test_check_uses_seadragon_config_when_no_flag(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEADRAGON_CONFIG", str(config))
    assert run(capsys, "check")[0] == 0


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("max_size: 512", "max_size: -1", "queue.max_size: must be at least 1"),
        ("default_source: direct_api", "default_source: nobody", "'nobody' names no source"),
        ("sources:", "sources: {", "not valid YAML"),
        ("slots: 1", "slots: two", "upstream.slots: must be a whole number"),
        ("queue:", "queue:\n  colour: blue", "queue.colour: unknown key"),
    ],
)
def test_check_fails_naming_file_and_key(
    capsys: pytest.CaptureFixture[str], config: Path, old: str, new: str, message: str
) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    code, out, err = run(capsys, "check", "--config", str(config))
    assert code == 1 and out == ""
    assert err.startswith(f"seadragon-proxy: {config}: ") and message in err


def test_explain_a_coding_tool(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """Continue as it really is: apiBase http://gpu:11435/s/coding, its own User-Agent."""
    code, out, _ = run(
        capsys, "explain", "--config", str(config), "--path", "/s/coding/api/chat",
        "--header", "User-Agent: ollama-js/0.6.4 (x64 linux Node.js/v20.20.2)",
    )  # fmt: skip
    assert code == 0
    assert "source:    coding (priority 0)" in out
    assert "rule sources[0] 'coding' matched: path_prefix '/s/coding'" in out
    assert "path:      under /s/coding; Ollama sees /api/chat" in out
    assert "queued at priority 0" in out
    assert "tenant:    coding (fair_by none: the whole source is one tenant)" in out


def test_explain_a_user_agent_alone_is_not_coding(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    """The shipped rules no longer trust a User-Agent: Continue's is not what it sends."""
    code, out, _ = run(
        capsys, "explain", "--config", str(config), "--header", "User-Agent: Continue/1.2"
    )
    assert code == 0 and "source:    direct_api (priority 10)" in out


def test_explain_a_stranger_under_the_coding_prefix(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, out, _ = run(
        capsys, "explain", "--config", str(config), "--ip", "203.0.113.7",
        "--path", "/s/coding/api/chat",
    )  # fmt: skip
    assert code == 0
    assert "source:    direct_api (priority 10)" in out
    assert "refused with 403" in out


def test_explain_a_metadata_route(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(
        capsys, "explain", "--config", str(config), "--method", "GET", "--path", "/api/tags"
    )
    assert code == 0 and "forwarded at once" in out
    assert "tenant:    none (never queued)" in out


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["--ip", "not-an-ip"], "'not-an-ip' is not an IP address", 2),
        (["--header", "no colon"], "must look like 'Name: value'", 2),
    ],
)
def test_explain_refuses_bad_input(
    capsys: pytest.CaptureFixture[str], config: Path, argv: list[str], message: str, code: int
) -> None:
    got, _, err = run(capsys, "explain", "--config", str(config), *argv)
    assert got == code and message in err


def test_whitelist_add_list_remove(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    db = config.parent / "data" / "seadragon.db"
    code, out, _ = run(
        capsys, "whitelist", "add", "10.0.0.0/8", "--note", "office", "--config", str(config)
    )
    assert code == 0 and out.strip() == f"added 10.0.0.0/8 in {db}"
    code, out, _ = run(capsys, "whitelist", "list", "--config", str(config))
    assert code == 0
    assert sorted(line.split()[0] for line in out.splitlines()) == [
        "10.0.0.0/8",
        "127.0.0.1",
        "::1",
    ]
    assert "office" in out
    code, out, _ = run(capsys, "whitelist", "remove", "10.0.0.0/8", "--config", str(config))
    assert code == 0 and out.strip() == f"removed 10.0.0.0/8 from {db}"
    code, out, _ = run(capsys, "whitelist", "remove", "127.0.0.1", "--config", str(config))
    assert code == 0 and "now refused by sources that require the whitelist" in out


def test_whitelist_list_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    import json

    assert run(capsys, "whitelist", "add", "10.1.0.0/16", "--config", str(config))[0] == 0
    code, out, _ = run(capsys, "whitelist", "list", "--json", "--config", str(config))
    assert code == 0
    assert sorted(row["network"] for row in json.loads(out)) == ["10.1.0.0/16", "127.0.0.1", "::1"]


@pytest.mark.parametrize("action", [["list"], ["remove", "10.0.0.1"]])
def test_whitelist_on_a_missing_database_says_how_it_comes_about(
    capsys: pytest.CaptureFixture[str], config: Path, action: list[str]
) -> None:
    code, out, err = run(capsys, "whitelist", *action, "--config", str(config))
    assert code == 1 and out == ""
    assert "does not exist yet; it is created (with loopback on it) when the proxy starts" in err
    assert not (config.parent / "data" / "seadragon.db").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "10.0.0.7/8"], "has host bits set; did you mean 10.0.0.0/8?"),
        (["add", "300.1.1.1"], "'300.1.1.1' is not an IP address"),
        (["add", "10.0.0.0/8; rm -rf /"], "prefix length must be a number"),
        (["remove", "10.9.9.9"], "10.9.9.9 is not on the whitelist"),
    ],
)
def test_whitelist_refuses_with_a_message(
    capsys: pytest.CaptureFixture[str], config: Path, argv: list[str], message: str
) -> None:
    assert run(capsys, "whitelist", "add", "10.2.2.2", "--config", str(config))[0] == 0
    capsys.readouterr()
    code, out, err = run(capsys, "whitelist", *argv, "--config", str(config))
    assert code == 1 and out == ""
    assert err.startswith("seadragon-proxy: ") and message in err


def test_whitelist_on_a_corrupt_database_says_what_to_do(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    db = config.parent / "data" / "seadragon.db"
    db.parent.mkdir()
    db.write_bytes(b"\x00garbage" * 64)
    code, _, err = run(capsys, "whitelist", "list", "--config", str(config))
    assert code == 1 and "move it aside" in err


def test_whitelist_while_another_writer_holds_the_lock(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("seadragon_proxy.whitelist.BUSY_TIMEOUT", 0.1)
    assert run(capsys, "whitelist", "add", "10.2.2.2", "--config", str(config))[0] == 0
    other = sqlite3.connect(config.parent / "data" / "seadragon.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        code, _, err = run(capsys, "whitelist", "add", "10.1.1.1", "--config", str(config))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert code == 1 and "locked by another writer; try again in a moment" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["whitelist"]) == 2


def test_the_installed_command_and_module_run(config: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "seadragon_proxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "coding" in done.stdout
    script = Path(sys.executable).parent / "seadragon-proxy"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("seadragon-proxy ")


def test_explain_on_an_unreadable_database_says_so(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    db = config.parent / "data" / "seadragon.db"
    db.parent.mkdir()
    db.write_bytes(b"not sqlite" * 100)
    code, _, err = run(capsys, "explain", "--config", str(config))
    assert code == 1 and "corrupt" in err  # not mistaken for "no database yet"
