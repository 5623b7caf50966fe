"""Start a real ComfyUI server with the pack, queue workflows over HTTP, follow them, fetch images.

Standard library only (the websocket client is used when installed, for progress and previews),
so the README's demo command needs nothing beyond ComfyUI itself. Used by ``tools/run_workflow.py``
and by the server-tier tests.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("UAC_COMFYUI", ROOT / ".cache" / "ComfyUI"))
PACK_NAME = "unite_and_conquer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExecutionError(RuntimeError):
    def __init__(self, data: dict):
        self.data = data
        super().__init__(f"{data.get('node_type', '?')}: {data.get('exception_message', data)}".strip())


class ComfyServer:
    """``main.py --cpu --listen 127.0.0.1 --port <free>`` with its own output folder and log."""

    def __init__(self, workdir: Path, python: str = sys.executable, extra_args: tuple[str, ...] = (), cpu: bool = True,
                 comfy_dir: Path = COMFY, pack_name: str = PACK_NAME, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.env = dict(env or {})
        self.comfy_dir = Path(comfy_dir)
        self.pack_name = pack_name
        self.python = python
        self.extra_args = list(extra_args)
        self.cpu = cpu
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "comfyui.log"
        self.messages: list[dict] = []

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        # free_port() only finds a port that is free now; another server started in the seconds before
        # ComfyUI binds it (a parallel test run) can take it first. Then this one exits unable to bind,
        # and it starts again on another port.
        for _ in range(3):
            if self._start_once(timeout):
                break
            self.stop()
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        else:
            raise RuntimeError(f"ComfyUI found no free port in 3 tries:\n{self.log_tail()}")
        failed = self.import_failures()
        if failed:
            self.stop()
            raise RuntimeError(f"ComfyUI could not import the pack:\n{failed}\n{self.log_tail()}")
        return self

    def _start_once(self, timeout: float) -> bool:
        """Starts the server and waits until it answers; False when its port was taken meanwhile."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        out_dir = self.workdir / "output"
        # LoadImage lists the input folder when /object_info is built: it must exist.
        (self.workdir / "input").mkdir(exist_ok=True)
        args = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--output-directory", str(out_dir), "--input-directory", str(self.workdir / "input"),
                "--disable-auto-launch", *self.extra_args]
        if self.cpu:
            args.insert(2, "--cpu")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if "address already in use" in self.log_tail().lower():
                    return False
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                stats = self.get_json("/system_stats", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, RuntimeError):
                time.sleep(0.5)
                continue
            # The server that answers must be this one, not another that took the port first.
            if str(out_dir) in stats.get("system", {}).get("argv", []):
                return True
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def import_failures(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(l for l in lines if "IMPORT FAILED" in l and self.pack_name in l)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as when a machine drops out: no shutdown handlers run."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- HTTP ------------------------------------------------------------------------------

    def request(self, path: str, data: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def object_info_and_log(self) -> tuple[dict, str]:
        """Start, read /object_info and the server's log, stop: what an install check looks at."""
        self.start()
        try:
            return self.get_json("/object_info"), self.log_path.read_text(errors="replace")
        finally:
            self.stop()

    def get_json(self, path: str, timeout: float = 30):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, answer): prompt_id, or the validation errors."""
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            return status, json.loads(body)
        except json.JSONDecodeError:
            return status, {"raw": body.decode(errors="replace")}

    def interrupt(self) -> None:
        self.request("/interrupt", {})

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Follow a prompt to its end over the websocket (or /history); raises ExecutionError."""
        try:
            import websocket  # websocket-client, a test dependency
        except ImportError:
            websocket = None
        deadline = time.time() + timeout
        if websocket is not None:
            ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=5)
            try:
                while time.time() < deadline:
                    entry = self.history(prompt_id)
                    if entry and entry.get("status", {}).get("completed") is not None and \
                            entry["status"].get("status_str") in ("success", "error"):
                        break
                    try:
                        msg = ws.recv()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if isinstance(msg, bytes):
                        self.messages.append({"type": "preview", "bytes": len(msg)})
                        continue
                    data = json.loads(msg)
                    self.messages.append(data)
                    d = data.get("data", {})
                    if d.get("prompt_id") not in (None, prompt_id):
                        continue
                    if data["type"] == "execution_error":
                        raise ExecutionError(d)
                    if data["type"] == "executing" and d.get("node") is None and d.get("prompt_id") == prompt_id:
                        break
            finally:
                ws.close()
        while time.time() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                if entry["status"]["status_str"] == "error":
                    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    raise ExecutionError(errors[0] if errors else entry["status"])
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")

    def images(self, entry: dict) -> list[tuple[str, bytes]]:
        """Every image a finished prompt saved, fetched through /view."""
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                            "type": img.get("type", "output")})
                status, body = self.request(f"/view?{q}")
                if status != 200:
                    raise RuntimeError(f"/view {img['filename']}: HTTP {status}")
                out.append((img["filename"], body))
        return out

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        status, answer = self.queue(prompt)
        if status != 200:
            raise RuntimeError(f"ComfyUI refused the workflow (HTTP {status}): {json.dumps(answer)[:2000]}")
        return self.wait(answer["prompt_id"], timeout)


def load_api_workflow(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    if "nodes" in wf and "links" in wf:
        raise ValueError(f"{path} is a UI-format workflow; use its API-format copy in example_workflows/api/")
    return wf
