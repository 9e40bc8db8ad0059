import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from agile_pipeline.lib.state import StateStore
from labeling_ui.app import build_app
from labeling_ui.config import UiSettings
from labeling_ui.launch import server_config
from labeling_ui.service import LabelingService
from tests.hostile_images import write_real_like_images
from tests.labeling_ui.fakes import FakeTrigger, ingest_images

# the address test clients use: the app answers only to its own host names (DNS rebinding)
LOCAL = "http://127.0.0.1"


@dataclass
class World:
    home: Path
    store: StateStore
    ids: list[str]
    trigger: FakeTrigger
    fallback: FakeTrigger
    service: LabelingService


@pytest.fixture(scope="session")
def picture_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    write_real_like_images(folder, 60, 1)
    return folder


@pytest.fixture
def world(agile_home: Path, picture_folder: Path) -> World:
    """A data directory with 60 ingested pictures, a fake pipeline and the app's service."""
    store = StateStore(agile_home / "agile.sqlite")
    corpus = agile_home.parent / "corpus"
    shutil.copytree(picture_folder, corpus)
    ids = ingest_images(store, corpus, 60, seed=1)
    trigger = FakeTrigger(store, ids)
    fallback = FakeTrigger(store, ids, kind="in-process")
    service = LabelingService(store, trigger, home=agile_home, fallback=fallback, encoder_spec="random:32")
    return World(agile_home, store, ids, trigger, fallback, service)


@pytest.fixture
def concept_with_batch(world: World) -> str:
    world.service.ratings.create_concept("red things", "red apple\nfire truck", "orange", "Only red.", owner="alice")
    world.service.rounds.start_concept("red things", requested_by="alice")
    return "red things"


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    app = build_app(UiSettings(home=world.home), service=world.service)
    with TestClient(app, base_url=LOCAL) as c:
        yield c


@pytest.fixture
def auth_client(world: World) -> Iterator[TestClient]:
    settings = UiSettings(home=world.home, auth=[("alice", "pw-a"), ("bob", "pw-b")], login_max_failures=3)
    app = build_app(settings, service=world.service)
    with TestClient(app, base_url=LOCAL) as c:
        yield c


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free local port in a thread; yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = getattr(app.state, "settings", None) or UiSettings()
    # served as `agile app` serves it (no client address taken from forwarded headers); without
    # uvicorn's logging.config.dictConfig: run while an earlier app's warm-up thread logs through
    # Dagster's handler, its module-lock/handler-lock order deadlocks (seen under load)
    server = uvicorn.Server(server_config(app, dataclasses.replace(settings, host="127.0.0.1"), port=port,
                                          log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the app server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def raw_get(base_url: str, raw_path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (no client-side normalisation of ``..`` or ``%2f``)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture
def server(world: World) -> Iterator[str]:
    app = build_app(UiSettings(home=world.home), service=world.service)
    with live_server(app) as url:
        yield url
