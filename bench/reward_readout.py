"""Reward-model read-out variants on one task (the table in docs/reward.md), from features extracted
once: with a frozen body, a head trained on cached features is the same as one trained through it.

    OMP_NUM_THREADS=1 python bench/reward_readout.py TASK DATA_DIR

DATA_DIR holds TASK.train.prefs.jsonl and TASK.heldout.prefs.jsonl, made as docs/reward.md says
(`rlhfkit sample` + `rlhfkit label --labeler simulated`, whose records carry the gold rewards). Prints
one table row per variant (accuracy vs labels and vs gold with prompt-clustered 95% CIs, best-of-4 gold
gain, head fit time), the label ceiling and the oracle gain; the last line is
`RESULT gold_acc=... bo4_gain=...` for the default read-out (mean over the reply, layers 8-24, probe).
"""
import sys
import time

import numpy as np
import torch

from rlhfkit.evaluate.reward_model import best_of_k, cluster_bootstrap_ci, record_gold
from rlhfkit.losses.reward import bradley_terry_loss
from rlhfkit.models.heads import RewardModel
from rlhfkit.models.readout import candidate_layers, layer_span, pool_weights
from rlhfkit.train import runtime
from rlhfkit.train.reward_data import collate, encode, make_units, micro_batches, read_preferences
from rlhfkit.train.reward_probe import choose_layers, fit_probe

task, D = sys.argv[1], sys.argv[2]
rm = RewardModel.init_from("smollm2-135m-instruct", seed=0)
model, tok = rm.model, rm.tok
L = model.config.num_hidden_layers


@torch.no_grad()
def all_layer_features(pairs):
    """per pair: chosen and rejected features (2 poolings, L+1 layers, d)."""
    units = make_units(pairs, share=True)
    feats = {}
    for micro in micro_batches(units, 24):
        b = collate(micro, tok.pad_token_id, "cpu")
        out = model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                               position_ids=b["position_ids"], use_cache=False, output_hidden_states=True)
        H = torch.stack(out.hidden_states)  # (L+1, R, T, d)
        T = H.shape[2]
        w_last = pool_weights(b["reply_start"], b["read_at"], T, "last")
        w_mean = pool_weights(b["reply_start"], b["read_at"], T, "mean")
        f = torch.stack([torch.einsum("rnt,lrtd->rnld", w, H) for w in (w_last, w_mean)], 2)  # (R, N, 2, L+1, d)
        for r, u in enumerate(micro):
            feats[id(u)] = f[r, :len(u.replies)].double().numpy()
    by_key = dict(zip(dict.fromkeys(p.prompt_key for p in pairs), units))
    seen, fc, fr = {}, [], []
    for p in pairs:
        u = by_key[p.prompt_key]
        k = seen.get(p.prompt_key, 0)
        seen[p.prompt_key] = k + 1
        c, r = u.pairs[k]
        fc.append(feats[id(u)][c])
        fr.append(feats[id(u)][r])
    return np.stack(fc), np.stack(fr)


t0 = time.time()
tr_rec = read_preferences(f"{D}/{task}.train.prefs.jsonl")
te_rec = read_preferences(f"{D}/{task}.heldout.prefs.jsonl")
tr, _ = encode(tr_rec, tok, 512, 0.0, "half")
te, _ = encode(te_rec, tok, 512, 0.0, "half")
tr_c, tr_r = all_layer_features(tr)
te_c, te_r = all_layer_features(te)
extract_s = time.time() - t0
print(f"extracted {len(tr)} + {len(te)} pairs in {extract_s:.0f} s", flush=True)

recs = [r for _, r in te_rec]
keys = [p.prompt_key for p in te]
labels_dec = np.array([not p.tie for p in te])
gold = record_gold(recs)
has_gold = np.array([a is not None and b is not None and a != b for a, b in gold])
gold_c = np.array([(a > b) if h else False for (a, b), h in zip(gold, has_gold)])
target = np.array([0.5 if p.tie else 1.0 for p in tr])


def evaluate(score_c, score_r):
    diff = score_c - score_r
    out = {"labels": cluster_bootstrap_ci((diff > 0)[labels_dec].astype(float), [k for k, d in zip(keys, labels_dec) if d]),
           "gold": cluster_bootstrap_ci(((diff > 0) == gold_c)[has_gold].astype(float), [k for k, h in zip(keys, has_gold) if h])}
    replies = {}
    for i, (r, (a, b)) in enumerate(zip(recs, gold)):
        replies[(keys[i], r.chosen["content"])] = (a, score_c[i])
        replies[(keys[i], r.rejected["content"])] = (b, score_r[i])
    out["bo"] = best_of_k([k for k, _ in replies], np.array([g for g, _ in replies.values()]),
                          np.array([s for _, s in replies.values()]))
    return out


def select(f, pooling, layers):
    p = {"last": 0, "mean": 1}[pooling]
    lo, hi = layers
    return f[:, p, lo:hi + 1].mean(1)


