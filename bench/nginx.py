"""nginx round robin over N upstreams: the "plain load balancer" column of the fleet scenarios.

Debian's nginx (``scripts/ensure-nginx``), started by the bench on a free port with a
temporary prefix and config, in the foreground (``daemon off``), one worker, no logs, and
stopped after. Round robin is nginx's default; no ``max_conns``, as a balancer in front of
Ollama is usually set up, so each server's own queue takes what it is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from .children import START_TIMEOUT, Child, die_with_parent
from .rpc import ChildError

CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str | None:
    named = os.environ.get("SEADRAGON_NGINX")
    for candidate in (named, shutil.which("nginx"), *CANDIDATES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def nginx_config(port: int, upstreams: Sequence[int], prefix: Path) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstreams)
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix / "body"};
    proxy_temp_path {prefix / "proxy"};
    fastcgi_temp_path {prefix / "fastcgi"};
    uwsgi_temp_path {prefix / "uwsgi"};
    scgi_temp_path {prefix / "scgi"};
    upstream ollama {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def _listening(port: int, process: asyncio.subprocess.Process) -> None:
    """Until nginx accepts on ``port`` (start-up only, bounded: nginx cannot take a socket
    from its parent, so its readiness is a connect that succeeds)."""
    delay = 0.01
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if process.returncode is not None:
                raise ChildError(f"nginx exited with {process.returncode}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)


@contextlib.asynccontextmanager
async def nginx_round_robin(
    nginx: str, workdir: Path, upstreams: Sequence[int]
) -> AsyncIterator[Child]:
    prefix = workdir / "nginx"
    for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = prefix / "nginx.conf"
    config.write_text(nginx_config(port, upstreams, prefix))
    log = prefix / "stderr.log"
    args = (nginx, "-p", str(prefix), "-c", str(config))
    check = await asyncio.create_subprocess_exec(
        *args, "-t", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await check.communicate()
    if check.returncode != 0:
        raise ChildError(f"nginx -t rejected {config}:\n{output.decode(errors='replace')}")
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    child = Child("nginx", process, log, {"port": port})
    try:
        await _listening(port, process)
        yield child
    finally:
        await child.stop()


async def nginx_version(nginx: str) -> str:
    process = await asyncio.create_subprocess_exec(
        nginx, "-v", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return output.decode(errors="replace").strip().removeprefix("nginx version: ")
