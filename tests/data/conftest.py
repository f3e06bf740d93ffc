"""Fixtures of the data tests."""

import functools
import http.server
import threading

import pytest


@pytest.fixture
def http_server(tmp_path):
    """(folder, base URL) of an HTTP server on 127.0.0.1 serving the folder, for downloads."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
