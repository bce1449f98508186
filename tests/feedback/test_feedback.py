"""Labelers: the simulated annotator's noise rates, the judge's order swap, the RM labeler, `rlhfkit label`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from rlhfkit.data.records import ComparisonPair
from rlhfkit.data.tasks import Task
from rlhfkit.feedback.judge import LMJudge, judge_pairs, judge_prefs, position_stats
from rlhfkit.feedback.labeling import LabelerOptionError, label_pairs, write_labels
from rlhfkit.feedback.rm import label_with_rm
from rlhfkit.feedback.simulated import SimulatedAnnotator, gold_winner, pair_gold_scores


class NumberTask(Task):
    """Gold = the number the reply is made of, so a test sets every gold score directly."""

    name = "number"

    def _gold_one(self, prompt: str, completion: str) -> float:
        return float(completion)


def pair(i: int, a: str, b: str, task: str | None = None) -> ComparisonPair:
    return ComparisonPair(id=f"p{i}", prompt=[{"role": "user", "content": f"question {i % 7}"}],
                          a={"role": "assistant", "content": a}, b={"role": "assistant", "content": b}, task=task)


def winners(pairs, records) -> list[str]:
    return ["tie" if r.tie else "a" if r.chosen["content"] == p.a["content"] else "b" for p, r in zip(pairs, records)]


def binomial_ok(k: int, n: int, p: float, z: float = 4.0) -> bool:
    """|k/n - p| within z standard errors (z = 4: a false alarm about once in 16,000 runs; seeded anyway)."""
    return abs(k / n - p) <= z * math.sqrt(p * (1 - p) / n)


# --- simulated annotator -------------------------------------------------------------------------


def test_ties_exactly_below_threshold():
    pairs = [pair(i, "0.50", b) for i, b in enumerate(["0.50", "0.51", "0.529", "0.531", "0.2", "0.9"])]
    ann = SimulatedAnnotator(task=NumberTask(), tie_threshold=0.03, temperature=0.0, flip_prob=0.0)
    got = winners(pairs, ann.label(pairs))
    assert got == ["tie", "tie", "tie", "b", "a", "b"]
    assert gold_winner(0.5, 0.531, 0.03) == "b" and gold_winner(0.5, 0.52, 0.03) == "tie"


@pytest.mark.parametrize("flip_prob", [0.0, 0.1, 0.25, 1.0])
def test_flip_rate_matches_parameter(flip_prob):
    """Temperature 0 and clear gaps: every disagreement with the gold order is a flip, so the
    disagreement count is Binomial(n, flip_prob)."""
    n = 3000
    pairs = [pair(i, "0.9", "0.1") if i % 2 else pair(i, "0.1", "0.9") for i in range(n)]
    records = SimulatedAnnotator(task=NumberTask(), temperature=0.0, flip_prob=flip_prob, seed=3).label(pairs)
    gold = ["a" if i % 2 else "b" for i in range(n)]
    disagree = sum(w != g for w, g in zip(winners(pairs, records), gold))
    assert disagree == sum(r.metadata["flipped"] for r in records)
    if flip_prob in (0.0, 1.0):
        assert disagree == flip_prob * n
    else:
        assert binomial_ok(disagree, n, flip_prob), disagree / n


def test_bradley_terry_draw_matches_sigmoid():
    """No flips, gap 0.1 at temperature 0.1: P(higher gold wins) = σ(1) = 0.7311."""
    n = 3000
    pairs = [pair(i, "0.6", "0.5") for i in range(n)]
    records = SimulatedAnnotator(task=NumberTask(), temperature=0.1, flip_prob=0.0).label(pairs)
    k = sum(w == "a" for w in winners(pairs, records))
    p = 1 / (1 + math.exp(-1.0))
    assert records[0].metadata["p_a"] == pytest.approx(p)
    assert binomial_ok(k, n, p), k / n


def test_labels_are_per_pair_deterministic():
    pairs = [pair(i, "0.6", "0.5") for i in range(50)]
    ann = SimulatedAnnotator(task=NumberTask(), temperature=0.1, seed=7)
    first = winners(pairs, ann.label(pairs))
    rev = winners(pairs[::-1], ann.label(pairs[::-1]))[::-1]
    assert first == rev  # same label whatever the order
    other = winners(pairs, SimulatedAnnotator(task=NumberTask(), temperature=0.1, seed=8).label(pairs))
    assert other != first


def test_metadata_keeps_gold_and_ceiling_formula():
    (rec,) = SimulatedAnnotator(task=NumberTask(), temperature=0.0, flip_prob=0.0).label([pair(0, "0.2", "0.7")])
    assert rec.source == "simulated" and rec.chosen["content"] == "0.7"
    assert rec.metadata["gold_chosen"] == 0.7 and rec.metadata["gold_rejected"] == 0.2
    assert rec.metadata["gold_a"] == 0.2 and rec.metadata["gold_winner"] == "b"
    # ceiling: flip 0.25, T = 0 → 0.75; T = 0.1, gap 0.1 → 0.75·σ(1) + 0.25·(1 - σ(1)) = 0.6155
    assert SimulatedAnnotator(flip_prob=0.25, temperature=0).expected_agreement(0.2, 0.7) == pytest.approx(0.75)
    s = 1 / (1 + math.exp(-1))
    assert SimulatedAnnotator(flip_prob=0.25, temperature=0.1).expected_agreement(0.6, 0.5) == pytest.approx(
        0.75 * s + 0.25 * (1 - s))


def test_bad_parameters_and_missing_task():
    with pytest.raises(ValueError, match="flip_prob must be in"):
        SimulatedAnnotator(flip_prob=1.5)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SimulatedAnnotator(temperature=-1)
    with pytest.raises(ValueError, match="pair 'p0' has no task"):
        pair_gold_scores([pair(0, "x", "y")])


# --- judge ------------------------------------------------------------------------------------------


def biased_scorer(bias: float):
    """A stub judge: log-odds for the first-shown reply = quality(first) - quality(second) + bias,
    quality being the number the reply is made of. A position bias of ``bias`` nats."""
    def score(items):
        return torch.tensor([float(first) - float(second) + bias for _, first, second in items])
    return score


def test_order_swap_cancels_position_bias():
    """bias = 1: gaps above 1 survive the swap; gaps below 1 give 'first' in both orders → tie.
    Pair 0 (a=3, b=0): s_ab = 3+1 = 4 > 0 (a), s_ba = -3+1 = -2 < 0 (a) → a.
    Pair 1 (a=0, b=0.5): s_ab = -0.5+1 > 0 (a), s_ba = 0.5+1 > 0 (b) → tie.
    Pair 2 (a=0, b=2): s_ab = -1 (b), s_ba = 3 (b) → b.
    Pair 3 (a=0.2, b=0): s_ab = 1.2 (a), s_ba = 0.8 > 0 (b) → tie.
    Position bias rate = 2/4; first-position votes = (1+0+... ) → s>0 in 1,1,0,1 and 0,1,1,1 = 6 of 8."""
    pairs = [pair(0, "3", "0"), pair(1, "0", "0.5"), pair(2, "0", "2"), pair(3, "0.2", "0")]
    records = judge_pairs(pairs, biased_scorer(1.0))
    assert winners(pairs, records) == ["a", "tie", "b", "tie"]
    assert position_stats(records) == {"position_bias_rate": 0.5, "first_position_rate": 0.75}
    assert all(r.source == "judge" for r in records)
    # p_a = ½[σ(4) + σ(2)] for pair 0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert records[0].metadata["p_a"] == pytest.approx(0.5 * (sig(4) + sig(2)))


def test_unbiased_judge_never_ties():
    pairs = [pair(i, str(i % 5), str((i + 2) % 7)) for i in range(20)]
    pairs = [p for p in pairs if p.a["content"] != p.b["content"]]
    records = judge_pairs(pairs, biased_scorer(0.0))
    assert position_stats(records)["position_bias_rate"] == 0.0
    assert winners(pairs, records) == ["a" if float(p.a["content"]) > float(p.b["content"]) else "b" for p in pairs]


def test_judge_prefs_per_prompt():
    """The same swap logic as judge_pairs, as per-prompt preferences for `rlhfkit eval --judge lm:`:
    prompt 0 a=3 vs b=0 → 1; prompt 1 a=0 vs b=0.5 with bias 1 → tie ½; prompt 2 a=0 vs b=2 → 0;
    identical (prompt 3) and empty (prompt 4) replies are ties that the scorer is never asked about."""
    asked = []

    def scorer(items):
        asked.extend(items)
        return biased_scorer(1.0)(items)

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    prefs = judge_prefs(scorer, prompts, ["3", "0", "0", "1", " "], ["0", "0.5", "2", "1", "2"])
    assert prefs == [1.0, 0.5, 0.0, 0.5, 0.5]
    assert len(asked) == 6  # 3 judged prompts x 2 orders


def test_label_pairs_from_python(tmp_path):
    """`label_pairs` is what `rlhfkit label` and the demo run: records plus the annotator-table row; a bad
    labeler option is a LabelerOptionError (the command line's usage error, exit 2)."""
    pairs = [pair(i, "0.9", "0.1", task=None) for i in range(4)]
    records, row = label_pairs(pairs, "simulated", task=NumberTask(), flip_prob=0.0)
    assert winners(pairs, records) == ["a"] * 4 and row["agreement"] == 1.0 and row["pairs"] == 4
    report = write_labels(tmp_path / "p.jsonl", records, row, pairs_file="pairs.jsonl", labeler="simulated")
    assert json.loads((tmp_path / "p.report.json").read_text()) == report and report["agreement"] == 1.0
    for kind, options in [("oracle", {}), ("rm", {}), ("simulated", {"flip_prob": 2.0})]:
        with pytest.raises(LabelerOptionError):
            label_pairs(pairs, kind, task=NumberTask(), **options)


def test_lm_judge_reads_label_logprobs(tiny):
    model, tok = tiny
    judge = LMJudge(model, tok, labels="AB", batch_size=3)
    items = [(pair(0, "x", "y").prompt, "first reply", "second reply")] * 4
    s = judge(items)
    assert s.shape == (4,) and torch.isfinite(s).all()
    assert torch.allclose(s, s[0].expand(4), atol=1e-5)  # same question, same answer, whatever the batch
    text = judge.render(items[0][0], "first reply", "second reply")
    assert "[Reply A]\nfirst reply" in text and "[Reply B]\nsecond reply" in text and "question 0" in text
    assert all(len(ids) >= 1 for ids in judge.label_ids)


def test_lm_judge_without_chat_template_is_an_error(tiny):
    model, tok = tiny
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; the judge asks a chat question"):
        LMJudge(model, bare)


# --- RM labeler -------------------------------------------------------------------------------------


class StubRM:
    def __init__(self, table):
        self.table = table

    def score(self, prompts, completions, batch_size=16):
        return torch.tensor([self.table[c] for c in completions])


def test_rm_labeler_threshold():
    pairs = [pair(0, "x", "y"), pair(1, "x", "z"), pair(2, "w", "x")]
    records = label_with_rm(pairs, StubRM({"x": 1.0, "y": 0.95, "z": 2.0, "w": -1.0}), tie_threshold=0.1)
    assert winners(pairs, records) == ["tie", "b", "b"]
    assert records[1].metadata["rm_a"] == 1.0 and records[1].source == "rm"


# --- `rlhfkit label` --------------------------------------------------------------------------------


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def concise_pairs(n=12):
    rows = []
    for i in range(n):
        rows.append({"id": f"c{i}", "prompt": [{"role": "user", "content": "Why does bread go stale?"}],
                     "a": {"role": "assistant", "content": "Bread goes stale as its starch crystallises and dries out."},
                     "b": {"role": "assistant", "content": "Because of time. " * (i + 1)}, "task": "concise"})
    return rows


def label(*args, timeout=300):
    """`rlhfkit label ...` as a subprocess (what a user runs)."""
    return subprocess.run([sys.executable, "-m", "rlhfkit.cli", "label", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def label_error(capsys, *args) -> tuple[int, str]:
    """`rlhfkit label ...` in-process, expected to fail: (exit code, message) — faster than a subprocess."""
    from rlhfkit.cli.label import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    code = e.value.code
    return (code, capsys.readouterr().err) if isinstance(code, int) else (1, str(code))


def test_label_simulated_writes_records_and_report(tmp_path):
    src = write_pairs(tmp_path / "pairs.jsonl", concise_pairs())
    out = label(src, "--labeler", "simulated", "--out", tmp_path / "prefs.jsonl", "--flip-prob", "0")
    assert out.returncode == 0, out.stderr
    from rlhfkit.data.io import load_preferences

    prefs = load_preferences(tmp_path / "prefs.jsonl")
    assert len(prefs) == 12 and all(p.source == "simulated" for p in prefs)
    report = json.loads((tmp_path / "prefs.report.json").read_text())
    assert report["agreement"] == 1.0 and report["pairs"] == 12  # no flips, T = 0.05 ≪ these gold gaps
    assert "agree w/ gold" in out.stdout


def test_label_judge_and_rm_with_tiny_models(tmp_path, capsys):
    """The judge and RM labelers end to end, in-process (the subprocess path is the simulated test's)."""
    from rlhfkit.cli.label import main
    from rlhfkit.models.heads import RewardModel

    src = write_pairs(tmp_path / "pairs.jsonl", concise_pairs(3))
    assert main([str(src), "--labeler", "judge", "--judge-model", "tiny", "--out", str(tmp_path / "j.jsonl")]) == 0
    report = json.loads((tmp_path / "j.report.json").read_text())
    assert report["position_bias_rate"] is not None and report["agreement"] is not None
    assert "position bias" in capsys.readouterr().out
    rm = RewardModel.init_from("tiny", seed=0)
    rm.set_normalization(0.0, 1.0)
    rm.save(tmp_path / "rm")
    assert main([str(src), "--labeler", "rm", "--rm", str(tmp_path / "rm"), "--tie-threshold", "0",
                 "--out", str(tmp_path / "r.jsonl")]) == 0
    assert all(json.loads(line)["source"] == "rm" for line in (tmp_path / "r.jsonl").read_text().splitlines())


@pytest.mark.parametrize("bad, message", [
    ({"b": {"role": "assistant", "content": "Bread goes stale as its starch crystallises and dries out."}},
     "pairs.jsonl:2: field 'b': the two sides are identical"),
    ({"a": {"role": "assistant", "content": "   "}}, "pairs.jsonl:2: field 'a.content': empty completion"),
    ({"a": {"role": "user", "content": "hi"}}, "pairs.jsonl:2: field 'a.role': must be an assistant message"),
    ({"id": "c0"}, "pair id 'c0' appears twice"),
])
def test_label_bad_pairs(tmp_path, capsys, bad, message):
    rows = concise_pairs(3)
    rows[1].update(bad)
    code, err = label_error(capsys, write_pairs(tmp_path / "pairs.jsonl", rows), "--labeler", "simulated",
                            "--out", tmp_path / "o.jsonl")
    assert code != 0 and message in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_label_bad_options(tmp_path, capsys):
    rows = concise_pairs(2)
    for r in rows:
        r.pop("task")
    src = write_pairs(tmp_path / "pairs.jsonl", rows)
    code, err = label_error(capsys, src, "--labeler", "simulated", "--out", tmp_path / "o.jsonl")
    assert code != 0 and "pair 'c0'" in err and "has no task" in err and "pass --task NAME" in err
    code, err = label_error(capsys, src, "--labeler", "oracle", "--out", tmp_path / "o.jsonl")
    assert code == 2 and "invalid choice: 'oracle'" in err
    code, err = label_error(capsys, src, "--labeler", "rm", "--out", tmp_path / "o.jsonl")
    assert code == 2 and "--labeler rm needs --rm PATH" in err
    code, err = label_error(capsys, src, "--labeler", "simulated", "--task", "concise", "--flip-prob", "2",
                            "--out", tmp_path / "o.jsonl")
    assert code == 2 and "flip_prob must be in [0, 1]" in err
    code, err = label_error(capsys, src, "--labeler", "rm", "--rm", tmp_path, "--out", tmp_path / "o.jsonl")
    assert code != 0 and "has no config.json" in err


def test_label_judge_model_without_chat_template(tmp_path, capsys, tiny):
    model, tok = tiny
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    tok.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    src = write_pairs(tmp_path / "pairs.jsonl", concise_pairs(2))
    code, err = label_error(capsys, src, "--labeler", "judge", "--judge-model", bare, "--out", tmp_path / "o.jsonl")
    assert code != 0 and f"judge model '{bare}' has no chat template" in err, err
