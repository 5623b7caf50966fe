"""tools/comfy_client.py starts the right server when its free port is taken before ComfyUI binds it.

tools/test.sh runs two test streams side by side, each starting servers on ports from ``free_port()``; a
port free when chosen can be taken by the other stream's server in the seconds before ComfyUI binds it.
These tests stand a small stand-in for ComfyUI's ``main.py`` in a folder (it binds ``--port`` and answers
``/system_stats`` with its argv, as ComfyUI does, or exits with the bind error ComfyUI prints), so they need
no ComfyUI and take a second.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from comfy_client import ComfyServer  # noqa: E402

STAND_IN = '''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])

class Stats(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"system": {"argv": sys.argv}}).encode()
        self.send_response(200 if self.path == "/system_stats" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

try:
    server = HTTPServer(("127.0.0.1", port), Stats)
except OSError as err:
    print(f"OSError: [Errno {err.errno}] error while attempting to bind on address ('127.0.0.1', {port}): "
          "address already in use", flush=True)
    sys.exit(1)
print("Starting server", flush=True)
server.serve_forever()
'''


@pytest.fixture
def comfy_dir(tmp_path) -> Path:
    folder = tmp_path / "ComfyUI"
    folder.mkdir()
    (folder / "main.py").write_text(STAND_IN)
    return folder


def own_argv(server: ComfyServer) -> list[str]:
    return server.get_json("/system_stats")["system"]["argv"]


def test_a_port_taken_before_the_server_binds_it_is_given_up_for_another(comfy_dir, tmp_path):
    with ComfyServer(tmp_path / "first", comfy_dir=comfy_dir) as first:
        second = ComfyServer(tmp_path / "second", comfy_dir=comfy_dir)
        second.port, second.url = first.port, first.url   # as if the other stream's server had won the race
        with second:
            assert second.port != first.port
            # Each answers as itself: the second never took the first's answer for its own.
            assert str(tmp_path / "second" / "output") in own_argv(second)
            assert str(tmp_path / "first" / "output") in own_argv(first)
            assert "address already in use" not in second.log_tail()   # the log is the run that started


def test_a_server_that_exits_for_another_reason_is_reported_with_its_log(comfy_dir, tmp_path):
    (comfy_dir / "main.py").write_text("import sys\nprint('no such option', flush=True)\nsys.exit(2)\n")
    with pytest.raises(RuntimeError, match=r"ComfyUI exited with 2 while starting:\nno such option"):
        ComfyServer(tmp_path / "run", comfy_dir=comfy_dir).start(timeout=30)


def test_a_port_that_stays_taken_is_given_up_after_three_tries(comfy_dir, tmp_path):
    (comfy_dir / "main.py").write_text("import sys\nprint('[Errno 98] address already in use', flush=True)\n"
                                       "sys.exit(1)\n")
    with pytest.raises(RuntimeError, match=r"ComfyUI found no free port in 3 tries:\n\[Errno 98\] address already in"):
        ComfyServer(tmp_path / "run", comfy_dir=comfy_dir).start(timeout=30)
