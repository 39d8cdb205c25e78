"""The popularity baseline on the same held-out records and metrics as the rra ablation: the
project's `PopularityTeacher` (catalog items ranked by how many training records name them as
ground truth or as seen), 20 items, seen titles removed.

    python docs/rra/smollm2-redial-full/popularity.py > popularity.json
"""

import json
from collections import Counter

from rankgrpo.catalog import load_default_catalog
from rankgrpo.metrics import ndcg_at_k, recall_at_k
from rankgrpo.redial import load_default_redial
from rankgrpo.rra.pipeline import KS
from rankgrpo.teacher import PopularityTeacher

catalog = load_default_catalog("redial")
train, test = load_default_redial("train"), load_default_redial("test")
pop = PopularityTeacher.from_records(train, catalog)
sums = Counter()
for rec in test:
    recs = pop(rec, 20)
    gt, seen = rec["groundtruth_with_release_year"], rec.get("seen_titles", ())
    for k in KS:
        sums[f"recall@{k}"] += recall_at_k(recs, gt, seen, catalog, k)
        sums[f"ndcg@{k}"] += ndcg_at_k(recs, gt, seen, catalog, k)
row = {f"{m}@{k}": round(sums[f"{m}@{k}"] / len(test), 4) for m in ("recall", "ndcg") for k in KS}
print(json.dumps({"n": len(test), "popularity": row}, indent=1))
