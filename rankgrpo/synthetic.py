"""A SYNTHETIC conversational-recommendation world for the CPU demo and the tests.

Nothing here is real user data. Real titles are taken from the Reddit-v2 catalog, but their
"tastes" (the latent groups below), their popularity, the users and the conversations are all
drawn at random from a seed. The world is built so that the conversation carries a signal a
tiny model can learn in minutes:

* every catalog item gets one latent taste (a group such as "spooky" or "cozy") and a
  popularity; each taste has a few taste words;
* a simulated user has a main taste (sometimes a second one); the conversation mentions one to
  three movies the user liked (drawn from the user's tastes, occasionally an off-taste one) and,
  usually, a taste word or two;
* the ground truth (the movies the user will like) is drawn from the user's tastes, weighted by
  popularity, never one of the movies already mentioned;
* the SFT target ("completion") is a deliberately weak teacher that ignores the conversation:
  a popularity list, namely the chart of one taste picked at random (titles drawn by
  popularity, most popular first, the seen ones removed), like a "top titles in <genre>"
  page shown to every visitor. Imitating it teaches the list format, the catalog, and which
  titles go together, but nothing about the user.

So a policy that reads the taste words and the liked movies can beat the teacher by a wide margin,
and the reward (the true ground truth) tells it how. Records use the Reddit-v2 record form
(docs/math.md section 12): `prompt`, `completion`, `seen_titles`, `groundtruth_with_release_year`.
Everything is a pure function of the seed and the config: the same seed gives the same world.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .prompts import build_prompt

# Latent tastes and the words a user may use for them. Which titles belong to which taste is
# random (a synthetic world), so the names are only labels for the groups.
TASTES: dict[str, tuple[str, ...]] = {
    "spooky": ("scary", "creepy", "haunting"),
    "funny": ("funny", "silly", "hilarious"),
    "romantic": ("romantic", "sweet", "swoony"),
    "explosive": ("explosive", "loud", "adrenaline"),
    "twisty": ("twisty", "clever", "puzzling"),
    "epic": ("epic", "sweeping", "grand"),
    "gritty": ("gritty", "violent", "bleak"),
    "cozy": ("cozy", "wholesome", "gentle"),
    "cosmic": ("cosmic", "futuristic", "spacey"),
    "arty": ("arty", "slow", "dreamy"),
    "musical": ("musical", "catchy", "rhythmic"),
    "tense": ("tense", "suspenseful", "gripping"),
}

# Conversation templates: {liked} is a list of movie titles, {words} a list of taste words.
# Some templates have no taste words: then only the liked movies carry the signal.
TEMPLATES_WITH_WORDS: tuple[str, ...] = (
    "I loved {liked}. I am looking for something {words}.",
    "Can you suggest a {words} movie? I enjoyed {liked}.",
    "{liked} really worked for me. Anything else {words}?",
    "I am in the mood for a {words} film tonight. Recently I liked {liked}.",
    "My favorites are {liked}. Give me more {words} movies please.",
    "Something {words} please, like {liked}.",
)
TEMPLATES_MOVIES_ONLY: tuple[str, ...] = (
    "I loved {liked}. What should I watch next?",
    "My favorites are {liked}. Any suggestions?",
    "I just watched {liked} and want more like that.",
)

# The weak SFT teachers; neither looks at the conversation (beyond dropping seen movies).
# taste_chart: the popularity chart of ONE taste picked at random, most popular first (like a
#   "top titles in <genre>" page); global: a popularity-weighted random draw over all items,
#   most popular first.
TEACHERS = ("taste_chart", "global")

_YEAR = re.compile(r"^\d{4}$")
_PLAIN_TITLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ,.:'&!?-]*$")


@dataclass
class WorldConfig:
    """Sizes and noise levels of the synthetic world (all documented in the module docstring)."""

    num_items: int = 300          # catalog subset size
    num_tastes: int = 10          # how many of TASTES are used
    num_train_users: int = 1200
    num_heldout_users: int = 200
    records_per_user: tuple[int, int] = (1, 2)   # inclusive range of conversations per user
    second_taste_prob: float = 0.3               # users with a second (weaker) taste
    second_taste_weight: float = 0.3             # share of ground truth from the second taste
    liked_range: tuple[int, int] = (1, 3)        # movies mentioned as liked
    off_taste_liked_prob: float = 0.15           # a liked movie outside the user's tastes
    no_words_prob: float = 0.2                   # conversations without taste words
    words_range: tuple[int, int] = (1, 2)
    groundtruth_range: tuple[int, int] = (6, 10)
    off_taste_groundtruth_prob: float = 0.1      # ground-truth items drawn from all items
    popularity_exponent: float = 1.0             # pop_i ~ 1 / (rank_i + popularity_offset)^e
    popularity_offset: float = 10.0
    groundtruth_pop_power: float = 1.0           # ground truth ~ pop^power within a taste
    teacher: str = "taste_chart"                 # or "global" (see build_world)
    teacher_pop_power: float = 1.0               # teacher draws items with weights pop^power
    num_recommendations: int = 20
    min_year: int = 1960
    catalog_seed_offset: int = 0                 # world seed for the catalog subset = seed + this

    def validate(self) -> None:
        if not 2 <= self.num_tastes <= len(TASTES):
            raise ValueError(f"num_tastes must be in [2, {len(TASTES)}], got {self.num_tastes}")
        if self.num_items < 4 * self.num_tastes:
            raise ValueError(f"num_items={self.num_items} is too small for "
                             f"{self.num_tastes} tastes (need >= {4 * self.num_tastes})")
        for name in ("records_per_user", "liked_range", "words_range", "groundtruth_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be 1 <= lo <= hi, got {(lo, hi)}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.num_train_users < 1 or self.num_heldout_users < 1:
            raise ValueError("num_train_users and num_heldout_users must be >= 1")


@dataclass
class World:
    """A built world: items, their tastes and popularity, and the records of both splits."""

    seed: int
    config: WorldConfig
    items: list[tuple[str, str]]          # (title, year) in catalog order
    item_taste: np.ndarray                # [num_items] taste index
    popularity: np.ndarray                # [num_items] positive, sums to 1
    taste_names: list[str]
    train: list[dict]
    heldout: list[dict]
    train_users: list[int] = field(default_factory=list)    # user id of each train record
    heldout_users: list[int] = field(default_factory=list)
    user_tastes: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def titles(self) -> list[str]:
        """`Title (Year)` strings of the items (one token each in the tiny tokenizer)."""
        return [f"{t} ({y})" for t, y in self.items]

    @property
    def taste_words(self) -> list[str]:
        return sorted({w for n in self.taste_names for w in TASTES[n]})

    def popularity_ranking(self) -> list[tuple[str, int]]:
        """Every item, most popular first (what `teacher.PopularityTeacher` takes)."""
        order = np.argsort(-self.popularity, kind="stable")
        return [(self.items[i][0], int(self.items[i][1])) for i in order]

    def popularity_list(self, seen: list[str], n: int | None = None) -> list[tuple[str, int]]:
        """The deterministic popularity baseline: most popular items first, seen removed."""
        n = n or self.config.num_recommendations
        seen_set = set(seen)
        return [it for it in self.popularity_ranking() if it[0] not in seen_set][:n]

    def oracle_list(self, record: dict, n: int | None = None) -> list[tuple[str, int]]:
        """An oracle that reads the taste words and liked movies of the conversation (but not
        the ground truth): the most popular unseen items of the tastes it finds. Used by the
        tests to show that the conversation carries a signal."""
        n = n or self.config.num_recommendations
        text = record_conversation(record)
        words = set(re.findall(r"[a-z-]+", text.lower()))
        votes = np.zeros(len(self.taste_names))
        for k, name in enumerate(self.taste_names):
            votes[k] += 2.0 * sum(w in words for w in TASTES[name])
        index = {t: i for i, (t, _) in enumerate(self.items)}
        for t in record["seen_titles"]:
            if t in index:
                votes[self.item_taste[index[t]]] += 1.0
        score = self.popularity * (1.0 + 100.0 * votes[self.item_taste])
        seen_set = set(record["seen_titles"])
        order = np.argsort(-score, kind="stable")
        return [(self.items[i][0], int(self.items[i][1])) for i in order
                if self.items[i][0] not in seen_set][:n]

    def summary(self) -> dict:
        return {
            "synthetic": True,
            "seed": self.seed,
            "items": len(self.items),
            "tastes": self.taste_names,
            "train_records": len(self.train),
            "heldout_records": len(self.heldout),
            "train_users": len(set(self.train_users)),
            "heldout_users": len(set(self.heldout_users)),
            "config": asdict(self.config),
        }


def record_conversation(record: dict) -> str:
    """The conversation text inside a record's prompt (after 'USER: ')."""
    prompt = record["prompt"]
    if isinstance(prompt, list):  # chat form: one user message
        prompt = prompt[-1]["content"]
    return prompt.split("Here is the conversation: USER: ", 1)[-1].strip()


