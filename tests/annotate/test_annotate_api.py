"""Every route of the annotation server, including every refusal, through FastAPI's TestClient."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from annotate_helpers import new_store, page_values, pair_dict, setup_project, sign_in, write_jsonl
from fastapi.testclient import TestClient

from rlhfkit.annotate.server import create_app
from rlhfkit.annotate.store import Store
from rlhfkit.data.records import PreferenceRecord

XSS_A = ('<script>alert("a")</script> and <img src=x onerror="alert(1)"> '
         '<a href="javascript:alert(2)">click</a> [md link](javascript:alert(3)) **bold**')
DIRECT = {"Sec-Fetch-Site": "none"}  # a link the person opened themselves
XSS_B = "</div><script src=//evil.example/x.js></script><svg onload=alert(4)>"


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory):
    """An empty, migrated database file; each test starts from a copy (migrating costs ~0.5 s)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    new_store(f"sqlite:///{path}").db.dispose()
    return path


@pytest.fixture
def env(tmp_path, migrated_db):
    shutil.copy(migrated_db, tmp_path / "api.db")
    store = Store(f"sqlite:///{tmp_path / 'api.db'}")
    admin = store.admin.ensure_admin_token()
    tokens = setup_project(store, tmp_path, n_pairs=4, overlap=2)
    app = create_app(store, warm_up=False)  # the subprocess servers of the other tests warm up

    def client() -> TestClient:
        return TestClient(app)

    return store, admin, tokens, client


def annotator(env, name="alice"):
    store, _, tokens, client = env
    c = client()
    return c, sign_in(c, tokens[name])


