"""The control plane over the session's two engines: one uvicorn server per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.api_server import TOKEN, ServerThread, free_port, restore


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="module")
def service(fleet, ckpt_root, tiny_model):
    """The control plane over the session's two engines, on a free loopback port."""
    from weightsync.api import create_app
    from weightsync.client import WeightSyncClient
    from weightsync.config import Deadlines, Settings, TransferConfig

    settings = Settings(host="127.0.0.1", port=free_port(), token=TOKEN,
                        load_roots=(str(ckpt_root),), namespace="weightsync-tests")
    # Short rendezvous: a trainer that vanishes costs seconds, not a minute (gloo receivers
    # notice a closed-but-alive peer only at the group's timeout, which is this deadline).
    wire = TransferConfig(bucket_bytes=1 << 20, deadlines=Deadlines(rendezvous=12))
    server = ServerThread(create_app(settings, engines=fleet, transfer=wire), settings.port)
    server.start()
    yield server
    with WeightSyncClient(server.url, token=TOKEN) as c:  # leave the original weights behind
        restore(c)
        c.reload(None)
    server.stop()


@pytest.fixture()
def client(service):
    from weightsync.client import WeightSyncClient

    with WeightSyncClient(service.url, token=TOKEN) as c:
        yield c
        restore(c)