def sgd_head(fc, fr, epochs=5, batch=24, lr=2e-3, seed=0):
    """today's demo training on frozen features: AdamW on the head (init N(0, 1/sqrt(d+1))), batches of 24
    pairs in prompt-grouped shuffled order, warmup 3% + cosine, grad clip 1, BT loss (ties half)."""
    torch.manual_seed(seed)
    d = fc.shape[1]
    head = torch.nn.Linear(d, 1, bias=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / np.sqrt(d + 1))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0, eps=1e-8)
    steps = int(np.ceil(epochs * (len(fc) // batch)))
    sched = runtime.make_scheduler(opt, "cosine", int(0.03 * steps), steps)
    xc, xr = torch.tensor(fc, dtype=torch.float32), torch.tensor(fr, dtype=torch.float32)
    tie = torch.tensor(target == 0.5)
    rng = np.random.default_rng(seed)
    order = []
    for _ in range(epochs + 1):
        order += list(rng.permutation(len(fc)))
    for s in range(steps):
        idx = order[s * batch:(s + 1) * batch]
        loss, _ = bradley_terry_loss(head(xc[idx])[:, 0], head(xr[idx])[:, 0], tie_mask=tie[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
    return head.weight.detach().double().numpy()[0]


variants = [("today: last token, final layer, SGD 5 ep", "last", (L, L), "sgd"),
            ("last token, final layer, probe", "last", (L, L), "probe"),
            ("mean, final layer, probe", "mean", (L, L), "probe"),
            ("last token, layers 8-24, probe", "last", (8, 24), "probe"),
            ("mean, layers 8-24, probe (new default)", "mean", (8, 24), "probe"),
            ("mean, layers 8-24, SGD 5 ep", "mean", (8, 24), "sgd"),
            ("mean, layers 4-16, probe", "mean", (4, 16), "probe"),
            ("mean, layers 12-20, probe", "mean", (12, 20), "probe"),
            ("mean, layers 1-30, probe", "mean", (1, 30), "probe")]
variants.append(("mean, layers by grouped CV, probe", "mean", "cv", "probe"))


def cv_layers(pooling):
    """``layers='auto'``: the library's choice (``reward_probe.choose_layers`` over ``candidate_layers``,
    the mean-pooled ranges above), made on the TRAINING pairs by the probe's prompt-grouped CV log-loss,
    never on the held-out pairs."""
    p = {"last": 0, "mean": 1}[pooling]
    best, _, losses = choose_layers(tr_c[:, p, 1:], tr_r[:, p, 1:], target, [q.prompt_key for q in tr],
                                    candidate_layers(L), folds=5, seed=0)  # column j = hidden state 1 + j
    print("  CV log-loss per range: " + ", ".join(f"{c} {v:.4f}" for c, v in losses.items()) + f" -> {best}",
          flush=True)
    return layer_span(best)


rows, default = [], None
for name, pooling, layers, how in variants:
    t1 = time.time()
    if layers == "cv":
        layers = cv_layers(pooling)
    fc, fr = select(tr_c, pooling, layers), select(tr_r, pooling, layers)
    if how == "probe":
        w = fit_probe(fc, fr, target, [p.prompt_key for p in tr]).weight
    else:
        w = sgd_head(fc, fr)
    fit_s = time.time() - t1
    ev = evaluate(select(te_c, pooling, layers) @ w, select(te_r, pooling, layers) @ w)
    f = lambda c: f"{c['value']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"
    g = lambda c: f"{c['value']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
    row = f"| {task} | {name} | {f(ev['labels'])} | {f(ev['gold'])} | {g(ev['bo']['gain'])} | {fit_s:.1f} s |"
    print(row, flush=True)
    rows.append(row)
    if name.endswith("(new default)"):
        default = ev
ceil = cluster_bootstrap_ci(gold_c[has_gold & labels_dec].astype(float), [k for k, h in zip(keys, has_gold & labels_dec) if h])
oracle = evaluate(np.array([a for a, _ in gold], dtype=float), np.array([b for _, b in gold], dtype=float))["bo"]["oracle_gain"]
print(f"ceiling {ceil['value']:.3f} [{ceil['ci_low']:.3f}, {ceil['ci_high']:.3f}]; oracle best-of-4 {oracle['value']:+.3f}; "
      f"pairs: train {len(tr)}, held-out {int(labels_dec.sum())} decided / {int(has_gold.sum())} with gold, "
      f"{len(set(keys))} prompts; total {time.time() - t0:.0f} s")
print(f"RESULT gold_acc={default['gold']['value']:.4f} gold_acc_ci_low={default['gold']['ci_low']:.4f} "
      f"bo4_gain={default['bo']['gain']['value']:.4f} ceiling={ceil['value']:.4f} oracle_gain={oracle['value']:.4f}")
