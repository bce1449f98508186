"""Load test for the annotation server: simulated annotators against a real server on loopback.

    python bench/annotate_load.py [--seconds 20] [--annotators 50] [--think-ms 1000] [--db URL]
                                  [--rankings 0.0]

Each simulated annotator signs in with their secret link at a random moment within the first think
time, then loops until the time is up:
load ``GET /label`` (timed as "page"), wait a think time drawn uniformly from
[0.5, 1.5] x ``--think-ms``, post the answer to ``POST /api/labels`` (timed as "submit"; a
transport error is retried with the same submission id, like the page's script does). A human
takes 10-60 s per comparison, so the default 1 s think time is a 10-60x harsher load than 50 real
people; ``--think-ms 0`` measures saturation instead. ``--rankings F`` makes a fraction F of the
items rankings of 4 replies (answered with random ranks); the default 0 is the original pairs-only
method, whose figures docs/annotate.md quotes.

After the run the server is stopped and the database is read directly: ``lost`` counts submissions
the server acknowledged with a 2xx that are not stored. ``errors`` counts non-2xx answers and
failed requests. The server's CPU time per request is printed as well: unlike latency it does not
depend on what else the machine is running.

The last line is machine-readable:

    RESULT p99_ms=<submit p99> errors=<n> lost=<n> p50_ms=<submit p50> page_p99_ms=<..> labels_per_s=<..>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhfkit.annotate.store import Store  # noqa: E402

FORM_VALUE = re.compile(r'name="(csrf_token|assignment_id)" value="([^"]*)"')
RANKING_FORM = re.compile(r'data-kind="ranking" data-n="(\d)"')
K_RANKING = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="length of the measured run (default %(default)s)")
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--think-ms", type=float, default=1000.0, help="mean think time per label (default %(default)s)")
    p.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file in a temp dir)")
    p.add_argument("--overlap", type=int, default=3)
    p.add_argument("--pairs", type=int, default=None, help="pairs to import (default: enough for the run)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--rankings", type=float, default=0.0,
                   help=f"fraction of items that are rankings of {K_RANKING} replies (default %(default)s: pairs only)")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_ms(fields: dict) -> float:
    """The server's own time for a request, from its ``Server-Timing: app;dur=<ms>`` header."""
    return float(fields.get("server-timing", "app;dur=nan").split("dur=")[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def setup(db: str, n_annotators: int, n_pairs: int, overlap: int, workdir: Path, rankings: float = 0.0) -> list[str]:
    store = Store(db)
    store.migrate()
    store.admin.ensure_admin_token()
    rng = random.Random(0)
    with open(workdir / "pairs.jsonl", "w") as f:
        for i in range(n_pairs):
            item = {"id": f"bench-{i}", "prompt": [{"role": "user", "content": f"Prompt {i}: " + "lorem ipsum " * 30}]}
            if rng.random() < rankings:
                item["replies"] = [{"role": "assistant", "content": f"Reply {k} to {i}. " + "dolor sit amet " * 60}
                                   for k in range(K_RANKING)]
            else:
                item["a"] = {"role": "assistant", "content": f"Reply A to {i}. " + "dolor sit amet " * 60}
                item["b"] = {"role": "assistant", "content": f"Reply B to {i}. " + "consectetur " * 60}
            f.write(json.dumps(item) + "\n")
    store.admin.import_pairs("bench", workdir / "pairs.jsonl", overlap=overlap, gold_rate=0.0)
    tokens = [store.admin.add_annotator("bench", f"sim{i:03d}") for i in range(n_annotators)]
    store.db.dispose()
    return tokens


class Browser:
    """A minimal HTTP/1.1 keep-alive client for one simulated annotator: one connection, one
    session cookie. A general client (httpx) spends ~5 ms of CPU per request here, more than the
    server; on a shared 2-CPU machine the load generator would then measure its own scheduling.
    Handles exactly what this server sends (Content-Length bodies)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.cookie: str | None = None
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict | None = None) -> tuple[int, dict, bytes]:
        reused = self.writer is not None
        try:
            return await self._request(method, path, body, headers)
        except ConnectionError:
            if not reused:
                raise
            # The server closed the idle keep-alive connection; the request never reached the app.
            return await self._request(method, path, body, headers)

    async def _request(self, method: str, path: str, body: bytes | None, headers: dict | None):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if self.cookie:
            lines.append(f"Cookie: {self.cookie}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        try:
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = {}
            for line in head[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    fields.setdefault(name.strip().lower(), value.strip())
            data = await self.reader.readexactly(int(fields.get("content-length", 0)))
        except (OSError, asyncio.IncompleteReadError):
            self.close()
            raise ConnectionError(f"{method} {path}: connection lost") from None
        if "set-cookie" in fields:
            self.cookie = fields["set-cookie"].split(";", 1)[0]
        if fields.get("connection") == "close":
            self.close()
        return int(head[0].split()[1]), fields, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def annotator(url: str, token: str, seed: int, deadline: float, think_s: float, out: dict) -> None:
    rng = random.Random(seed)
    # People do not all open their links in the same millisecond: start within one think time.
    await asyncio.sleep(rng.uniform(0.0, think_s))
    host, port = url.split("//")[1].split(":")
    browser = Browser(host, int(port))
    try:
        status, _, _ = await browser.request("GET", f"/a/{token}", headers={"Sec-Fetch-Site": "none"})
        if status != 303:
            out["errors"] += 1
            return
        k = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                status, fields, page = await browser.request("GET", "/label")
            except ConnectionError:
                out["errors"] += 1
                continue
            out["page_ms"].append((time.perf_counter() - t0) * 1000)
            out["page_server_ms"].append(server_ms(fields))
            form = dict(FORM_VALUE.findall(page.decode()))
            if status != 200 or "assignment_id" not in form:
                out["errors"] += status != 200
                out["exhausted"] += status == 200
                return
            await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
            answer = {"choice": rng.choice(["left", "right", "tie", "left", "right"])}
            ranking = RANKING_FORM.search(page.decode())
            if ranking:  # a ranking item: random ranks, ties allowed
                answer = {"choice": "rank", "ranks": [rng.randint(1, int(ranking.group(1)))
                                                      for _ in range(int(ranking.group(1)))]}
            body = json.dumps({"submission_id": f"b{seed:03d}-{k:06d}", "assignment_id": int(form["assignment_id"]),
                               **answer, "duration_ms": rng.randint(2000, 40000)}).encode()
            k += 1
            for attempt in range(5):  # like the page's script: retry with the same submission_id
                t0 = time.perf_counter()
                try:
                    status, fields, _ = await browser.request("POST", "/api/labels", body,
                                                              {"X-CSRF-Token": form["csrf_token"]})
                except ConnectionError:
                    out["retries"] += 1
                    await asyncio.sleep(0.1 * 2**attempt)
                    continue
                out["submit_ms"].append((time.perf_counter() - t0) * 1000)
                out["submit_server_ms"].append(server_ms(fields))
                if 200 <= status < 300:
                    out["acked"].append(json.loads(body)["submission_id"])
                else:
                    out["errors"] += 1
                break
            else:
                out["errors"] += 1
    finally:
        browser.close()


async def run_load(url: str, tokens: list[str], seconds: float, think_s: float) -> dict:
    out = {"page_ms": [], "submit_ms": [], "page_server_ms": [], "submit_server_ms": [], "acked": [], "errors": 0,
           "retries": 0, "exhausted": 0}
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(annotator(url, tok, i, deadline, think_s, out) for i, tok in enumerate(tokens)))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0.0 <= args.rankings <= 1.0:
        raise SystemExit(f"--rankings must be a fraction in [0, 1], got {args.rankings}")
    think_s = args.think_ms / 1000.0
    # Enough pairs that nobody runs dry: the most labels one annotator can give, times annotators.
    per_annotator = args.seconds / max(think_s * 0.5, 0.002)
    n_pairs = args.pairs or int(min(200_000, max(2000, per_annotator * args.annotators / args.overlap * 1.2)))
    with tempfile.TemporaryDirectory(prefix="annotate-bench-") as tmp:
        workdir = Path(tmp)
        db = args.db or f"sqlite:///{workdir / 'bench.db'}"
        t0 = time.perf_counter()
        tokens = setup(db, args.annotators, n_pairs, args.overlap, workdir, args.rankings)
        print(f"setup: {n_pairs} pairs, {args.annotators} annotators in {time.perf_counter() - t0:.1f} s "
              f"({db.split('://')[0]})", flush=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        # Its own session, like a server started by a service manager: with the kernel's autogroup
        # scheduling it then gets its own CPU share instead of splitting one with the load generator.
        server = subprocess.Popen([str(Path(sys.executable).with_name("rlhfkit")), "annotate", "serve", "--db", db,
                                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                  cwd=REPO, start_new_session=True)
        try:
            for _ in range(300):
                try:
                    if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            else:
                raise SystemExit("server did not start")
            cpu0, wall0, client0 = cpu_seconds(server.pid), time.perf_counter(), time.process_time()
            out = asyncio.run(run_load(url, tokens, args.seconds, think_s))
            wall = time.perf_counter() - wall0
            cpu, client_cpu = cpu_seconds(server.pid) - cpu0, time.process_time() - client0
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        store = Store(db)
        from sqlalchemy import select

        from rlhfkit.annotate.models import Label
        with store.db.read() as s:
            stored = set(s.scalars(select(Label.submission_id)))
        store.db.dispose()

    lost = len(set(out["acked"]) - stored)
    submit, page = np.array(out["submit_ms"] or [np.nan]), np.array(out["page_ms"] or [np.nan])
    n_requests = len(out["submit_ms"]) + len(out["page_ms"]) + args.annotators
    res = {
        "p99_ms": float(np.percentile(submit, 99)), "errors": out["errors"], "lost": lost,
        "p50_ms": float(np.percentile(submit, 50)), "page_p99_ms": float(np.percentile(page, 99)),
        "labels_per_s": len(out["acked"]) / wall,
        "page_p50_ms": float(np.percentile(page, 50)), "submit_max_ms": float(np.max(submit)),
        "submit_server_p99_ms": float(np.nanpercentile(out["submit_server_ms"] or [np.nan], 99)),
        "page_server_p99_ms": float(np.nanpercentile(out["page_server_ms"] or [np.nan], 99)),
        "labels": len(out["acked"]), "requests": n_requests, "retries": out["retries"],
        "server_cpu_ms_per_request": cpu / max(n_requests, 1) * 1000, "server_cpu_util": cpu / wall,
        "client_cpu_util": client_cpu / wall,
        "annotators": args.annotators, "think_ms": args.think_ms, "rankings": args.rankings, "seconds": wall,
        "load_avg_1m": os.getloadavg()[0],
    }
    print(f"{res['labels']} labels in {wall:.1f} s by {args.annotators} annotators (think {args.think_ms:g} ms); "
          f"{n_requests} requests; transport retries {out['retries']}; ran out of pairs: {out['exhausted']}")
    print(f"submit: p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, max {res['submit_max_ms']:.1f} ms; "
          f"page: p50 {res['page_p50_ms']:.1f} ms, p99 {res['page_p99_ms']:.1f} ms")
    print(f"inside the server (Server-Timing): submit p99 {res['submit_server_p99_ms']:.1f} ms, page p99 "
          f"{res['page_server_p99_ms']:.1f} ms; the rest of the latency above is the network stack and the "
          "scheduling of both processes")
    print(f"server CPU {res['server_cpu_ms_per_request']:.2f} ms/request ({res['server_cpu_util']:.0%} of a core), "
          f"load generator {res['client_cpu_util']:.0%} of a core; machine load average {res['load_avg_1m']:.1f} "
          f"on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(f"RESULT p99_ms={res['p99_ms']:.1f} errors={res['errors']} lost={res['lost']} p50_ms={res['p50_ms']:.1f} "
          f"page_p99_ms={res['page_p99_ms']:.1f} labels_per_s={res['labels_per_s']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
