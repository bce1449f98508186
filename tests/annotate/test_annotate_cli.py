"""``rlhfkit annotate ...``: every subcommand end to end, and its errors.

Most calls go through ``rlhfkit.cli.annotate.main(argv)`` in-process (what ``rlhfkit annotate``
calls); a few run the installed ``rlhfkit annotate`` as a subprocess to prove the entry point.
"""

from __future__ import annotations

import json
import re

import pytest
from annotate_helpers import pair_dict, run_cli, write_jsonl, write_pairs

from rlhfkit.annotate.store import LabelInput, Store
from rlhfkit.cli.annotate import main
from rlhfkit.data.records import PreferenceRecord


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_module_entry_point_and_init(tmp_path):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    first = run_cli("init", "--db", db)
    token = re.search(r"admin token \(shown once; sign in at /admin/login\): (\S+)", first.stdout).group(1)
    assert Store(db).admin_token_ok(token)
    again = run_cli("init", "--db", db)
    assert "admin token exists already" in again.stdout and token not in again.stdout
    assert "export" in run_cli("--help").stdout


def test_full_project_from_the_command_line(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'p.db'}"
    pairs = write_pairs(tmp_path / "pairs.jsonl", 6, n_gold=1)
    gold = write_jsonl(tmp_path / "gold.jsonl", [{"id": "p1", "winner": "b"}])
    scores = write_jsonl(tmp_path / "rm.jsonl", [{"id": "p2", "p": 0.5}, {"id": "p3", "p": [0.2, 0.8]}])
    assert cli(capsys, "init", "--db", db)[0] == 0
    code, out, _ = cli(capsys, "import", str(pairs), "--project", "demo", "--db", db, "--overlap", "2",
                       "--gold-rate", "0.2", "--gold", str(gold), "--uncertainty", str(scores))
    assert code == 0, out
    assert out.strip() == ("created project demo: imported 6 pairs (overlap 2); 2 gold pairs in the project; "
                           "gold rate 0.2; uncertainty scores for 2 pairs")
    guide = tmp_path / "guide.txt"
    guide.write_text("Pick the more helpful reply.")
    code, out, _ = cli(capsys, "import", "--project", "demo", "--db", db, "--gold-rate", "0", "--guidelines", str(guide))
    assert code == 0 and "gold rate 0 (was 0.2); guidelines set" in out
    links = {}
    for name in ("alice", "bob"):
        code, out, _ = cli(capsys, "add-annotator", name, "--project", "demo", "--db", db,
                           "--base-url", "https://label.example.org/")
        assert code == 0
        links[name] = re.search(r"^https://label\.example\.org/a/(\S+)$", out, re.M).group(1)
    store = Store(db)
    for name in ("alice", "bob"):
        who = store.login_annotator(links[name])[1]
        for k in range(4):
            item = store.next_item(who)
            store.submit(who, LabelInput(f"{name}-{k:05d}", item.assignment_id, "left" if k % 2 else "tie"))
    code, out, _ = cli(capsys, "stats", "--project", "demo", "--db", db)
    assert code == 0 and "Fleiss kappa" in out and "Krippendorff alpha (ordinal)" in out
    assert re.search(r"^alice\s+4\s+0\s+0\s", out, re.M)
    code, out, _ = cli(capsys, "stats", "--project", "demo", "--db", db, "--json")
    stats = json.loads(out)
    assert stats["n_votes"] + sum(a["gold_items"] for a in stats["annotators"]) == 8

    out_path = tmp_path / "prefs.jsonl"
    code, out, _ = cli(capsys, "export", "--project", "demo", "--db", db, "--format", "jsonl", "--out", str(out_path))
    assert code == 0 and out.startswith("wrote ")
    records = [PreferenceRecord.from_dict(json.loads(line)) for line in out_path.read_text().splitlines()]
    assert records and all(r.source == "human" and r.annotator_id == "consensus" for r in records)
    code, _, err = cli(capsys, "export", "--project", "demo", "--db", db, "--out", str(out_path))
    assert code == 1 and "exists; pass --force" in err
    code, out, _ = cli(capsys, "export", "--project", "demo", "--db", db, "--out", str(out_path), "--votes", "--force")
    assert code == 0 and "vote records" in out
    assert {json.loads(x)["annotator_id"] for x in out_path.read_text().splitlines()} == {"alice", "bob"}

    import datasets

    hf = tmp_path / "hf"
    code, out, _ = cli(capsys, "export", "--project", "demo", "--db", db, "--format", "hf-dataset", "--out", str(hf))
    assert code == 0
    ds = datasets.load_from_disk(str(hf))
    assert len(ds) == len(records) and PreferenceRecord.from_dict(ds[0]).source == "human"

    code, out, _ = cli(capsys, "deactivate-annotator", "bob", "--project", "demo", "--db", db)
    assert code == 0 and Store(db).login_annotator(links["bob"]) is None
    code, out, _ = cli(capsys, "activate-annotator", "bob", "--project", "demo", "--db", db)
    new = re.search(r"^http://127\.0\.0\.1:8000/a/(\S+)$", out, re.M).group(1)
    assert code == 0 and Store(db).login_annotator(new) is not None
    assert Store(db).login_annotator(links["bob"]) is None  # the old link stays void
    code, out, _ = cli(capsys, "new-link", "bob", "--project", "demo", "--db", db, "--base-url", "https://x.org")
    newer = re.search(r"^https://x\.org/a/(\S+)$", out, re.M).group(1)
    assert code == 0 and Store(db).login_annotator(newer) is not None and Store(db).login_annotator(new) is None


