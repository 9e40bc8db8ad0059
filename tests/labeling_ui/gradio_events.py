"""Run the app's Gradio events through Gradio's own queue routes, as a browser does."""

import json
import os
from typing import Any

from fastapi.testclient import TestClient


def run_event(client: TestClient, elem_id: str | None, event: str, data: list[Any],
              session: str | None = None) -> dict[str, Any]:
    """The ``process_completed`` message of one UI event (``elem_id=None``: the page's load
    event), in Gradio session ``session`` (a new one when ``None``)."""
    cfg = client.get("/config").json()
    comp = None if elem_id is None else next(
        c["id"] for c in cfg["components"] if c.get("props", {}).get("elem_id") == elem_id)
    dep = next(d for d in cfg["dependencies"]
               if any(t[1] == event and (comp is None or t[0] == comp) for t in d["targets"]))
    session = session or f"s{os.urandom(6).hex()}"
    r = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": dep["id"], "session_hash": session,
                                                   "trigger_id": comp, "event_data": None})
    assert r.status_code == 200, r.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg  # type: ignore[no-any-return]
    raise AssertionError("the event did not complete")