def default_catalog_path() -> Path:
    """The Reddit-v2 catalog TSV shipped in the package (rankgrpo/data)."""
    p = Path(__file__).resolve().parent / "data" / "reddit_v2_catalog.tsv"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: the package was installed without its data "
                                "files (reinstall rankgrpo)")
    return p


def read_catalog_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(title, year) rows of the catalog TSV, in file order (header skipped)."""
    path = Path(path) if path is not None else default_catalog_path()
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:2] != ["title", "year"]:
            raise ValueError(f"{path}: expected header 'title<TAB>year', got {header}")
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 2:
                rows.append((parts[0], parts[1]))
    return rows


def eligible_items(pairs: list[tuple[str, str]], min_year: int) -> list[tuple[str, str]]:
    """Titles that make clean one-token items: unique title, plain ASCII without brackets,
    a 4-digit year >= min_year (this also drops the catalog's known bad row)."""
    counts: dict[str, int] = {}
    for t, _ in pairs:
        counts[t] = counts.get(t, 0) + 1
    return [(t, y) for t, y in pairs
            if counts[t] == 1 and _YEAR.match(y) and int(y) >= min_year
            and _PLAIN_TITLE.match(t) and len(t) <= 40]


def _join(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _weighted_sample(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k indices without replacement, probability proportional to weights (Plackett-Luce)."""
    w = np.asarray(weights, dtype=np.float64)
    k = min(k, int((w > 0).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    # Gumbel top-k: argsort of log w + Gumbel noise == sequential sampling without replacement.
    with np.errstate(divide="ignore"):
        keys = np.log(w) + rng.gumbel(size=w.shape)
    return np.argsort(-keys, kind="stable")[:k]


def build_world(seed: int = 0, config: WorldConfig | None = None,
                catalog: list[tuple[str, str]] | None = None) -> World:
    """Build the synthetic world for `seed` (pure function of seed, config and catalog)."""
    cfg = config or WorldConfig()
    cfg.validate()
    pairs = catalog if catalog is not None else read_catalog_pairs()
    pool = eligible_items(pairs, cfg.min_year)
    if len(pool) < cfg.num_items:
        raise ValueError(f"only {len(pool)} eligible catalog titles, need {cfg.num_items}")
    rng = np.random.default_rng([seed, 7])
    crng = np.random.default_rng([seed + cfg.catalog_seed_offset, 11])
    picked = sorted(crng.choice(len(pool), size=cfg.num_items, replace=False).tolist())
    items = [pool[i] for i in picked]
    n = len(items)
    taste_names = sorted(rng.choice(sorted(TASTES), size=cfg.num_tastes, replace=False).tolist())
    # Balanced random taste assignment: every taste gets n // num_tastes (+1) items.
    item_taste = rng.permutation(np.arange(n) % cfg.num_tastes)
    pop_rank = rng.permutation(n)
    popularity = (pop_rank + cfg.popularity_offset) ** (-cfg.popularity_exponent)
    popularity = popularity / popularity.sum()
    by_taste = [np.flatnonzero(item_taste == k) for k in range(cfg.num_tastes)]
    def teacher_completion(seen: set[str]) -> str:
        # Never looks at the conversation: a random taste's chart (or the global chart), drawn
        # by popularity and listed most popular first, the seen movies removed.
        pool = np.arange(n)
        if cfg.teacher == "taste_chart":
            pool = by_taste[int(rng.integers(cfg.num_tastes))]
        cand = np.array([i for i in pool if items[i][0] not in seen])
        picked = cand[_weighted_sample(rng, popularity[cand] ** cfg.teacher_pop_power,
                                       cfg.num_recommendations)]
        if len(picked) < cfg.num_recommendations:  # a small taste: top up from the rest
            rest = np.array([i for i in np.arange(n) if i not in set(picked.tolist())
                             and items[i][0] not in seen])
            more = rest[_weighted_sample(rng, popularity[rest] ** cfg.teacher_pop_power,
                                         cfg.num_recommendations - len(picked))]
            picked = np.concatenate([picked, more])
        picked = picked[np.argsort(-popularity[picked], kind="stable")]
        return "\n".join(f"{items[i][0]} ({items[i][1]})" for i in picked)

    def conversation(tastes: tuple[int, ...]) -> tuple[str, list[int]]:
        lo, hi = cfg.liked_range
        num_liked = int(rng.integers(lo, hi + 1))
        liked: list[int] = []
        for j in range(num_liked):
            if j > 0 and rng.random() < cfg.off_taste_liked_prob:
                options = np.arange(n)
            else:
                options = by_taste[tastes[0] if j == 0 or len(tastes) == 1 else
                                   tastes[int(rng.integers(len(tastes)))]]
            options = np.array([i for i in options if i not in liked])
            liked.append(int(options[_weighted_sample(rng, popularity[options], 1)[0]]))
        liked_txt = _join([f"{items[i][0]} ({items[i][1]})" for i in liked])
        if rng.random() < cfg.no_words_prob:
            tpl = TEMPLATES_MOVIES_ONLY[int(rng.integers(len(TEMPLATES_MOVIES_ONLY)))]
            return tpl.format(liked=liked_txt), liked
        lo, hi = cfg.words_range
        num_words = int(rng.integers(lo, hi + 1))
        words = []
        for j in range(num_words):
            name = taste_names[tastes[0] if j == 0 else tastes[-1]]
            options = [w for w in TASTES[name] if w not in words]
            words.append(options[int(rng.integers(len(options)))])
        tpl = TEMPLATES_WITH_WORDS[int(rng.integers(len(TEMPLATES_WITH_WORDS)))]
        return tpl.format(liked=liked_txt, words=" and ".join(words)), liked

    def groundtruth(tastes: tuple[int, ...], liked: list[int]) -> list[int]:
        lo, hi = cfg.groundtruth_range
        size = int(rng.integers(lo, hi + 1))
        taste_w = np.zeros(cfg.num_tastes)
        taste_w[tastes[0]] = 1.0
        if len(tastes) > 1:
            taste_w[tastes[0]] -= cfg.second_taste_weight
            taste_w[tastes[1]] += cfg.second_taste_weight
        # Each item's weight: its taste's share spread by popularity inside the taste.
        pop_t = popularity ** cfg.groundtruth_pop_power
        share = np.array([pop_t[by_taste[k]].sum() for k in range(cfg.num_tastes)])
        w = taste_w[item_taste] * pop_t / share[item_taste]
        w = (1 - cfg.off_taste_groundtruth_prob) * w + cfg.off_taste_groundtruth_prob * popularity
        w[liked] = 0.0
        return _weighted_sample(rng, w, size).tolist()

    def make_records(user_ids: range) -> tuple[list[dict], list[int], dict]:
        records, owners, tastes_of = [], [], {}
        for u in user_ids:
            first = int(rng.integers(cfg.num_tastes))
            tastes: tuple[int, ...] = (first,)
            if rng.random() < cfg.second_taste_prob:
                second = int(rng.integers(cfg.num_tastes - 1))
                tastes = (first, second + (second >= first))
            tastes_of[u] = tastes
            lo, hi = cfg.records_per_user
            for _ in range(int(rng.integers(lo, hi + 1))):
                conv, liked = conversation(tastes)
                seen = [items[i][0] for i in liked]
                gt = groundtruth(tastes, liked)
                records.append({
                    "prompt": build_prompt(conv, cfg.num_recommendations),
                    "completion": teacher_completion(set(seen)),
                    "seen_titles": seen,
                    "groundtruth_with_release_year": [[items[i][0], items[i][1]] for i in gt],
                })
                owners.append(u)
        return records, owners, tastes_of

    train, train_users, t1 = make_records(range(cfg.num_train_users))
    heldout, heldout_users, t2 = make_records(
        range(cfg.num_train_users, cfg.num_train_users + cfg.num_heldout_users))
    return World(seed=seed, config=cfg, items=items, item_taste=item_taste,
                 popularity=popularity, taste_names=taste_names, train=train, heldout=heldout,
                 train_users=train_users, heldout_users=heldout_users,
                 user_tastes={**t1, **t2})


def list_coherence(world: World, lists: list[list[str]] | None = None) -> dict[str, float]:
    """How much a list's first item decides the rest (issue 16's credit-assignment question).

    lists: one list of `Title (Year)` strings per held-out record (default: the teacher's
    completions, i.e. what SFT imitates). Returns
      same_taste_as_first: mean share of items 2..N whose taste equals item 1's;
      hits_after_first_in_taste / hits_after_first_off_taste: mean ground-truth hits at ranks
        2..N over lists whose item 1 is / is not in the user's main taste (nan if none);
      first_in_taste_rate: share of lists whose item 1 is in the user's main taste.
    Items outside the world's catalog are skipped.
    """
    index = {f"{t} ({y})": i for i, (t, y) in enumerate(world.items)}
    if lists is None:
        lists = [r["completion"].split("\n") for r in world.heldout]
    if len(lists) != len(world.heldout):
        raise ValueError(f"lists: expected {len(world.heldout)} (one per held-out record), "
                         f"got {len(lists)}")
    same, hits_in, hits_off = [], [], []
    for rec, user, lst in zip(world.heldout, world.heldout_users, lists):
        ids = [index[s] for s in lst if s in index]
        if len(ids) < 2:
            continue
        gt = {t for t, _ in rec["groundtruth_with_release_year"]}
        first = world.item_taste[ids[0]]
        same.append(float(np.mean([world.item_taste[i] == first for i in ids[1:]])))
        hits = float(sum(world.items[i][0] in gt for i in ids[1:]))
        (hits_in if first == world.user_tastes[user][0] else hits_off).append(hits)

    def mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    return {"same_taste_as_first": mean(same), "hits_after_first_in_taste": mean(hits_in),
            "hits_after_first_off_taste": mean(hits_off),
            "first_in_taste_rate": len(hits_in) / max(1, len(hits_in) + len(hits_off))}