@pytest.mark.parametrize("argv_tail, message", [
    (["--project", "demo"], "nothing to import"),
    (["PAIRS", "--project", "bad name"], "--project: 'bad name' is not a valid name"),
    (["PAIRS", "--project", "demo", "--overlap", "0"], "--overlap must be at least 1"),
    (["PAIRS", "--project", "demo", "--gold-rate", "1.5"], "--gold-rate must be in [0, 1]"),
    (["BAD", "--project", "demo"], "bad.jsonl:2: field 'b': the two sides are identical"),
    (["MISSING", "--project", "demo"], "missing.jsonl: cannot read file"),
])
def test_import_errors(tmp_path, capsys, argv_tail, message):
    db = f"sqlite:///{tmp_path / 'e.db'}"
    files = {"PAIRS": str(write_pairs(tmp_path / "pairs.jsonl", 2)),
             "BAD": str(write_jsonl(tmp_path / "bad.jsonl", [pair_dict(0), pair_dict(1, b=pair_dict(1)["a"])])),
             "MISSING": str(tmp_path / "missing.jsonl")}
    assert cli(capsys, "init", "--db", db)[0] == 0
    code, _, err = cli(capsys, "import", *[files.get(a, a) for a in argv_tail], "--db", db)
    assert code == 1 and err.startswith("error: ") and message in err


def test_other_command_errors(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'e.db'}"
    code, _, err = cli(capsys, "init", "--db", "annotate.db")
    assert code == 1 and "--db expects a database URL such as sqlite:///annotate.db" in err
    assert cli(capsys, "init", "--db", db)[0] == 0
    code, _, err = cli(capsys, "stats", "--project", "nope", "--db", db)
    assert code == 1 and "no project 'nope'" in err
    cli(capsys, "import", str(write_pairs(tmp_path / "p.jsonl", 2)), "--project", "demo", "--db", db)
    assert cli(capsys, "add-annotator", "ann", "--project", "demo", "--db", db)[0] == 0
    code, _, err = cli(capsys, "add-annotator", "ann", "--project", "demo", "--db", db)
    assert code == 1 and "annotator 'ann' already exists in project 'demo'" in err
    code, _, err = cli(capsys, "deactivate-annotator", "zed", "--project", "demo", "--db", db)
    assert code == 1 and "no annotator 'zed'" in err
    with pytest.raises(SystemExit) as e:
        main(["export", "--project", "demo", "--db", db, "--out", "x", "--format", "csv"])
    assert e.value.code == 2 and "invalid choice: 'csv'" in capsys.readouterr().err
    assert main([]) == 2
