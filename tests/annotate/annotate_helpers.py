"""Shared fixtures and helpers for the tests/test_annotate_*.py files.

The ``db_url`` fixture runs a test once on SQLite and once on PostgreSQL when ``RLHFKIT_TEST_PG`` is set (each
PostgreSQL test gets its own schema through ``search_path``, dropped afterwards).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PG_ENV = "RLHFKIT_TEST_PG"
# The installed console script, as users run it (``rlhfkit annotate ...``): proves the entry point.
CLI = [str(Path(sys.executable).with_name("rlhfkit")), "annotate"]


def pair_dict(i: int, **overrides) -> dict:
    d = {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
         "a": {"role": "assistant", "content": f"The answer is {2 * i}."},
         "b": {"role": "assistant", "content": f"I think it is {2 * i + 1}."},
         "task": "arith", "metadata": {"generator": "test"}}
    d.update(overrides)
    return d


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_pairs(path: Path, n: int, n_gold: int = 0, start: int = 0) -> Path:
    rows = []
    for i in range(start, start + n):
        d = pair_dict(i)
        if i - start < n_gold:
            d["metadata"] = {"gold_winner": "a"}
        rows.append(d)
    return write_jsonl(path, rows)


DB_KINDS = ["sqlite", "postgresql"]


def db_url_fixture(request, tmp_path):
    """Use as ``_db_url = pytest.fixture(name="db_url", params=DB_KINDS)(db_url_fixture)``."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'annotate.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set (source .ci/services.sh to start PostgreSQL)")
    from sqlalchemy import create_engine, text

    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def new_store(url: str):
    from rlhfkit.annotate.store import Store

    store = Store(url)
    store.migrate()
    return store


def setup_project(store, tmp_path: Path, *, n_pairs: int = 10, n_gold: int = 0, overlap: int = 3,
                  gold_rate: float = 0.0, annotators=("alice", "bob", "carol"), project: str = "demo") -> dict:
    """Import pairs and create annotators; returns {name: login token}."""
    write_pairs(tmp_path / f"{project}-pairs.jsonl", n_pairs, n_gold)
    store.admin.import_pairs(project, tmp_path / f"{project}-pairs.jsonl", overlap=overlap, gold_rate=gold_rate)
    return {name: store.admin.add_annotator(project, name) for name in annotators}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhfkit annotate {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


class Server:
    """``rlhfkit annotate serve`` as a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, db: str, log_level: str = "warning"):
        self.db, self.log_level = db, log_level
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Server:
        # Output to a file, not a pipe nobody reads (a full pipe would block the server).
        self.log = tempfile.NamedTemporaryFile("w+", prefix="annotate-server-", suffix=".log")
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--db", self.db, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", self.log_level],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)  # like a service: its own session (and CPU share), not the test's
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer /healthz within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing — a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc is not None:
            self.log.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def sign_in(client: httpx.Client, token: str) -> str:
    """Open the annotator's link; returns the session's CSRF token."""
    # Sec-Fetch-Site "none": what a browser sends for a link the person opened themselves.
    r = client.get(f"/a/{token}", headers={"Sec-Fetch-Site": "none"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return client.get("/api/me").json()["csrf_token"]


def page_values(html: str) -> dict:
    """The hidden inputs of the labelling form."""
    return dict(re.findall(r'name="(csrf_token|assignment_id|submission_id)" value="([^"]*)"', html))


class LeanClient:
    """One keep-alive HTTP/1.1 connection with one cookie, on ``http.client``: a fraction of
    httpx's CPU per request, which matters when 50 of them share 2 CPUs with the server."""

    TRANSPORT_ERRORS = (OSError, http.client.HTTPException)

    def __init__(self, url: str):
        host, port = url.split("//")[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.cookie: str | None = None
        self.reused = False

    def request(self, method: str, path: str, body: dict | None = None, headers: dict | None = None):
        """``(status, parsed JSON or text)``; raises one of TRANSPORT_ERRORS when the server is gone."""
        headers = dict(headers or {})
        if self.cookie:
            headers["Cookie"] = self.cookie
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                raw = response.read()
                self.reused = True
                break
            except self.TRANSPORT_ERRORS:
                self.conn.close()
                # The server closes keep-alive connections idle for 5 s; a request on such a
                # connection never reached the app, so it is sent again on a new one (as browsers
                # and urllib3 do). A new connection that fails means the server is gone.
                if not self.reused or attempt == 2:
                    raise
                self.reused = False
        cookie = response.getheader("set-cookie")
        if cookie:
            self.cookie = cookie.split(";", 1)[0]
        kind = response.getheader("content-type", "")
        return response.status, json.loads(raw) if kind.startswith("application/json") else raw.decode()

    def sign_in(self, token: str) -> str:
        status, _ = self.request("GET", f"/a/{token}", headers={"Sec-Fetch-Site": "none"})
        assert status == 303, status
        return self.request("GET", "/api/me")[1]["csrf_token"]

    def close(self) -> None:
        self.conn.close()


def admin_sign_in(client) -> str:
    """Sign a TestClient in as the admin (token in ``client.admin_token``); returns the session's CSRF token."""
    page = client.get("/admin/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = client.post("/admin/login", data={"token": client.admin_token, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin", r.text
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/admin").text).group(1)
