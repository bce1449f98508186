"""``rlhfkit annotate <command>``: run a human preference annotation project.

    init           create or upgrade the database; print the admin token (once)
    serve          run the web app
    import         add pairs (and/or gold answers, reward-model uncertainty) to a project
    score          write reward-model uncertainty scores for a pairs file (what import --uncertainty reads)
    add-annotator  create an annotator and print their secret link
    new-link       replace an annotator's link (the old one stops working)
    deactivate-annotator / activate-annotator (reactivation prints a new link)
    export         write PreferenceRecords (jsonl or a Hugging Face dataset directory)
    stats          print agreement and annotator-quality figures

Every command takes ``--db URL`` (default ``$RLHFKIT_ANNOTATE_DB`` or ``sqlite:///annotate.db``) and
brings the schema up to date first. Only ``init`` creates a database: the others refuse one that does
not exist (a mistyped ``--db``). See docs/annotate.md.

The annotation modules are imported inside the commands: they need the optional ``annotate`` extra
(FastAPI, SQLAlchemy), and ``score`` needs torch, which the other commands should not wait for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_DB = "sqlite:///annotate.db"


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from rlhfkit.annotate.store import Refused
    from rlhfkit.data.records import DataError

    try:
        return args.run(args)
    except (DataError, Refused, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhfkit annotate", description="Human preference annotation.")
    sub = p.add_subparsers(dest="command", metavar="command")

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--db", default=os.environ.get("RLHFKIT_ANNOTATE_DB", DEFAULT_DB),
                       help="database URL: sqlite:///path.db or postgresql+psycopg://user:pw@host/db "
                            "(default: $RLHFKIT_ANNOTATE_DB or %(default)s)")
        c.set_defaults(run=run)
        return c

    c = command("init", cmd_init, "create or upgrade the schema and print a new admin token")
    c.add_argument("--new-admin-token", action="store_true",
                   help="revoke the existing admin token(s) and sessions, print a new token")

    c = command("serve", cmd_serve, "run the annotation web app")
    c.add_argument("--max-body-kb", type=int, default=1024,
                   help="largest request body an annotator may send, in KiB (default %(default)s); larger "
                        "ones get 413. Sign-in is checked before any of the body is read")
    c.add_argument("--max-upload-mb", type=int, default=64,
                   help="largest body the signed-in admin may send (a pairs file uploaded in the web UI), "
                        "in MiB (default %(default)s)")
    c.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; "
                                                      "use 0.0.0.0 only behind HTTPS)")
    c.add_argument("--port", type=int, default=8000)
    c.add_argument("--secure-cookies", action="store_true",
                   help="mark cookies Secure (when served over HTTPS, e.g. behind a reverse proxy)")
    c.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    c = command("import", cmd_import, "import comparison pairs, gold answers and/or uncertainty scores")
    c.add_argument("pairs", nargs="?", help="pairs.jsonl: one ComparisonPair per line")
    c.add_argument("--project", required=True)
    c.add_argument("--overlap", type=int, default=3, help="annotators per pair (default %(default)s)")
    c.add_argument("--gold-rate", type=float, default=None,
                   help="fraction of each annotator's items that are gold checks (new project: 0.1)")
    c.add_argument("--gold", help='gold answers: {"id", "winner": "a"|"b"} per line')
    c.add_argument("--uncertainty", help='reward-model scores {"id", "p": P(a better) or [p, ...]} per line: '
                                        "serve the most uncertain pairs first")
    c.add_argument("--skip-existing", action="store_true", help="ignore pairs already in the project")
    c.add_argument("--guidelines", help="a text file of instructions shown above every pair (plain text)")
    c.add_argument("--ratings", metavar="SPEC", help='aspects annotators rate for every reply, e.g. '
                                                     '"helpfulness=1-5,harmlessness=1-5,honesty=1-5" ("" removes them)')
    c.add_argument("--markdown", choices=["on", "off"], help="show prompts and replies as inert markdown (bold, "
                                                             "lists, code blocks; never links or images) or as "
                                                             "plain text (the default)")
    c.add_argument("--question", help='the question pinned above every item, e.g. "Which reply is more helpful?" '
                                      '("" removes it)')

    c = command("score", cmd_score, "score pairs with reward model(s): P(a better) per pair, the file "
                                    "`import --uncertainty` reads to serve the most uncertain pairs first")
    c.add_argument("--rm", action="append", required=True, metavar="PATH",
                   help="reward model directory (a checkpoint of `rlhfkit reward train`); repeat for an "
                        "ensemble: p becomes a list and the priority their disagreement")
    c.add_argument("--pairs", required=True, help="pairs.jsonl (ComparisonPairs, as imported)")
    c.add_argument("--out", required=True, help='where to write {"id", "p"} lines')
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--force", action="store_true", help="replace --out if it exists")

    def with_link(c):
        c.add_argument("name")
        c.add_argument("--project", required=True)
        c.add_argument("--base-url", default="http://127.0.0.1:8000",
                       help="where annotators reach the server (default %(default)s)")

    with_link(command("add-annotator", cmd_add_annotator, "create an annotator and print their secret link"))
    with_link(command("new-link", cmd_new_link, "replace an annotator's secret link: the old one stops working "
                                                "and their sessions end; print the new one"))
    c = command("deactivate-annotator", cmd_set_active, "end the annotator's sessions, void their link and free "
                                                        "their open items")
    c.add_argument("name")
    c.add_argument("--project", required=True)
    c.set_defaults(active=False)
    c = command("activate-annotator", cmd_set_active, "allow a deactivated annotator again, with a new link "
                                                      "(the old one stays void)")
    with_link(c)
    c.set_defaults(active=True)

    c = command("export", cmd_export, "write labelled pairs as PreferenceRecords")
    c.add_argument("--project", required=True)
    c.add_argument("--format", choices=["jsonl", "hf-dataset"], default="jsonl")
    c.add_argument("--out", required=True, help="a .jsonl file, or a directory for hf-dataset")
    c.add_argument("--votes", action="store_true", help="one record per individual vote")
    c.add_argument("--rankings", action="store_true",
                   help="write the ranking items' rankings (one object per item, jsonl) instead of PreferenceRecords; "
                        "without it, each ranking is exported as its implied pairs")
    c.add_argument("--consensus", choices=["majority", "dawid-skene"], default="majority")
    c.add_argument("--min-votes", type=int, default=1, help="leave out pairs with fewer votes")
    c.add_argument("--include-gold", action="store_true", help="also export gold pairs")
    c.add_argument("--drop-unsafe", action="store_true", help="leave out pairs flagged unsafe by anyone")
    c.add_argument("--exclude-annotator", action="append", default=[], metavar="NAME",
                   help="ignore this annotator's votes (repeatable)")
    c.add_argument("--min-gold-accuracy", type=float, default=None,
                   help="ignore annotators whose gold accuracy is below this")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")

    c = command("stats", cmd_stats, "print agreement and annotator-quality statistics")
    c.add_argument("--project", required=True)
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")
    c.add_argument("--min-gold", type=float, default=0.8, help="mark annotators whose gold accuracy is below "
                                                                "this (default %(default)s)")
    c.add_argument("--min-agree", type=float, default=0.6, help="mark annotators whose agreement with the others "
                                                                 "is below this (default %(default)s)")
    return p


def _store(args, create: bool = False):
    """The store, its schema brought up to date. Only ``init`` may ``create`` the database: elsewhere
    a database that does not exist is a mistyped ``--db``, refused before anything is written."""
    from rlhfkit.annotate.db import check_exists
    from rlhfkit.annotate.store import Store

    if not create:
        check_exists(args.db, hint="create it with `rlhfkit annotate init --db URL`, or check --db / "
                                   "$RLHFKIT_ANNOTATE_DB for a typo")
    store = Store(args.db)
    store.migrate()
    return store


def _link(args, token: str) -> str:
    return f"{args.base_url.rstrip('/')}/a/{token}"


def cmd_init(args) -> int:
    store = _store(args, create=True)
    token = store.admin.ensure_admin_token(rotate=args.new_admin_token)
    if token is None:
        print(f"database {args.db} is up to date; an admin token exists already "
              "(lost it? run init --new-admin-token)")
    else:
        print(f"database {args.db} is ready.")
        print(f"admin token (shown once; sign in at /admin/login): {token}")
    return 0


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from rlhfkit.annotate.server import create_app

    store = _store(args)
    token = store.admin.ensure_admin_token()
    if token is not None:
        print(f"new database: admin token (shown once; sign in at /admin/login): {token}", flush=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app = create_app(store, secure_cookies=args.secure_cookies, max_body_bytes=args.max_body_kb * 1024,
                     max_upload_bytes=args.max_upload_mb * 1024 * 1024)
    # uvicorn's own access log would print /a/<token> links; ours (rlhfkit.annotate.access) redacts them.
    # Keep idle connections 75 s (nginx's default) instead of uvicorn's 5: annotators think for tens
    # of seconds between requests, and a new connection (TLS behind a proxy) costs more than an idle one.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level=args.log_level,
                timeout_graceful_shutdown=5, timeout_keep_alive=75)
    return 0


def cmd_import(args) -> int:
    if (args.pairs, args.gold, args.uncertainty, args.gold_rate, args.guidelines, args.question,
            args.ratings, args.markdown) == (None,) * 8:
        raise ValueError("nothing to import: give pairs.jsonl and/or --gold FILE, --uncertainty FILE, "
                         "--guidelines FILE (or only --gold-rate R to change the project's gold rate)")
    from rlhfkit.annotate.imports import read_guidelines

    guidelines = None if args.guidelines is None else read_guidelines(args.guidelines)
    r = _store(args).admin.import_pairs(args.project, args.pairs, overlap=args.overlap, gold_rate=args.gold_rate,
                                  gold_path=args.gold, uncertainty_path=args.uncertainty,
                                  skip_existing=args.skip_existing, guidelines=guidelines,
                                  question=args.question, ratings=args.ratings,
                                  markdown=None if args.markdown is None else args.markdown == "on")
    what = "created project" if r.created_project else "project"
    print(f"{what} {r.project}: imported {r.n_pairs} pairs" + (f" (overlap {args.overlap})" if r.n_pairs else "")
          + (f", skipped {r.n_existing_skipped} already present" if r.n_existing_skipped else "")
          + f"; {r.n_gold} gold pairs in the project; gold rate {r.gold_rate:g}"
          + (f" (was {r.previous_gold_rate:g})" if r.previous_gold_rate is not None else "")
          + (f"; uncertainty scores for {r.n_scored} pairs" if r.n_scored else "")
          + ("; guidelines set" if guidelines is not None else "")
          + ("; question set" if args.question else "; question removed" if args.question == "" else "")
          + ("; ratings set" if args.ratings else "; ratings removed" if args.ratings == "" else "")
          + (f"; markdown {args.markdown}" if args.markdown else ""))
    if r.gold_rate > 0 and r.n_gold == 0:
        print("note: the gold rate has no effect until gold pairs exist (metadata.gold_winner or --gold FILE)")
    return 0


def cmd_add_annotator(args) -> int:
    token = _store(args).admin.add_annotator(args.project, args.name)
    print(f"annotator {args.name} added to {args.project}. Secret link (shown once; send it privately):")
    print(_link(args, token))
    return 0


def cmd_new_link(args) -> int:
    token = _store(args).admin.new_link(args.project, args.name)
    print(f"annotator {args.name}: the old link no longer works. New secret link (shown once; send it privately):")
    print(_link(args, token))
    return 0


def cmd_set_active(args) -> int:
    token = _store(args).admin.set_annotator_active(args.project, args.name, args.active)
    print(f"annotator {args.name} is now {'active' if args.active else 'deactivated'}")
    if token is not None:
        print("their old link stays void. New secret link (shown once; send it privately):")
        print(_link(args, token))
    return 0


def cmd_score(args) -> int:
    """P(a better) = sigmoid(r_a - r_b) (Bradley-Terry, the model reward training fits) on the raw
    head outputs: normalisation constants rescale r and would change P."""
    from pathlib import Path

    import torch

    from rlhfkit.annotate.export import write_jsonl
    from rlhfkit.annotate.imports import read_pairs
    from rlhfkit.models.heads import RewardModel

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    # Ranking items (K replies) are left out: the scores are P(a better) of a pair.
    pairs = [pair for _, pair, replies in read_pairs(args.pairs) if replies is None]
    if not pairs:
        raise ValueError(f"{args.pairs}: no pairs to score (ranking items are not scored)")
    prompts = [p.prompt for p in pairs]
    per_model = []
    for path in args.rm:
        try:
            rm = RewardModel.load(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"--rm {path}: {e}") from None
        r_a = rm.score(prompts, [p.a["content"] for p in pairs], batch_size=args.batch_size, normalized=False)
        r_b = rm.score(prompts, [p.b["content"] for p in pairs], batch_size=args.batch_size, normalized=False)
        per_model.append(torch.sigmoid(r_a - r_b).tolist())
    rows = [{"id": pair.id, "p": ps[0] if len(ps) == 1 else ps} for pair, ps in zip(pairs, zip(*per_model))]
    write_jsonl(rows, out)
    print(f"wrote P(a better) from {len(args.rm)} reward model(s) for {len(rows)} pairs to {out}; import it with "
          f"`rlhfkit annotate import --project P --uncertainty {out}`")
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from rlhfkit.annotate.export import ExportOptions, build_rankings, export, write_jsonl

    if args.rankings:
        if args.format != "jsonl":
            raise ValueError("--rankings writes jsonl only")
        out = Path(args.out)
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
        rows = build_rankings(_store(args), args.project, tuple(args.exclude_annotator))
        if not rows:
            raise ValueError("no rankings to export: no ranking item has a ranking yet. Nothing was written")
        write_jsonl(rows, out)
        print(f"wrote {len(rows)} ranking items with {sum(len(r['rankings']) for r in rows)} rankings to {out}")
        return 0

    opts = ExportOptions(format=args.format, votes=args.votes, consensus=args.consensus, min_votes=args.min_votes,
                         include_gold=args.include_gold, drop_unsafe=args.drop_unsafe,
                         exclude_annotators=tuple(args.exclude_annotator),
                         min_gold_accuracy=args.min_gold_accuracy, force=args.force)
    r = export(_store(args), args.project, args.out, opts)  # refuses (exit 1) when nothing is left
    print(f"wrote {r.records} {'vote' if args.votes else 'consensus'} records to {args.out} ({args.format}); "
          + r.summary())
    return 0


def cmd_stats(args) -> int:
    from rlhfkit.annotate.quality import Thresholds
    from rlhfkit.annotate.stats import format_table, json_safe, project_stats

    thresholds = Thresholds(min_gold=args.min_gold, min_agree=args.min_agree)
    stats = project_stats(_store(args), args.project, thresholds)
    print(json.dumps(json_safe(stats), indent=1) if args.json else format_table(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
