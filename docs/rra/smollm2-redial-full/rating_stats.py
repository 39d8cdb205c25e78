"""What the teacher's ratings say: read every rating answer in a run's cache and report, per
split, how spread they are within a conversation, how they depend on the candidate's position
(its remap rank), and whether ground-truth items get higher ratings than the others.

    python docs/rra/smollm2-redial-full/rating_stats.py runs/rra-full/cache > rating_stats.json
"""

import json
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

from rankgrpo.records import groundtruth_pairs
from rankgrpo.redial import load_default_redial
from rankgrpo.rra.reflect import parse_ratings
from rankgrpo.rra.teacher import conversation_of

cache = Path(sys.argv[1]) / "answers" / "rate"
fractional = "--integer" not in sys.argv
by_text = {}
for split in ("train", "test"):
    for r in load_default_redial(split):
        by_text.setdefault(conversation_of(r).text, (split, r))
out = {}
rows = defaultdict(list)
for f in sorted(cache.glob("*.json")):
    d = json.loads(f.read_text(encoding="utf-8"))
    text, cands = d["request"][0], [tuple(c) for c in d["request"][1]]
    split, rec = by_text.get(text, ("unknown", None))
    rows[split].append((rec, cands, parse_ratings(d["answer"], cands, fractional=fractional)))
for split, items in sorted(rows.items()):
    by_pos = defaultdict(list)
    spread, gt, other, n_missing = [], [], [], 0
    for rec, cands, r in items:
        n_missing += r.missing
        for i, v in enumerate(r.ratings):
            by_pos[i].append(v)
        if len(r.ratings) > 1:
            spread.append(max(r.ratings) - min(r.ratings))
        truth = set(groundtruth_pairs(rec)) if rec else set()
        for c, v in zip(cands, r.ratings):
            (gt if c in truth else other).append(v)
    out[split] = {
        "answers": len(items), "ratings": sum(len(v) for v in by_pos.values()),
        "missing": n_missing,
        "mean": round(st.fmean(v for vs in by_pos.values() for v in vs), 4),
        "mean by candidate position": [round(st.fmean(by_pos[i]), 4) for i in sorted(by_pos)],
        "mean within-conversation range": round(st.fmean(spread), 4) if spread else None,
        "ground-truth candidates": len(gt),
        "mean rating of ground-truth candidates": round(st.fmean(gt), 4) if gt else None,
        "mean rating of other candidates": round(st.fmean(other), 4) if other else None,
    }
print(json.dumps(out, indent=1))
