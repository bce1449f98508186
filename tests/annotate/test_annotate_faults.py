"""Hostile and mistaken input (issue 17, "faults to fix" 1-8): each case here failed before its fix.

Bad input is refused with a message naming the file, line and field (or the request field), and
nothing already stored is lost or changed.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shlex
from types import SimpleNamespace
from urllib.parse import urljoin

import pytest
from annotate_helpers import (
    DB_KINDS,
    admin_sign_in,
    db_url_fixture,
    new_store,
    pair_dict,
    setup_project,
    sign_in,
    write_jsonl,
    write_pairs,
)
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from rlhfkit.annotate.models import Assignment, Label, Pair, Project
from rlhfkit.annotate.server import create_app
from rlhfkit.annotate.store import LabelInput, Refused
from rlhfkit.cli.annotate import main
from rlhfkit.data.records import DataError

_db_url = pytest.fixture(name="db_url", params=DB_KINDS)(db_url_fixture)
HUGE = 10**30


@pytest.fixture
def env(tmp_path):
    store = new_store(f"sqlite:///{tmp_path / 'faults.db'}")
    admin = store.admin.ensure_admin_token()
    tokens = setup_project(store, tmp_path, n_pairs=4, overlap=2)
    app = create_app(store, warm_up=False)

    def client(**kw) -> TestClient:
        c = TestClient(app, **kw)
        c.admin_token = admin
        return c

    return SimpleNamespace(store=store, admin=admin, tokens=tokens, app=app, client=client, tmp_path=tmp_path)


def annotator(env, name="alice"):
    c = env.client()
    return c, sign_in(c, env.tokens[name])


def count(store, model, *where):
    with store.db.read() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- 1. lone surrogates ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"a": {"role": "assistant", "content": "bad \ud800 text"}}, "a.content"),
    ({"prompt": [{"role": "user", "content": "\udfff"}]}, "prompt[0].content"),
    ({"metadata": {"note": ["ok", "x\ud83d"]}}, "metadata.note[1]"),
    ({"task": "t\ud800"}, "task"),
])
def test_lone_surrogate_is_refused_at_import(db_url, tmp_path, overrides, field):
    store = new_store(db_url)
    # json.dumps writes the surrogate as the escape "\ud800", exactly what the attacker's file holds
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0), pair_dict(1, **overrides)])
    assert "\\ud" in path.read_text() or "\\udf" in path.read_text()
    with pytest.raises(DataError) as e:
        store.admin.import_pairs("demo", path)
    assert str(e.value).startswith(f"{path}:2: field '{field}': ") and "surrogate" in str(e.value)
    assert count(store, Pair) == 0


def test_lone_surrogate_in_a_rationale_is_refused(env):
    c, csrf = annotator(env)
    item = c.get("/api/next").json()["item"]
    raw = ('{"submission_id": "sub-surrogate", "assignment_id": %d, "choice": "left", "rationale": "x\\ud800"}'
           % item["assignment_id"])
    r = c.post("/api/labels", content=raw, headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "rationale"
    assert c.get("/api/next").json()["item"]["assignment_id"] == item["assignment_id"]  # still there


# ---- 2. body size and sign-in before the body ------------------------------------------------------

def asgi_post(app, path: str, body_size: int, headers: list[tuple[bytes, bytes]], chunk: int = 1 << 16,
              content_length: bool = True) -> tuple[int, int, dict]:
    """POST ``body_size`` bytes straight into the ASGI app; returns (status, body chunks read, headers)."""
    reads, sent = 0, []

    async def receive():
        nonlocal reads
        reads += 1
        left = body_size - (reads - 1) * chunk
        return {"type": "http.request", "body": b"x" * max(0, min(chunk, left)), "more_body": left > chunk}

    async def send(message):
        sent.append(message)

    hdrs = [(b"host", b"testserver"), (b"content-type", b"application/json"), *headers]
    if content_length:
        hdrs.append((b"content-length", str(body_size).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": hdrs,
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], reads, {k.decode(): v.decode() for k, v in start["headers"]}


def test_unauthenticated_body_is_never_read(env):
    status, reads, headers = asgi_post(env.app, "/api/labels", 50_000_000, [])
    assert status == 401 and reads == 0 and "content-security-policy" in headers


def test_body_size_is_limited_and_configurable(env):
    secret, who = env.store.login_annotator(env.tokens["alice"])
    cookie = [(b"cookie", f"rlhfkit_session={secret}".encode())]
    signed = [*cookie, (b"x-csrf-token", who.csrf_token.encode())]
    status, reads, _ = asgi_post(env.app, "/api/labels", 50_000_000, cookie)
    assert status == 403 and reads == 0  # signed in, but no CSRF header: refused before reading
    status, reads, _ = asgi_post(env.app, "/api/labels", 50_000_000, signed)
    assert status == 413 and reads == 0  # announced too big: refused before reading
    status, reads, _ = asgi_post(env.app, "/api/labels", 50_000_000, signed, content_length=False)
    assert status == 413 and reads <= (1 << 20) // (1 << 16) + 2  # chunked: stops at the limit
    small = create_app(env.store, warm_up=False, max_body_bytes=1000)
    status, _, _ = asgi_post(small, "/api/labels", 2000, signed)
    assert status == 413
    status, reads, _ = asgi_post(small, "/api/labels", 500, signed)
    assert status == 422 and reads == 1  # under the limit: read, and refused as not JSON by the route
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(env.store, warm_up=False, max_body_bytes=0)


# ---- 3. login CSRF -----------------------------------------------------------------------------------

def test_cross_site_link_does_not_replace_the_session(env):
    c, _ = annotator(env, "alice")
    r = c.get(f"/a/{env.tokens['bob']}", headers={"Sec-Fetch-Site": "cross-site"}, follow_redirects=False)
    assert r.status_code == 200 and "bob" not in r.text  # a page asking to confirm, naming nobody
    assert c.get("/api/me").json()["annotator"] == "alice"
    form_csrf = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)
    r = c.post(f"/a/{env.tokens['bob']}", data={"csrf_token": "wrong"}, follow_redirects=False)
    assert r.status_code == 403 and c.get("/api/me").json()["annotator"] == "alice"
    r = c.post(f"/a/{env.tokens['bob']}", data={"csrf_token": form_csrf}, headers={"Origin": "https://evil.example"},
               follow_redirects=False)
    assert r.status_code == 403 and c.get("/api/me").json()["annotator"] == "alice"
    r = c.post(f"/a/{env.tokens['bob']}", data={"csrf_token": form_csrf}, follow_redirects=False)
    assert r.status_code == 303 and c.get("/api/me").json()["annotator"] == "bob"  # the person clicked


def test_link_opened_directly_signs_in_at_once(env):
    c = env.client()
    for site in ("none", "same-origin"):
        r = c.get(f"/a/{env.tokens['alice']}", headers={"Sec-Fetch-Site": site}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/label"
    r = c.get("/a/not-a-token", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200  # the confirmation page does not tell whether a link is valid
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', r.text).group(1)
    assert c.post("/a/not-a-token", data={"csrf_token": csrf}).status_code == 403


# ---- 4. huge integers ------------------------------------------------------------------------------

def test_huge_ids_and_offsets_are_refused_not_500(env):
    c, csrf = annotator(env)
    item = c.get("/api/next").json()["item"]
    h = {"X-CSRF-Token": csrf}
    page = c.get("/label").text
    form = dict(re.findall(r'name="(csrf_token|submission_id)" value="([^"]*)"', page))
    calls = [
        lambda: c.get(f"/api/labels/{HUGE}"),
        lambda: c.patch(f"/api/labels/{HUGE}", json={"choice": "tie"}, headers=h),
        lambda: c.get(f"/api/labels?offset={HUGE}"),
        lambda: c.get(f"/api/labels?limit={HUGE}"),
        lambda: c.post("/api/labels", headers=h, content=json.dumps(
            {"submission_id": "sub-huge-1", "assignment_id": 1e30, "choice": "left"})),
        lambda: c.post("/api/labels", headers={**h, "Content-Type": "application/json"}, content=(
            '{"submission_id": "sub-huge-2", "assignment_id": %d, "choice": "left"}' % HUGE)),
        lambda: c.post("/api/labels", headers=h, json={"submission_id": "sub-huge-3", "assignment_id": 2**40,
                                                       "choice": "left", "duration_ms": 5}),
        lambda: c.post("/label", data={**form, "assignment_id": str(HUGE), "choice": "left"}),
        lambda: c.post("/label/revise", data={"csrf_token": csrf, "label_id": str(HUGE), "choice": "tie"}),
    ]
    for i, call in enumerate(calls):
        r = call()
        assert r.status_code in (404, 422), (i, r.status_code, r.text)
    assert c.get("/api/next").json()["item"] == item  # the connection and the session still work


# ---- 5. NUL bytes ----------------------------------------------------------------------------------

def test_nul_in_rationale_is_refused_on_every_database(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=2, overlap=1, annotators=("alice",))
    who = store.login_annotator(tokens["alice"])[1]
    item = store.next_item(who)
    with pytest.raises(Refused) as e:
        store.submit(who, LabelInput("sub-nul-0001", item.assignment_id, "left", rationale="a\x00b"))
    assert e.value.status == 422 and e.value.field == "rationale" and "NUL" in e.value.message
    label, _ = store.submit(who, LabelInput("sub-nul-0002", item.assignment_id, "left", rationale="fine"))
    with pytest.raises(Refused) as e:
        store.update_label(who, label["id"], {"rationale": "\x00"})
    assert e.value.status == 422 and e.value.field == "rationale"
    assert store.label_of(who, label["id"])["rationale"] == "fine"


def test_nul_in_rationale_is_a_422_for_the_page(env):
    c, csrf = annotator(env)
    item = c.get("/api/next").json()["item"]
    r = c.post("/api/labels", headers={"X-CSRF-Token": csrf}, json={
        "submission_id": "sub-nul-0003", "assignment_id": item["assignment_id"], "choice": "left",
        "rationale": "a\x00b"})
    assert r.status_code == 422 and r.json()["field"] == "rationale"


# The page's handling of a 500 (reported, not retried): tests/test_annotate_browser.py.


# ---- 6. import errors name file and line -----------------------------------------------------------

@pytest.mark.parametrize("overrides, field, message", [
    ({"metadata": ["a", "list"]}, "metadata", "must be a JSON object"),
    ({"task": {"name": "x"}}, "task", "must be a string"),
    ({"task": 7}, "task", "must be a string"),
    ({"a": {"role": "assistant", "content": "a\x00b"}}, "a.content", "NUL"),
])
def test_import_field_types_are_checked(db_url, tmp_path, overrides, field, message):
    store = new_store(db_url)
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0), pair_dict(1, **overrides)])
    with pytest.raises(DataError) as e:
        store.admin.import_pairs("demo", path)
    assert str(e.value).startswith(f"{path}:2: field '{field}': ") and message in str(e.value)
    assert count(store, Pair) == 0


def test_invalid_utf8_names_file_and_line(tmp_path):
    store = new_store(f"sqlite:///{tmp_path / 'u.db'}")
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(pair_dict(0)).encode() + b"\n" + json.dumps(pair_dict(1)).encode()[:-2]
                     + b"\xff\"}\n")
    with pytest.raises(DataError) as e:
        store.admin.import_pairs("demo", path)
    assert str(e.value).startswith(f"{path}:2: ") and "not valid UTF-8" in str(e.value)
    assert count(store, Pair) == 0


def test_guidelines_file_errors_name_file_and_line(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'g.db'}"
    assert cli(capsys, "init", "--db", db)[0] == 0
    pairs = write_pairs(tmp_path / "pairs.jsonl", 2)
    assert cli(capsys, "import", str(pairs), "--project", "demo", "--db", db)[0] == 0
    guide = tmp_path / "guide.txt"
    guide.write_bytes(b"Be kind.\nPick the \xe9 better one.\n")
    code, _, err = cli(capsys, "import", "--project", "demo", "--db", db, "--guidelines", str(guide))
    assert code == 1 and f"{guide}:2: not valid UTF-8" in err
    guide.write_bytes(b"Be kind.\n\nno\x00nul\n")
    code, _, err = cli(capsys, "import", "--project", "demo", "--db", db, "--guidelines", str(guide))
    assert code == 1 and f"{guide}:3: " in err and "NUL" in err
    with new_store(db).db.read() as s:
        assert s.scalar(select(Project.guidelines)) is None


# ---- 7. headers on 500, undoing a skip, rotating links, odd names ----------------------------------

def test_server_error_still_carries_the_security_headers(env, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("database on fire")

    c, _ = annotator(env)
    monkeypatch.setattr(env.store, "progress", broken)
    quiet = env.client(raise_server_exceptions=False)
    quiet.cookies = c.cookies
    r = quiet.get("/api/me")
    assert r.status_code == 500 and "database on fire" not in r.text
    assert r.json()["detail"].startswith("internal error")
    assert r.headers["cache-control"] == "no-store" and "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


def test_a_skip_can_be_undone_while_the_slot_is_free(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=1, overlap=1, annotators=("alice", "bob"))
    alice, bob = (store.login_annotator(tokens[n])[1] for n in ("alice", "bob"))
    item = store.next_item(alice)
    skipped, _ = store.submit(alice, LabelInput("sub-skip-001", item.assignment_id, "skip"))
    assert store.next_item(alice) is None
    undone = store.update_label(alice, skipped["id"], {"choice": "right", "strength": 2})
    assert (undone["choice"], undone["strength"]) == ("right", 2)
    assert store.next_item(bob) is None  # the slot is alice's again
    with store.db.read() as s:
        assert s.scalar(select(Pair.n_active)) == 1
        assert s.scalar(select(Assignment.status).where(Assignment.id == item.assignment_id)) == "done"
        assert s.scalar(select(Label.skipped)) is False

    # skipped again (through a new label on a new pair): once someone else holds the slot, refused
    write_pairs(tmp_path / "more.jsonl", 1, start=5)
    store.admin.import_pairs("demo", tmp_path / "more.jsonl", overlap=1)
    item = store.next_item(alice)
    skipped, _ = store.submit(alice, LabelInput("sub-skip-002", item.assignment_id, "skip"))
    assert store.next_item(bob) is not None
    with pytest.raises(Refused) as e:
        store.update_label(alice, skipped["id"], {"choice": "left"})
    assert e.value.status == 409 and "someone else" in e.value.message
    assert store.label_of(alice, skipped["id"])["choice"] == "skip"


def test_reactivation_and_rotation_issue_a_new_link(db_url, tmp_path):
    store = new_store(db_url)
    tokens = setup_project(store, tmp_path, n_pairs=2, annotators=("alice",))
    old = tokens["alice"]
    secret, _ = store.login_annotator(old)
    assert store.admin.set_annotator_active("demo", "alice", False) is None
    new = store.admin.set_annotator_active("demo", "alice", True)
    assert new and new != old
    assert store.login_annotator(old) is None and store.login_annotator(new) is not None
    assert store.principal(secret) is None  # the session from before stays ended
    newer = store.admin.new_link("demo", "alice")
    assert store.login_annotator(new) is None and store.login_annotator(newer) is not None


def test_odd_annotator_names_can_be_managed_from_the_dashboard(env):
    c = env.client()
    csrf = admin_sign_in(c)
    for name in ("..", ".", "%2e%2e", "a?b#c"):
        r = c.post("/admin/projects/demo/annotators", data={"name": name, "csrf_token": csrf})
        assert r.status_code == 201, r.text
        page = c.get("/admin/projects/demo").text
        forms = re.findall(r'<form method="post" action="([^"]+)"[^>]*>\s*<input type="hidden" name="csrf_token" '
                           r'value="[^"]+">\s*<input type="hidden" name="name" value="([^"]*)">', page)
        action = [a for a, n in forms if n == name.replace("#", "&#35;") or n == _html(name)]
        assert action, (name, forms)
        # resolved as a browser resolves it (dot segments removed)
        r = c.post(urljoin("http://testserver/admin/projects/demo", action[0].replace("&amp;", "&")),
                   data={"name": name, "active": "0", "csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303, (name, r.status_code, r.text)
        info = env.store.admin.project_info("demo")
        assert {a["name"]: a["active"] for a in info["annotators"]}[name] is False


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;")


# ---- 8. docs and program agree ---------------------------------------------------------------------

def test_export_with_nothing_left_fails_loudly(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'e.db'}"
    assert cli(capsys, "init", "--db", db)[0] == 0
    assert cli(capsys, "import", str(write_pairs(tmp_path / "p.jsonl", 2)), "--project", "demo", "--db", db)[0] == 0
    out = tmp_path / "prefs.jsonl"
    code, _, err = cli(capsys, "export", "--project", "demo", "--db", db, "--out", str(out))
    assert code == 1 and "no records to export" in err and "0 pairs have votes" in err
    assert not out.exists()


def test_mistyped_db_is_not_created(tmp_path, capsys):
    typo = tmp_path / "labesl.db"
    for argv in (["export", "--project", "demo", "--out", str(tmp_path / "x.jsonl")], ["stats", "--project", "demo"],
                 ["import", str(write_pairs(tmp_path / "p.jsonl", 2)), "--project", "demo"],
                 ["serve"], ["add-annotator", "x", "--project", "demo"]):
        code, _, err = cli(capsys, *argv, "--db", f"sqlite:///{typo}")
        assert code == 1 and f"no annotation database at {typo}" in err and "rlhfkit annotate init" in err, argv
        assert not typo.exists()


def test_web_export_has_the_cli_filters_and_refuses_an_empty_result(env):
    store = env.store
    for name in ("alice", "bob"):
        who = store.login_annotator(env.tokens[name])[1]
        for k in range(4):
            item = store.next_item(who)
            store.submit(who, LabelInput(f"{name}-web-{k}", item.assignment_id, "left" if name == "alice" else "right"))
    c = env.client()
    admin_sign_in(c)
    url = "/admin/projects/demo/export.jsonl?votes=true"
    names = {json.loads(x)["annotator_id"] for x in c.get(url).text.splitlines()}
    assert names == {"alice", "bob"}
    r = c.get(url + "&exclude_annotator=bob&exclude_annotator=carol")
    assert {json.loads(x)["annotator_id"] for x in r.text.splitlines()} == {"alice"}
    r = c.get(url + "&min_gold_accuracy=0.5")
    assert r.status_code == 200  # nobody has gold answers: everyone kept
    r = c.get(url + "&exclude_annotator=alice&exclude_annotator=bob")
    assert r.status_code == 422 and "no records to export" in r.text
    r = c.get(url + "&min_gold_accuracy=1.5")
    assert r.status_code == 422


def test_docs_commands_exist(capsys):
    from pathlib import Path

    from rlhfkit.cli.annotate import build_parser

    docs = (Path(__file__).resolve().parents[2] / "docs" / "annotate.md").read_text()
    assert "rlhfkit reward --data" not in docs and "rlhfkit reward train --data" in docs
    commands = re.findall(r"^(?:\$ )?rlhfkit annotate ((?:[^\n\\]|\\\n)+)", docs, re.M)
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line.replace("\\\n", " "), comments=True)
        build_parser().parse_args(argv)  # exits (SystemExit) on an unknown command or option


def test_score_writes_the_uncertainty_file_import_reads(tmp_path, capsys):
    import torch

    from rlhfkit.annotate.imports import read_uncertainty
    from rlhfkit.models.heads import RewardModel

    rms = [str(RewardModel.init_from("tiny", seed=s).save(tmp_path / f"rm{s}")) for s in (0, 1)]
    rows = [pair_dict(i) for i in range(3)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scores.jsonl"
    code, stdout, err = cli(capsys, "score", "--rm", rms[0], "--pairs", str(pairs), "--out", str(out))
    assert code == 0, err
    got = read_uncertainty(out)
    assert [k for _, k, _ in got] == ["p0", "p1", "p2"] and all(len(ps) == 1 for *_, ps in got)
    rm = RewardModel.load(rms[0])
    prompts = [r["prompt"] for r in rows]
    ra = rm.score(prompts, [r["a"]["content"] for r in rows], normalized=False)
    rb = rm.score(prompts, [r["b"]["content"] for r in rows], normalized=False)
    expected = torch.sigmoid(ra - rb).tolist()  # Bradley-Terry: P(a preferred) = sigma(r_a - r_b)
    assert [ps[0] for *_, ps in got] == pytest.approx(expected, abs=1e-5)
    assert not all(math.isclose(p, 0.5, abs_tol=1e-6) for p in expected)

    code, _, err = cli(capsys, "score", "--rm", rms[0], "--rm", rms[1], "--pairs", str(pairs), "--out", str(out))
    assert code == 1 and "exists; pass --force" in err
    code, _, _ = cli(capsys, "score", "--rm", rms[0], "--rm", rms[1], "--pairs", str(pairs), "--out", str(out),
                     "--force")
    assert code == 0 and all(len(ps) == 2 for *_, ps in read_uncertainty(out))

    not_rm = tmp_path / "nope"
    not_rm.mkdir()
    code, _, err = cli(capsys, "score", "--rm", str(not_rm), "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl"))
    assert code == 1 and err.startswith("error: ") and str(not_rm) in err


def test_annotator_link_and_status_routes_refusals(env):
    store = env.store
    anon, c = env.client(), env.client()
    csrf = admin_sign_in(c)
    form = {"name": "alice", "csrf_token": csrf}
    assert anon.post("/admin/projects/demo/annotator-link", data={"name": "alice"}).status_code == 401
    assert c.post("/admin/projects/demo/annotator-link", data={"name": "alice"}).status_code == 403
    assert c.post("/admin/projects/demo/annotator-link", data={**form, "name": "zed"}).status_code == 404
    assert c.post("/admin/projects/nope/annotator-link", data=form).status_code == 404
    r = c.post("/admin/projects/demo/annotator-link", data=form)
    assert r.status_code == 201 and "The old link no longer works" in r.text
    new = re.search(r'<code id="link" class="secret">http://testserver/a/([^<]+)</code>', r.text).group(1)
    assert store.login_annotator(env.tokens["alice"]) is None and store.login_annotator(new) is not None
    assert c.post("/admin/projects/demo/annotator-status", data={**form, "active": "x"}).status_code == 422
    assert c.post("/admin/projects/demo/annotator-status", data={**form, "active": "0"},
                  follow_redirects=False).status_code == 303
    r = c.post("/admin/projects/demo/annotator-link", data=form)
    assert r.status_code == 409 and "reactivate" in r.text
    r = c.post("/admin/projects/demo/annotator-status", data={**form, "active": "1"})
    assert r.status_code == 201 and "reactivated" in r.text and "old link stays void" in r.text
    newer = re.search(r'<code id="link" class="secret">http://testserver/a/([^<]+)</code>', r.text).group(1)
    assert store.login_annotator(new) is None and store.login_annotator(newer) is not None
    r = c.get("/admin/projects/demo/export.jsonl?rankings=true")
    assert r.status_code == 422 and "no rankings to export" in r.text
    assert c.get("/admin/projects/demo/export.jsonl?min_votes=0").status_code == 422
    assert c.get(f"/admin/projects/demo/export.jsonl?min_votes={HUGE}").status_code == 422
