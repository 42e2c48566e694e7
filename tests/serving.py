"""A real uvicorn server over an app, in a thread, on a free loopback port: what the tests
of the service, the OpenAI client, the page and the limits run against."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


class UvicornThread:
    """``with UvicornThread(app) as served:`` serves ``app`` at ``served.url`` until the
    block ends, then stops the server (its lifespan closes the app's batcher) and checks
    that its thread ended. ``shutdown_timeout`` runs `knnlm serve`'s own server class, with
    its shutdown deadline."""

    def __init__(
        self, app: Any, *, log_level: str = "warning", shutdown_timeout: float | None = None
    ) -> None:
        import uvicorn

        from knnlm.service.http_protocol import protocol_class

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if shutdown_timeout is None:
            config = uvicorn.Config(
                app, log_config=None, log_level=log_level, http=protocol_class()
            )
            self.server = uvicorn.Server(config)
        else:
            from knnlm.serve import _GRACE_SHARE, _server_class

            config = uvicorn.Config(
                app,
                log_config=None,
                log_level=log_level,
                http=protocol_class(),
                timeout_graceful_shutdown=shutdown_timeout * _GRACE_SHARE,
            )
            self.server = _server_class()(
                config, batcher=app.state.batcher, shutdown_timeout=shutdown_timeout
            )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive()

    def connect(self) -> socket.socket:
        """A raw connection to the server, for what an HTTP client would not send."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)
