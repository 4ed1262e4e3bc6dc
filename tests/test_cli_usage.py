"""The command line as a new user meets it: one sentence per error, exit 2 for bad usage,
control characters escaped in everything it prints."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from seadragon_proxy.cli import main
from seadragon_proxy.history import History
from seadragon_proxy.record import RequestRecord
from seadragon_proxy.settings import HistorySettings

CONFIG = "sources: [{name: a, priority: 1}]\ndefault_source: a\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--port", "99999"], "'99999' is not a port number"),
        (["serve", "--port", "-1"], "is not a port number"),
        (["stats", "--since", "5x"], "argument --since"),
        (["explain", "--ip", "999.1.1.1"], "'999.1.1.1' is not an IP address"),
        (["whitelist"], "the following arguments are required"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_usage_is_one_sentence_and_exit_2(
    capsys: pytest.CaptureFixture[str], config: Path, argv: list[str], message: str
) -> None:
    code = main([*argv, "--config", str(config)] if len(argv) > 1 else argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and "usage:" not in err


def test_serve_with_a_bad_port_in_a_real_process(config: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "seadragon_proxy", "serve", "--port", "99999", "--config",
         str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


ESC = "\x1b]0;pwned\x07\x1b[2J"


def test_stats_escapes_model_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG + "whitelist: {database: db.sqlite}\n")

    async def fill() -> None:
        history = History(tmp_path / "db.sqlite", HistorySettings())
        await history.ensure()
        history.record(
            RequestRecord(id="1", method="POST", route="/api/chat", client_ip="10.0.0.1",
                          source="a", model=f"evil{ESC}", status=200)
        )  # fmt: skip
        await history.flush()

    asyncio.run(fill())
    assert main(["stats", "--config", str(tmp_path / "c.yaml")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "evil\\x1b]0;pwned" in out


def test_check_and_errors_escape_names_from_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('sources: [{name: "a\\e[2J", priority: 1}]\ndefault_source: "a\\e[2J"\n')
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "a\\x1b[2J" in out
    path.write_text('sources: [{name: a, priority: 1, "x\\e[2J": 1}]\ndefault_source: a\n')
    assert main(["check", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "x\\x1b[2J" in err
