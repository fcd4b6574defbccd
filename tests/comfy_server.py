"""A real ComfyUI server in its own process, on the loopback, with this pack installed the way users install it
(a folder in custom_nodes/ under a hyphenated name). Used by the HTTP tests and the browser tier."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from preprint.runner.comfy_host import PACK_DIR, server_flags

HYPHENATED_NAME = "comfyui-preprint"


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@contextmanager
def comfy_server(comfy_path: Path, base: Path, timeout: float = 300.0) -> Iterator[str]:
    """Start ComfyUI with ``base`` as its base directory; yield its URL once it answers; stop it afterwards."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / HYPHENATED_NAME
    if not link.exists():
        os.symlink(PACK_DIR, link)
    port = free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
                                 *server_flags(comfy_path)],
                                cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise ServerError("ComfyUI exited:\n" + log_path.read_text()[-3000:])
                try:
                    get_json(url + "/system_stats")
                    break
                except OSError:
                    if time.time() > deadline:
                        raise ServerError("ComfyUI server did not start:\n" + log_path.read_text()[-3000:]) from None
                    time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
