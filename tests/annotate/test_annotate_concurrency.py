"""Concurrency and crash safety against a real server process on 127.0.0.1.

1. 50 annotators (threads) submit 20 labels each, retrying some submissions sequentially and
   sending some twice at the same moment: exactly 1,000 labels, no duplicates, overlap respected.
2. The server is SIGKILLed while 50 annotators are submitting, then restarted on the same database:
   every submission it acknowledged with a 2xx is there, and labelling carries on.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from annotate_helpers import (
    DB_KINDS,
    LeanClient,
    Server,
    db_url_fixture,
    new_store,
    setup_project,
    write_pairs,
)
from sqlalchemy import func, select, text

from rlhfkit.annotate.models import Assignment, Label

N_ANNOTATORS, PER_ANNOTATOR = 50, 20
_db_url = pytest.fixture(name="db_url", params=DB_KINDS)(db_url_fixture)


def label_loop(url: str, token: str, n: int, seed: int, acked: list, stop: threading.Event | None = None) -> int:
    """Sign in and label up to ``n`` pairs; append every 2xx-acknowledged submission id to ``acked``.

    Every 4th submission is retried after its success (must be a 200 replay); every 5th is sent twice
    at once over two connections (one 201, one 200). Returns how many labels were acknowledged;
    stops at the first connection error when ``stop`` is given (the server was killed).
    """
    rng = random.Random(seed)
    done = 0
    client, twin = LeanClient(url), LeanClient(url)
    try:
        with ThreadPoolExecutor(1) as other:
            headers = {"X-CSRF-Token": client.sign_in(token)}
            twin.cookie = client.cookie
            for k in range(n):
                if stop is not None and stop.is_set():
                    break
                try:
                    status, nxt = client.request("GET", "/api/next")
                    assert status == 200, nxt
                    if nxt["item"] is None:
                        break
                    body = {"submission_id": f"s{seed:03d}-{k:04d}", "assignment_id": nxt["item"]["assignment_id"],
                            "choice": rng.choice(["left", "right", "tie"]), "duration_ms": rng.randint(500, 9000)}
                    if k % 5 == 0:
                        second = other.submit(twin.request, "POST", "/api/labels", body, headers)
                        first = client.request("POST", "/api/labels", body, headers)
                        codes = sorted([first[0], second.result()[0]])
                        assert codes == [200, 201], (codes, first, second.result())
                    else:
                        status, reply = client.request("POST", "/api/labels", body, headers)
                        assert status == 201, reply
                    acked.append(body["submission_id"])
                    done += 1
                    if k % 4 == 0:
                        status, reply = client.request("POST", "/api/labels", body, headers)
                        assert status == 200 and reply["replayed"], reply
                except LeanClient.TRANSPORT_ERRORS:
                    if stop is None:
                        raise
                    acked.append(None)  # marks a request cut off by the kill
                    return done
    finally:
        client.close()
        twin.close()
    return done


def run_annotators(url: str, tokens: dict, n: int, acked: list, stop=None, seed0: int = 0) -> list[int]:
    with ThreadPoolExecutor(len(tokens)) as pool:
        futures = [pool.submit(label_loop, url, tok, n, seed0 + i, acked, stop) for i, tok in enumerate(tokens.values())]
        return [f.result() for f in futures]


def test_fifty_annotators_thousand_labels_no_duplicates(db_url, tmp_path):
    store = new_store(db_url)
    names = [f"ann{i:02d}" for i in range(N_ANNOTATORS)]
    tokens = setup_project(store, tmp_path, n_pairs=400, overlap=3, annotators=names)
    acked: list[str] = []
    with Server(db_url) as server:
        counts = run_annotators(server.url, tokens, PER_ANNOTATOR, acked)
    assert counts == [PER_ANNOTATOR] * N_ANNOTATORS
    with store.db.read() as s:
        n_labels = s.scalar(select(func.count()).select_from(Label))
        n_sids = s.scalar(select(func.count(func.distinct(Label.submission_id))))
        per_pair = s.execute(select(Label.pair_id, func.count()).group_by(Label.pair_id)).all()
        per_seen = s.execute(select(func.count()).select_from(Assignment)
                             .group_by(Assignment.pair_id, Assignment.annotator_id)).scalars().all()
        stored = set(s.scalars(select(Label.submission_id)))
    assert n_labels == n_sids == len(acked) == 1000
    assert stored == set(acked)
    assert max(n for _, n in per_pair) <= 3 and set(per_seen) == {1}


def test_sigkill_loses_no_acknowledged_label(tmp_path):
    db = f"sqlite:///{tmp_path / 'crash.db'}"
    store = new_store(db)
    names = [f"ann{i:02d}" for i in range(N_ANNOTATORS)]
    tokens = setup_project(store, tmp_path, n_pairs=600, overlap=3, annotators=names)
    acked: list[str] = []
    stop = threading.Event()
    server = Server(db).start()
    try:
        with ThreadPoolExecutor(1) as bg:
            running = bg.submit(run_annotators, server.url, tokens, 1000, acked, stop)
            deadline = time.monotonic() + 30
            while len(acked) < 200 and time.monotonic() < deadline and not running.done():
                time.sleep(0.02)
            server.kill()  # mid-run: requests are in flight
            stop.set()
            running.result(timeout=60)
    finally:
        server.stop()
    cut_off = acked.count(None)
    acked = [sid for sid in acked if sid is not None]
    assert len(acked) >= 200, "the run did not get going before the kill"
    assert cut_off >= 1, "no request was in flight when the server was killed"

    with Server(db) as again:
        with store.db.read() as s:
            stored = set(s.scalars(select(Label.submission_id)))
            assert s.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        missing = set(acked) - stored
        assert not missing, f"{len(missing)} acknowledged labels lost, e.g. {sorted(missing)[:5]}"
        more: list[str] = []
        extra = label_loop(again.url, tokens["ann00"], 3, seed=999, acked=more)
        assert extra == 3
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == len(stored) + 3


def test_pairs_can_be_imported_while_the_server_runs(tmp_path):
    db = f"sqlite:///{tmp_path / 'live.db'}"
    store = new_store(db)
    tokens = setup_project(store, tmp_path, n_pairs=1, overlap=1, annotators=["alice"])
    with Server(db) as server:
        acked: list[str] = []
        assert label_loop(server.url, tokens["alice"], 5, 1, acked) == 1
        store.admin.import_pairs("demo", write_pairs(tmp_path / "more.jsonl", 2, start=100))
        assert label_loop(server.url, tokens["alice"], 5, 2, acked) == 2
