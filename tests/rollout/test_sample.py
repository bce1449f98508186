"""`rlhfkit sample`: K completions per prompt → pairs of distinct completions with generation metadata."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from rlhfkit.cli.sample import main
from rlhfkit.data.io import load_pairs
from rlhfkit.rollout.sample import load_prompt_file, make_pairs, pick

ROW = {"id": "q1", "category": "advice", "messages": [{"role": "user", "content": "Hi?"}]}
META = {"seed": 0, "model": "tiny"}


def test_make_pairs_skips_duplicates_and_empty():
    """K = 5 with one duplicate ('b' twice, modulo whitespace) and one empty: 3 distinct → 3 pairs."""
    texts = ["a", "b", " b ", "", "c"]
    info = [{"tokens": 1, "ended": True}] * 5
    pairs, skipped = make_pairs(ROW, texts, info, META, "sentiment")
    assert skipped == 2
    assert [(p.a["content"], p.b["content"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert len({p.id for p in pairs}) == 3
    assert pairs[0].metadata["prompt_id"] == "q1" and pairs[0].metadata["category"] == "advice"
    assert pairs[0].task == "sentiment" and pairs[0].metadata["a_index"] == 0 and pairs[0].metadata["b_index"] == 1


def test_pick_is_a_seeded_subset_in_order():
    rows = [{"id": str(i)} for i in range(20)]
    a, b = pick(rows, 5, seed=1), pick(rows, 5, seed=1)
    assert a == b and len(a) == 5 and [int(r["id"]) for r in a] == sorted(int(r["id"]) for r in a)
    assert pick(rows, None, 0) == rows and pick(rows, 50, 0) == rows


def test_sample_command_writes_pairs_with_metadata(tmp_path):
    out_path = tmp_path / "pairs.jsonl"
    out = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "sample", "--model", "tiny", "--task", "sentiment",
                          "--split", "heldout", "--num-prompts", "3", "--k", "3", "--max-new-tokens", "8",
                          "--batch-size", "4", "--seed", "5", "--temperature", "1.0", "--out", str(out_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pairs = load_pairs(out_path)
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["prompts"] == 3 and summary["completions"] == 9 and summary["pairs"] == len(pairs)
    assert len({p.id for p in pairs}) == len(pairs)
    for p in pairs:
        assert p.a["content"] != p.b["content"] and p.task == "sentiment"
        m = p.metadata
        assert m["model"] == "tiny" and m["seed"] == 5 and m["split"] == "heldout" and m["k"] == 3
        assert m["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8}
        assert m["a_info"]["tokens"] <= 8 and isinstance(m["b_info"]["ended"], bool)
    # every prompt: all pairs (i < j) of its kept completions, once each; 3 prompts x K=3 completions in all
    by_prompt: dict = {}
    for p in pairs:
        by_prompt.setdefault(p.metadata["prompt_id"], []).append((p.metadata["a_index"], p.metadata["b_index"]))
    # a random tiny model at T = 1 over 49k tokens repeats no 8-token completion: nothing is skipped
    assert summary["skipped_duplicate_or_empty"] == 0 and len(by_prompt) == 3
    for idx in by_prompt.values():
        assert sorted(idx) == list(itertools.combinations(range(3), 2))


def test_same_seed_same_pairs(tmp_path, capsys):
    args = ["--model", "tiny", "--task", "concise", "--num-prompts", "2", "--k", "2", "--max-new-tokens", "6",
            "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


def test_prompt_file(tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "Say hi."}) + "\n"
                   + json.dumps({"id": "x", "messages": [{"role": "user", "content": "Say bye."}]}) + "\n")
    rows = load_prompt_file(str(src))
    assert [r["id"] for r in rows] == ["prompts:1", "x"] and rows[0]["messages"][0]["content"] == "Say hi."
    assert main(["--model", "tiny", "--prompts", str(src), "--k", "2", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "p.jsonl")]) == 0
    assert all(p.task is None and p.metadata["task"] is None for p in load_pairs(tmp_path / "p.jsonl"))


@pytest.mark.parametrize("line, message", [
    ({"text": "hi"}, "prompts.jsonl:2: no 'prompt' (a string or a message list) or 'messages' field; the row has 'text'"),
    ({"prompt": "  "}, "prompts.jsonl:2: field 'prompt': empty prompt"),
    ({"messages": [{"role": "assistant", "content": "hi"}]},
     "prompts.jsonl:2: field 'messages[0].role': wrong role order: expected 'user'"),
])
def test_bad_prompt_files(tmp_path, line, message):
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--prompts", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert message in str(e.value)


def test_bad_options(tmp_path, capsys):
    for args, message in [(["--task", "nope"], "unknown task 'nope'"), (["--task", "concise", "--k", "1"], "--k must be at least 2"),
                          (["--task", "concise", "--temperature", "0"], "--temperature must be > 0")]:
        with pytest.raises(SystemExit) as e:
            main(["--model", "tiny", *args, "--out", str(tmp_path / "o.jsonl")])
        assert message in str(e.value)
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--out", str(tmp_path / "o.jsonl")])  # neither --task nor --prompts
    assert "one of the arguments --task --prompts is required" in capsys.readouterr().err
