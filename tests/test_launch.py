"""hub_cli.launch.running_server: a SIGTERM to the command stops the server it started (chat, webui)."""

import os
import signal
import socket
import sys

import pytest

from hub_cli.launch import running_server

# A stand-in server: answers 200 on /health, like vLLM's API server once it is up.
FAKE_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_inside_the_block_stops_the_server():
    port = _free_port()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt):
            with running_server([sys.executable, "-c", FAKE_SERVER, str(port)], dict(os.environ),
                                f"http://127.0.0.1:{port}", timeout_s=60) as proc:
                assert proc.poll() is None
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pthread_kill(signal.pthread_self(), 0)  # let the handler run before leaving the block
        assert proc.poll() is not None, "the server outlived the command"
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is put back
    finally:
        signal.signal(signal.SIGTERM, previous)


_KILLED_INSIDE = """
import os, signal, sys, time
from hub_cli.launch import sigterm_as_interrupt
try:
    with sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
except KeyboardInterrupt:
    print("cleaned up", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    sys.exit(130)
"""


def test_sigterm_is_an_interrupt_inside_the_block_and_default_after():
    """hub_cli webui on a server URL (no server of its own) ends on SIGTERM through its cleanup, exit 130."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _KILLED_INSIDE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 130 and res.stdout.strip() == "cleaned up True", (res.returncode, res.stderr[-500:])
