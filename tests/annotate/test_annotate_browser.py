"""A real browser (Debian's Chromium driven by Playwright) labels three pairs with the keyboard
against a real ``rlhfkit annotate serve`` on 127.0.0.1; the database must hold exactly those labels.

Skipped only where /usr/bin/chromium is missing and the CI variable is unset; in CI,
``.ci/services.sh`` installs Chromium and this test must run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from annotate_helpers import Server, new_store, pair_dict, write_jsonl
from sqlalchemy import func, select

from rlhfkit.annotate.models import Assignment, Label, Pair

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
XSS = ('<script>alert("xss-1")</script><img src=x onerror="alert(\'xss-2\')">'
       '<a href="javascript:alert(\'xss-3\')">click me</a> [link](javascript:alert(4))')

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                reason=f"{CHROMIUM} not installed (apt-get install chromium, or source .ci/services.sh)")


def test_keyboard_labelling_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    db = f"sqlite:///{tmp_path / 'browser.db'}"
    store = new_store(db)
    long_text = "\n".join(f"line {i} of a very long answer" for i in range(400))
    write_jsonl(tmp_path / "pairs.jsonl", [
        pair_dict(0, a={"role": "assistant", "content": XSS}, b={"role": "assistant", "content": "A calm reply."},
                  prompt=[{"role": "user", "content": "Say <b>hi</b> <script>alert('prompt')</script>"}]),
        pair_dict(1, a={"role": "assistant", "content": long_text}),
        pair_dict(2),
    ])
    store.admin.import_pairs("web", tmp_path / "pairs.jsonl", overlap=1, gold_rate=0.0)
    token = store.admin.add_annotator("web", "alice")

    dialogs, csp_errors, page_errors = [], [], []
    with Server(db) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("console", lambda m: "Content Security Policy" in m.text and csp_errors.append(m.text))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}/a/{token}")
            assert page.url == f"{server.url}/label"  # the token left the address bar

            # Each step: keys pressed, then the screen side expected to win (None for a tie).
            steps = [
                (["1"], "left"),
                (["w", "f", "r", "TYPE:because it is shorter", "Escape", "2"], "right"),
                (["t"], None),
            ]
            shown = []
            for keys, _side in steps:
                page.wait_for_selector("#label-form")
                left = page.inner_text("#side-left .completion")
                right = page.inner_text("#side-right .completion")
                shown.append((left, right))
                for side, text in (("left", left), ("right", right)):
                    if text.startswith("line 0"):  # the 400-line reply scrolls inside its box
                        box = f"#side-{side} .completion"
                        assert page.eval_on_selector(box, "e => e.scrollHeight > e.clientHeight + 100")
                        assert page.eval_on_selector(box, "e => getComputedStyle(e).overflowY") == "auto"
                with page.expect_navigation():
                    for key in keys:
                        if key.startswith("TYPE:"):
                            page.keyboard.type(key[5:])  # typing "t" or "s" here must not submit
                        else:
                            page.keyboard.press(key)
            page.wait_for_selector("#done")
            assert "3 labelled · 0 skipped · 0 waiting" in page.inner_text("#progress")

            # The hostile pair was shown as text and nothing ran.
            texts = [t for pair in shown for t in pair]
            assert XSS in texts
            assert dialogs == [] and page_errors == [] and csp_errors == []
            long_box = [t for t in texts if t.startswith("line 0")]
            assert long_box and long_box[0].count("\n") == 399
        finally:
            browser.close()

    with store.db.read() as s:
        rows = s.execute(select(Label, Assignment.left, Pair.a, Pair.b)
                         .join(Assignment, Assignment.id == Label.assignment_id)
                         .join(Pair, Pair.id == Label.pair_id).order_by(Label.id)).all()
    assert len(rows) == 3
    for (label, left, a, b), (keys, side), (left_text, right_text) in zip(rows, steps, shown):
        assert not label.skipped and label.duration_ms is not None and label.duration_ms >= 0
        assert (a if left == "a" else b)["content"] == left_text
        if side is None:
            assert label.winner == "tie" and label.strength is None
        else:
            winner_text = left_text if side == "left" else right_text
            assert (a if label.winner == "a" else b)["content"] == winner_text
    assert rows[1][0].strength == 2 and rows[1][0].unsafe and rows[1][0].rationale == "because it is shorter"
    assert rows[0][0].strength is None and not rows[0][0].unsafe and rows[0][0].rationale is None


def test_a_server_error_is_reported_not_retried(tmp_path):
    """A 500 means the server could not store the answer (e.g. a NUL in a rationale on PostgreSQL,
    issue 17): the page says so at once instead of retrying and promising that nothing is lost."""
    from playwright.sync_api import sync_playwright

    db = f"sqlite:///{tmp_path / 'browser.db'}"
    store = new_store(db)
    write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0)])
    store.admin.import_pairs("web", tmp_path / "pairs.jsonl", overlap=1, gold_rate=0.0)
    token = store.admin.add_annotator("web", "alice")
    posts = []

    def fail(route):
        posts.append(route.request.method)
        route.fulfill(status=500, content_type="application/json", body='{"detail": "internal error"}')

    with Server(db) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}/a/{token}")
            page.route("**/api/labels", fail)
            page.wait_for_selector("#label-form")  # the pair is on screen before the key (as the other tests)
            page.keyboard.press("1")
            page.wait_for_selector("#status:has-text('Not saved')")  # no wait_for_function: the CSP forbids eval
            text = page.inner_text("#status")
            page.wait_for_timeout(1500)  # a retry would come after 300 ms
            assert "could not store this answer (HTTP 500)" in text and "nothing is lost" not in text
            assert posts == ["POST"]
        finally:
            browser.close()
    with store.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Label)) == 0


def _browser(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


def test_ranking_by_keyboard_with_a_tie(tmp_path):
    """Keys 3 = 1 4 Backspace 2 4 Enter on four replies: reply 3 and reply 1 (as shown) tie for
    first, then 2, then 4; the database holds those ranks translated to reply indices."""
    from playwright.sync_api import sync_playwright

    db = f"sqlite:///{tmp_path / 'browser.db'}"
    store = new_store(db)
    replies = [XSS, "Red, green, blue.", "Cyan, magenta, yellow.", "Black and white are not colours."]
    write_jsonl(tmp_path / "items.jsonl", [{"id": "r0", "prompt": [{"role": "user", "content": "Name colours."}],
                                            "replies": [{"role": "assistant", "content": r} for r in replies]}])
    store.admin.import_pairs("web", tmp_path / "items.jsonl", overlap=1, gold_rate=0.0)
    token = store.admin.add_annotator("web", "alice")
    dialogs, page_errors = [], []
    with Server(db) as server, sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}/a/{token}")
            page.wait_for_selector("#label-form[data-kind=ranking]")
            shown = [page.inner_text(f"#reply-{k} .completion") for k in range(1, 5)]
            assert sorted(shown) == sorted(replies)
            for key in ["3", "=", "1", "4", "Backspace", "2"]:
                page.keyboard.press(key)
            assert page.inner_text("#ranking").splitlines() == ["Reply 3 = Reply 1", "Reply 2"]
            page.keyboard.press("Enter")  # one reply unplaced: refused on the page
            assert "Place every reply first (1 left)" in page.inner_text("#status")
            with page.expect_navigation():
                page.keyboard.press("4")
                page.keyboard.press("Enter")
            page.wait_for_selector("#done")
            assert dialogs == [] and page_errors == []
        finally:
            browser.close()
    with store.db.read() as s:
        ranks, order = s.execute(select(Label.ranks, Assignment.shown_order)
                                 .join(Assignment, Assignment.id == Label.assignment_id)).one()
    screen = [1, 2, 1, 3]  # shown positions 1..4: reply 1 and 3 first, 2 second, 4 third
    assert [ranks[reply] for reply in order] == screen
    assert [replies[reply] for reply in order] == shown


def test_pinned_question_long_conversation_and_narrow_screen(tmp_path):
    """The project's question stays on screen while the page scrolls; a long conversation shows its
    last user turn and folds the earlier ones; on a narrow screen the sides are called A and B."""
    from playwright.sync_api import sync_playwright

    db = f"sqlite:///{tmp_path / 'browser.db'}"
    store = new_store(db)
    turns = []
    for k in range(3):
        turns += [{"role": "user", "content": f"question {k} " + "words " * 200},
                  {"role": "assistant", "content": f"answer {k} " + "words " * 200}]
    turns.append({"role": "user", "content": "the last question: which is better?"})
    long_reply = "\n".join(f"line {i}" for i in range(300))
    write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0, prompt=turns, a={"role": "assistant", "content": long_reply})])
    store.admin.import_pairs("web", tmp_path / "pairs.jsonl", overlap=1, gold_rate=0.0,
                             question="Which reply is more helpful? <b>not bold</b>", guidelines="Be fair.")
    token = store.admin.add_annotator("web", "alice")
    with Server(db) as server, sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 450})
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}/a/{token}")
            page.wait_for_selector("#label-form")
            assert page.inner_text("#question") == "Which reply is more helpful? <b>not bold</b>"
            page.mouse.wheel(0, 3000)
            page.wait_for_timeout(300)
            assert page.evaluate("window.scrollY") > 150  # the page did scroll
            box = page.locator("#question").bounding_box()
            assert box is not None and 0 <= box["y"] < 60  # pinned at the top
            assert page.is_visible(".last-turn") and "the last question" in page.inner_text(".last-turn")
            assert not page.is_visible(".earlier .msg")  # folded until opened
            long_side = "left" if page.inner_text("#side-left .completion").startswith("line 0") else "right"
            assert page.is_visible(f"#side-{long_side} .more")  # the "scroll for more" hint
            assert page.get_attribute(f"#side-{long_side} .completion", "dir") == "auto"
            page.eval_on_selector(f"#side-{long_side} .completion", "e => { e.scrollTop = e.scrollHeight; }")
            page.wait_for_timeout(200)
            assert not page.is_visible(f"#side-{long_side} .more")
            assert page.inner_text("#side-left h2").startswith("Left")
            page.set_viewport_size({"width": 480, "height": 800})
            assert page.inner_text("#side-left h2").startswith("A") and page.inner_text("#side-right h2").startswith("B")
        finally:
            browser.close()


def test_adjudication_in_a_real_browser(tmp_path):
    """A lead signs in, opens the queue, reads the votes (hostile rationale shown as text) and decides;
    the decision is stored with their name and the queue empties."""
    from playwright.sync_api import sync_playwright

    from rlhfkit.annotate.models import Decision
    from rlhfkit.annotate.store import LabelInput

    db = f"sqlite:///{tmp_path / 'browser.db'}"
    store = new_store(db)
    admin = store.admin.ensure_admin_token()
    write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0)])
    store.admin.import_pairs("web", tmp_path / "pairs.jsonl", overlap=2, gold_rate=0.0)
    for name, side in (("alice", "a"), ("bob", "b")):  # they disagree (in pair terms)
        who = store.login_annotator(store.admin.add_annotator("web", name))[1]
        item = store.next_item(who)
        with store.db.read() as s:
            left = s.scalar(select(Assignment.left).where(Assignment.id == item.assignment_id))
        store.submit(who, LabelInput(f"{name}-sub-01", item.assignment_id, "left" if left == side else "right",
                                     rationale=XSS))
    dialogs, page_errors = [], []
    with Server(db) as server, sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}/admin/login")
            page.fill("input[name=token]", admin)
            with page.expect_navigation():
                page.click("button[type=submit]")
            page.goto(f"{server.url}/admin/projects/web/adjudication")
            with page.expect_navigation():
                page.click("#queue a")
            assert page.inner_text("#comparisons tr#c-0-1 td:nth-child(2)") == "1 / 0 / 1"
            assert [t for t in page.locator("#votes td.rationale").all_inner_texts()] == [XSS, XSS]
            page.fill("#c-0-1 input[name=decided_by]", "Dana")
            page.fill("#c-0-1 input[name=note]", "b answers the question")
            with page.expect_navigation():
                page.click("#c-0-1 button[value=b]")
            assert page.url.endswith("/admin/projects/web/adjudication")
            page.wait_for_selector("#empty")
            assert dialogs == [] and page_errors == []
        finally:
            browser.close()
    with store.db.read() as s:
        d = s.scalars(select(Decision)).one()
    assert (d.winner, d.decided_by, d.note, d.i, d.j) == ("b", "Dana", "b answers the question", 0, 1)


def test_markdown_replies_render_inert(tmp_path):
    """With the project's markdown option on, hostile markdown becomes bold text and a code block in
    a real browser, and nothing runs, loads or links."""
    from playwright.sync_api import sync_playwright

    db = f"sqlite:///{tmp_path / 'browser.db'}"
    store = new_store(db)
    text = "**bold** " + XSS + "\n\n```\n<script>alert('in code')</script>\n```"
    write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0, a={"role": "assistant", "content": text})])
    store.admin.import_pairs("web", tmp_path / "pairs.jsonl", overlap=1, gold_rate=0.0, markdown=True)
    token = store.admin.add_annotator("web", "alice")
    dialogs, requests = [], []
    with Server(db) as server, sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: requests.append(r.url))
            page.set_default_timeout(15_000)
            page.goto(f"{server.url}/a/{token}")
            page.wait_for_selector("#label-form")
            side = "left" if "bold" in page.inner_text("#side-left .completion") else "right"
            box = f"#side-{side} .completion"
            assert page.inner_text(f"{box} strong") == "bold"
            assert page.inner_text(f"{box} pre code") == "<script>alert('in code')</script>"
            assert page.locator(f"{box} a, {box} img, {box} script, {box} svg").count() == 0
            page.wait_for_timeout(300)
            assert dialogs == [] and all(u.startswith(server.url) for u in requests)
        finally:
            browser.close()


def test_a_link_followed_from_another_site_asks_first(tmp_path):
    """Login CSRF (issue 17): a link followed from another site (here a page with an opaque origin)
    shows the "Continue" page instead of signing in; the person's click then signs in, in a real
    browser (the SameSite=Strict form cookie set on the cross-site visit comes back with the click)."""
    from playwright.sync_api import sync_playwright

    db = f"sqlite:///{tmp_path / 'browser.db'}"
    store = new_store(db)
    write_jsonl(tmp_path / "pairs.jsonl", [pair_dict(0)])
    store.admin.import_pairs("web", tmp_path / "pairs.jsonl", overlap=1, gold_rate=0.0)
    token = store.admin.add_annotator("web", "alice")
    with Server(db) as server, sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.set_content(f'<a id="mail-link" href="{server.url}/a/{token}">your link</a>')  # "webmail"
            with page.expect_navigation():
                page.click("#mail-link")
            assert page.url == f"{server.url}/a/{token}" and page.is_visible("#continue")
            names = {c["name"] for c in page.context.cookies(f"{server.url}/a/{token}")}
            assert names == {"rlhfkit_login_csrf"}  # the form's cookie; no session yet
            with page.expect_navigation():
                page.click("#continue")
            assert page.url == f"{server.url}/label"
            page.wait_for_selector("#label-form")
            assert "alice" in page.inner_text(".who")
        finally:
            browser.close()
