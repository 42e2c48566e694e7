"""The process-wide registry of qdrant-client's local-mode clients, one per folder."""

from __future__ import annotations

import atexit
import threading
from pathlib import Path
from typing import Any

from knn_store.errors import StoreUnavailable
from knn_store.store.client_errors import describe_error


class SharedLocalClients:
    """One qdrant-client per local-mode folder in this process, shared by its collections.

    Local mode locks its folder for one client, so two collections of one folder (rebuild
    copies between them) must go through the same client; it closes with the last user.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[Path, tuple[Any, int]] = {}
        atexit.register(self.close_all)  # a store left open: close it while Python still can

    def close_all(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client, _ in clients:
            client.close()

    def acquire(self, folder: Path) -> Any:
        from qdrant_client import QdrantClient

        key = folder.resolve()
        with self._lock:
            if key in self._clients:
                client, users = self._clients[key]
                self._clients[key] = (client, users + 1)
                return client
            try:
                client = QdrantClient(path=str(folder))
            except Exception as exc:  # portalocker's lock, or an unreadable folder
                raise StoreUnavailable(
                    f"cannot open qdrant-client local storage {folder}: {describe_error(exc)}"
                ) from exc
            self._clients[key] = (client, 1)
            return client

    def release(self, folder: Path) -> None:
        key = folder.resolve()
        with self._lock:
            if key not in self._clients:
                return
            client, users = self._clients.pop(key)
            if users > 1:
                self._clients[key] = (client, users - 1)
                return
        client.close()


LOCAL_CLIENTS = SharedLocalClients()