def admin_client(env):
    _, admin, _, client = env
    c = client()
    page = c.get("/admin/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/admin/login", data={"token": admin, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/admin"
    return c, re.search(r'name="csrf_token" value="([^"]+)"', c.get("/admin").text).group(1)


def body(assignment_id, **kw):
    return {"submission_id": "sub-0000001", "assignment_id": assignment_id, "choice": "left", **kw}


# ---- sign-in, pages, headers ----------------------------------------------------------------------

def test_home_health_and_security_headers(env):
    c = env[3]()
    r = c.get("/")
    assert r.status_code == 200 and "personal link" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
    assert c.get("/healthz").json() == {"ok": True}
    js = c.get("/static/label.js")
    assert js.status_code == 200 and "api/labels" in js.text and "content-security-policy" in js.headers
    c2, _ = annotator(env)
    assert c2.get("/", follow_redirects=False).headers["location"] == "/label"


def test_secret_link_sets_httponly_cookie_and_redirects(env):
    c = env[3]()
    r = c.get(f"/a/{env[2]['alice']}", headers=DIRECT, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=lax" in cookie.lower() and env[2]["alice"] not in cookie
    bad = c.get("/a/not-a-real-token", headers=DIRECT, follow_redirects=False)
    assert bad.status_code == 403 and "not valid" in bad.text and "set-cookie" not in bad.headers


def test_label_page_requires_sign_in(env):
    c = env[3]()
    assert c.get("/label").status_code == 401
    assert c.get("/api/me").status_code == 401
    assert c.get("/api/next").json()["field"] is None and c.get("/api/next").status_code == 401
    c.cookies.set("rlhfkit_session", "forged-session")
    assert c.get("/label").status_code == 401


def test_label_page_shows_pair_and_progress(env):
    c, _ = annotator(env)
    page = c.get("/label")
    assert page.status_code == 200
    assert "0 labelled · 0 skipped · 3 waiting" in page.text  # 3 more after this one
    assert '<script src="/static/label.js" defer></script>' in page.text
    assert re.search(r"<script>(?!</script>)", page.text) is None  # no inline script
    v = page_values(page.text)
    assert set(v) == {"csrf_token", "assignment_id", "submission_id"}
    assert page_values(c.get("/label").text)["assignment_id"] == v["assignment_id"]  # reload keeps the item
    nxt = c.get("/api/next").json()
    assert nxt["item"]["assignment_id"] == int(v["assignment_id"]) and nxt["csrf_token"] == v["csrf_token"]
    assert set(nxt["item"]) == {"kind", "assignment_id", "prompt", "left", "right"}  # no pair id, no a/b, no gold flag


def test_untrusted_text_is_escaped(env, tmp_path):
    store, _, _, client = env
    write_jsonl(tmp_path / "xss.jsonl", [pair_dict(0, id="xss", a={"role": "assistant", "content": XSS_A},
                                                    b={"role": "assistant", "content": XSS_B},
                                                    prompt=[{"role": "user", "content": "<b>hi</b><script>x()</script>"}])])
    store.admin.import_pairs("xss", tmp_path / "xss.jsonl", overlap=1)
    c = client()
    sign_in(c, store.admin.add_annotator("xss", "eve"))
    html = c.get("/label").text
    assert "&lt;script&gt;alert(&#34;a&#34;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "&lt;a href=&#34;javascript:alert(2)&#34;&gt;" in html
    assert "[md link](javascript:alert(3)) **bold**" in html  # markdown stays text
    assert "&lt;/div&gt;&lt;script src=//evil.example/x.js&gt;" in html and "&lt;svg onload=alert(4)&gt;" in html
    assert "&lt;b&gt;hi&lt;/b&gt;&lt;script&gt;x()&lt;/script&gt;" in html
    for raw in ("<script>alert", "<img", "<svg", 'href="javascript', "<b>hi", "evil.example/x.js></script>"):
        assert raw not in html


# ---- POST /api/labels --------------------------------------------------------------------------

def test_post_label_created_then_replayed(env):
    store = env[0]
    c, csrf = annotator(env)
    aid = c.get("/api/next").json()["item"]["assignment_id"]
    payload = body(aid, choice="right", strength=3, rationale="clearer", unsafe=True, duration_ms=1234)
    r = c.post("/api/labels", json=payload, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 201, r.text
    label = r.json()
    assert (label["choice"], label["strength"], label["rationale"], label["unsafe"], label["replayed"]) == (
        "right", 3, "clearer", True, False)
    again = c.post("/api/labels", json=payload, headers={"X-CSRF-Token": csrf})
    assert again.status_code == 200 and again.json()["replayed"] and again.json()["id"] == label["id"]
    with store.db.read() as s:
        from sqlalchemy import func, select

        from rlhfkit.annotate.models import Label
        assert s.scalar(select(func.count()).select_from(Label)) == 1
    # the next pair is already assigned (made with the label); 2 more wait after it
    assert c.get("/api/me").json()["progress"] == {"labelled": 1, "skipped": 0, "remaining": 2}


@pytest.mark.parametrize("change, field", [
    ({"choice": "up"}, "choice"),
    ({"choice": None}, "choice"),
    ({"submission_id": "short"}, "submission_id"),
    ({"submission_id": "has spaces in it"}, "submission_id"),
    ({"assignment_id": "seven"}, "assignment_id"),
    ({"strength": 4}, "strength"),
    ({"strength": 0}, "strength"),
    ({"choice": "tie", "strength": 2}, "strength"),
    ({"rationale": "x" * 5001}, "rationale"),
    ({"duration_ms": -5}, "duration_ms"),
    ({"unsafe": "maybe"}, "unsafe"),
    ({"colour": "blue"}, "colour"),
])
def test_post_label_malformed_body_names_the_field(env, change, field):
    c, csrf = annotator(env)
    aid = c.get("/api/next").json()["item"]["assignment_id"]
    r = c.post("/api/labels", json={**body(aid), **change}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422
    assert r.json()["field"] == field and r.json()["message"].startswith(f"{field}: ")


def test_post_label_missing_fields_and_non_json(env):
    c, csrf = annotator(env)
    r = c.post("/api/labels", json={"choice": "left"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 422 and r.json()["field"] == "submission_id"
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("body", "submission_id"), ("body", "assignment_id")}
    r = c.post("/api/labels", content=b"{not json", headers={"X-CSRF-Token": csrf, "content-type": "application/json"})
    assert r.status_code == 422


def test_post_label_csrf_refusals(env):
    c, csrf = annotator(env)
    aid = c.get("/api/next").json()["item"]["assignment_id"]
    r = c.post("/api/labels", json=body(aid))
    assert r.status_code == 403 and r.json()["field"] == "csrf_token" and "missing CSRF token" in r.json()["detail"]
    r = c.post("/api/labels", json=body(aid), headers={"X-CSRF-Token": "x" * 43})
    assert r.status_code == 403 and "wrong CSRF token" in r.json()["detail"]
    _, bob_csrf = annotator(env, "bob")
    assert c.post("/api/labels", json=body(aid), headers={"X-CSRF-Token": bob_csrf}).status_code == 403
    r = c.post("/api/labels", json=body(aid), headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["field"] == "Origin"
    # refusals come before body validation: no 422 for a request that is not allowed at all
    assert c.post("/api/labels", json={"choice": "bad"}).status_code == 403
    assert env[3]().post("/api/labels", json={"choice": "bad"}).status_code == 401
    assert env[3]().get("/api/labels/not-a-number").status_code == 401
    proxied = {"X-CSRF-Token": csrf, "Origin": "https://label.example.org", "X-Forwarded-Host": "label.example.org"}
    assert c.get("/api/labels").json()["labels"] == []  # nothing refused was stored
    assert c.post("/api/labels", json=body(aid), headers=proxied).status_code == 201


def test_post_label_refuses_other_annotators_item_and_unauthenticated(env):
    alice, alice_csrf = annotator(env)
    bob, bob_csrf = annotator(env, "bob")
    aid = alice.get("/api/next").json()["item"]["assignment_id"]
    r = bob.post("/api/labels", json=body(aid, submission_id="bob-0000001"), headers={"X-CSRF-Token": bob_csrf})
    assert r.status_code == 404 and r.json()["field"] == "assignment_id"
    r = bob.post("/api/labels", json=body(10_000, submission_id="bob-0000002"), headers={"X-CSRF-Token": bob_csrf})
    assert r.status_code == 404
    anon = env[3]()
    assert anon.post("/api/labels", json=body(aid), headers={"X-CSRF-Token": alice_csrf}).status_code == 401


def test_post_label_conflicts(env):
    c, csrf = annotator(env)
    aid = c.get("/api/next").json()["item"]["assignment_id"]
    assert c.post("/api/labels", json=body(aid), headers={"X-CSRF-Token": csrf}).status_code == 201
    r = c.post("/api/labels", json=body(aid, choice="tie"), headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and r.json()["field"] == "submission_id"
    r = c.post("/api/labels", json=body(aid, submission_id="second-000001"), headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and r.json()["field"] == "assignment_id"


def test_skip_and_done_page(env):
    c, csrf = annotator(env)
    for k in range(4):
        aid = c.get("/api/next").json()["item"]["assignment_id"]
        choice = "skip" if k == 0 else "tie"
        assert c.post("/api/labels", json=body(aid, choice=choice, submission_id=f"sk-{k:08d}"),
                      headers={"X-CSRF-Token": csrf}).status_code == 201
    assert c.get("/api/next").json()["item"] is None
    done = c.get("/label")
    assert done.status_code == 200 and 'id="done"' in done.text and "3 labelled · 1 skipped · 0 waiting" in done.text


# ---- form fallback, logout ---------------------------------------------------------------------

def test_form_post_fallback(env):
    c, _ = annotator(env)
    v = page_values(c.get("/label").text)
    r = c.post("/label", data={**v, "choice": "left", "strength": "2", "rationale": "  ", "unsafe": "1"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"
    label = c.get("/api/labels").json()["labels"][0]
    assert (label["choice"], label["strength"], label["rationale"], label["unsafe"]) == ("left", 2, None, True)
    v2 = page_values(c.get("/label").text)
    r = c.post("/label", data={**v2, "choice": "tie", "strength": "3"}, follow_redirects=False)
    assert r.status_code == 303 and c.get("/api/labels").json()["labels"][0]["strength"] is None
    v3 = page_values(c.get("/label").text)
    no_csrf = {k: val for k, val in v3.items() if k != "csrf_token"}
    assert c.post("/label", data={**no_csrf, "choice": "left"}).status_code == 403
    r = c.post("/label", data={**v3, "choice": "sideways"})
    assert r.status_code == 422 and "choice" in r.text


def test_logout_needs_csrf_and_ends_session(env):
    c, csrf = annotator(env)
    assert c.post("/logout", data={}).status_code == 403
    assert c.post("/logout", data={"csrf_token": csrf}).status_code == 200
    assert c.get("/api/me").status_code == 401


# ---- own labels: list, read, change ------------------------------------------------------------

def test_labels_read_and_patch_only_own(env):
    alice, a_csrf = annotator(env)
    bob, b_csrf = annotator(env, "bob")
    aid = alice.get("/api/next").json()["item"]["assignment_id"]
    label = alice.post("/api/labels", json=body(aid, strength=1), headers={"X-CSRF-Token": a_csrf}).json()
    assert alice.get(f"/api/labels/{label['id']}").json()["choice"] == "left"
    assert bob.get(f"/api/labels/{label['id']}").status_code == 404
    assert bob.get("/api/labels").json()["labels"] == []
    r = bob.patch(f"/api/labels/{label['id']}", json={"choice": "right"}, headers={"X-CSRF-Token": b_csrf})
    assert r.status_code == 404 and r.json()["field"] == "label_id"
    assert alice.patch(f"/api/labels/{label['id']}", json={"choice": "right"}).status_code == 403
    r = alice.patch(f"/api/labels/{label['id']}", json={"choice": "down"}, headers={"X-CSRF-Token": a_csrf})
    assert r.status_code == 422 and r.json()["field"] == "choice"
    r = alice.patch(f"/api/labels/{label['id']}", json={"choice": "tie"}, headers={"X-CSRF-Token": a_csrf})
    assert r.status_code == 422 and r.json()["field"] == "strength"  # strength 1 must be cleared for a tie
    r = alice.patch(f"/api/labels/{label['id']}", json={"choice": "right", "rationale": "changed my mind"},
                    headers={"X-CSRF-Token": a_csrf})
    assert r.status_code == 200 and r.json()["choice"] == "right" and r.json()["updated_at"]
    assert alice.get("/api/labels?limit=0").status_code == 422
    assert env[3]().get("/api/labels").status_code == 401 and env[3]().get("/api/labels/1").status_code == 401
    assert env[3]().patch("/api/labels/1", json={"choice": "left"}).status_code == 401


# ---- admin -------------------------------------------------------------------------------------

def test_admin_login_refusals(env):
    c = env[3]()
    assert c.get("/admin").status_code == 401
    assert c.post("/admin/login", data={"token": env[1]}).status_code == 403  # no CSRF
    page = c.get("/admin/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/admin/login", data={"token": "wrong", "csrf_token": csrf})
    assert r.status_code == 401 and "not a valid admin token" in r.text
    alice, _ = annotator(env)
    assert alice.get("/admin").status_code == 401 and alice.get("/api/admin/projects/demo/stats").status_code == 401
    assert alice.get("/admin/projects/demo/export.jsonl").status_code == 401
    assert c.get("/admin/projects/demo/export.jsonl").status_code == 401
    admin, _ = admin_client(env)
    assert admin.get("/api/me").status_code == 401 and admin.get("/label").status_code == 401  # not an annotator


def test_admin_pages_annotators_and_export(env):
    store = env[0]
    c, csrf = admin_client(env)
    assert "demo" in c.get("/admin").text
    dash = c.get("/admin/projects/demo")
    assert dash.status_code == 200 and 'id="fleiss"' in dash.text and "alice" in dash.text
    assert "(0 of 0 labelled pairs, 0 votes)" in dash.text and "built-in method" not in dash.text
    assert c.get("/admin/projects/nope").status_code == 404
    assert c.post("/admin/projects/demo/annotators", data={"name": "dave"}).status_code == 403
    r = c.post("/admin/projects/demo/annotators", data={"name": "dave", "csrf_token": csrf})
    assert r.status_code == 201
    link = re.search(r'<code id="link" class="secret">([^<]+)</code>', r.text).group(1)
    assert link.startswith("http://testserver/a/")
    assert c.post("/admin/projects/demo/annotators", data={"name": "dave", "csrf_token": csrf}).status_code == 409
    assert c.post("/admin/projects/demo/annotators", data={"name": "a/b", "csrf_token": csrf}).status_code == 422
    assert c.post("/admin/projects/nope/annotators", data={"name": "x", "csrf_token": csrf}).status_code == 404
    dave = env[3]()
    assert dave.get(link.replace("http://testserver", ""), headers=DIRECT, follow_redirects=False).status_code == 303
    assert dave.get("/api/me").json()["annotator"] == "dave"
    r = c.post("/admin/projects/demo/annotator-status", data={"name": "dave", "active": "0"})
    assert r.status_code == 403
    r = c.post("/admin/projects/demo/annotator-status", data={"name": "dave", "active": "0", "csrf_token": csrf},
               follow_redirects=False)
    assert r.status_code == 303 and dave.get("/api/me").status_code == 401
    assert c.post("/admin/projects/demo/annotator-status",
                  data={"name": "zed", "active": "0", "csrf_token": csrf}).status_code == 404
    # two annotators agree on one pair -> a consensus record
    for name in ("alice", "bob"):
        a, a_csrf = annotator(env, name)
        aid = a.get("/api/next").json()["item"]["assignment_id"]
        a.post("/api/labels", json=body(aid, choice="tie", submission_id=f"{name}-000001"),
               headers={"X-CSRF-Token": a_csrf})
    r = c.get("/admin/projects/demo/export.jsonl")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    recs = [PreferenceRecord.from_dict(json.loads(x)) for x in r.text.splitlines()]
    assert len(recs) == 1 and recs[0].tie and recs[0].metadata["agreement"] == 1.0
    votes = c.get("/admin/projects/demo/export.jsonl?votes=true").text.splitlines()
    assert len(votes) == 2
    assert c.get("/admin/projects/demo/export.jsonl?consensus=best").status_code == 422
    stats = c.get("/api/admin/projects/demo/stats").json()
    assert stats["n_votes"] == 2 and stats["fleiss_kappa"] is None  # one category only: kappa undefined
    assert store.admin.project_info("demo")["n_labels"] == 2


def test_admin_bearer_token(env):
    c = env[3]()
    ok = {"Authorization": f"Bearer {env[1]}"}
    assert c.get("/api/admin/projects/demo/stats", headers=ok).status_code == 200
    r = c.get("/admin/projects/demo/export.jsonl", headers=ok)
    assert r.status_code == 422 and "no records to export: 0 pairs have votes" in r.text  # nothing labelled yet
    r = c.get("/api/admin/projects/demo/stats", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["field"] == "Authorization"
    assert c.get("/api/admin/projects/nope/stats", headers=ok).status_code == 404


def test_admin_logout(env):
    c, csrf = admin_client(env)
    assert c.post("/admin/logout", data={}).status_code == 403
    r = c.post("/admin/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and c.get("/admin").status_code == 401


def test_guidelines_and_fixing_the_last_answer(env, tmp_path):
    store = env[0]
    store.admin.import_pairs("demo", guidelines="Prefer the <em>honest</em> reply.\n- be kind")
    c, csrf = annotator(env)
    page = c.get("/label").text
    assert "Prefer the &lt;em&gt;honest&lt;/em&gt; reply.\n- be kind" in page and 'id="last-answer"' not in page
    v = page_values(page)
    c.post("/label", data={**v, "choice": "left", "strength": "3"})
    page = c.get("/label").text
    assert "Last answer: <strong>left is better</strong> (strength 3)" in page
    label_id = re.search(r'name="label_id" value="(\d+)"', page).group(1)
    assert c.post("/label/revise", data={"label_id": label_id, "choice": "right"}).status_code == 403
    bob, bob_csrf = annotator(env, "bob")
    assert bob.post("/label/revise", data={"label_id": label_id, "choice": "right", "csrf_token": bob_csrf}
                    ).status_code == 404
    r = c.post("/label/revise", data={"label_id": label_id, "choice": "tie", "csrf_token": csrf},
               follow_redirects=False)
    assert r.status_code == 303
    changed = c.get(f"/api/labels/{label_id}").json()
    assert (changed["choice"], changed["strength"]) == ("tie", None) and changed["updated_at"]
    assert c.post("/label/revise", data={"label_id": label_id, "choice": "up", "csrf_token": csrf}).status_code == 422


def test_unsafe_flags_reach_the_dashboard_and_export(env):
    c, csrf = annotator(env)
    bob, bob_csrf = annotator(env, "bob")
    for client, token, name in ((c, csrf, "alice"), (bob, bob_csrf, "bob")):
        aid = client.get("/api/next").json()["item"]["assignment_id"]
        client.post("/api/labels", json=body(aid, choice="tie", unsafe=True, submission_id=f"{name}-unsafe-1"),
                    headers={"X-CSRF-Token": token})
    admin, _ = admin_client(env)
    stats = admin.get("/api/admin/projects/demo/stats").json()
    assert [{k: u[k] for k in ("pair_id", "flags", "skipped")} for u in stats["unsafe_pairs"]] == [
        {"pair_id": "p0", "flags": 2, "skipped": 0}]
    assert '<table id="unsafe">' in admin.get("/admin/projects/demo").text
    kept = admin.get("/admin/projects/demo/export.jsonl").text.splitlines()
    assert len(kept) == 1 and json.loads(kept[0])["metadata"]["votes"][0]["unsafe"] is True
    r = admin.get("/admin/projects/demo/export.jsonl?drop_unsafe=true")
    assert r.status_code == 422 and "1 dropped as unsafe" in r.text
