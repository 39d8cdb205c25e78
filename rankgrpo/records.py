"""Records in the Reddit-v2 form (docs/math.md section 12): read, write, validate.

A record is a dict with
- `prompt`: the prompt text, or a chat message list `[{"role": "user", "content": ...}]`;
- `completion`: the SFT target, N `Title (Year)` lines joined by `\\n`;
- `seen_titles`: list of bare titles mentioned earlier in the conversation;
- `groundtruth_with_release_year`: list of `[title, "year"]` (year a digit string).
Other fields (e.g. `dialog_id`) are kept as they are.

Storage: JSONL (optionally `.gz`), the portable form, or a Hugging Face `datasets`
`save_to_disk` folder (a `Dataset` or a `DatasetDict` of splits). `datasets` is imported only
when such a folder is read or written; it is an optional dependency. All writes are atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .fileio import atomic_replace_dir, atomic_write_text, open_text

REQUIRED_FIELDS = ("prompt", "completion", "seen_titles", "groundtruth_with_release_year")


class RecordError(ValueError):
    """A record that does not have the Reddit-v2 form; the message names record and field."""

    def __init__(self, index: int | None, field: str | None, problem: str,
                 source: str | None = None):
        where = f"{source}: " if source else ""
        rec = f"record {index}" if index is not None else "record"
        fld = f", field {field!r}" if field else ""
        super().__init__(f"{where}{rec}{fld}: {problem}")
        self.index, self.field, self.problem = index, field, problem


def _type(v: Any) -> str:
    return type(v).__name__


def _validate_prompt(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v.strip() else "is empty"
    if isinstance(v, list) and v:
        for j, msg in enumerate(v):
            if not (isinstance(msg, Mapping) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str)):
                return f"message {j} must be {{'role': str, 'content': str}}, got {msg!r}"
        return None
    return f"expected a non-empty string or a list of chat messages, got {_type(v)}"


def validate_record(record: Any, index: int | None = None, source: str | None = None) -> None:
    """Raise `RecordError` naming the record index and the field if `record` is malformed."""
    if not isinstance(record, Mapping):
        raise RecordError(index, None, f"expected a JSON object, got {_type(record)}", source)
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise RecordError(index, name, "missing", source)
    problem = _validate_prompt(record["prompt"])
    if problem:
        raise RecordError(index, "prompt", problem, source)
    if not isinstance(record["completion"], str):
        raise RecordError(index, "completion",
                          f"expected a string, got {_type(record['completion'])}", source)
    seen = record["seen_titles"]
    if not isinstance(seen, list):
        raise RecordError(index, "seen_titles", f"expected a list of strings, got {_type(seen)}",
                          source)
    for j, t in enumerate(seen):
        if not isinstance(t, str):
            raise RecordError(index, "seen_titles",
                              f"item {j} is {_type(t)} {t!r}, expected a string", source)
    gt = record["groundtruth_with_release_year"]
    if not isinstance(gt, list):
        raise RecordError(index, "groundtruth_with_release_year",
                          f"expected a list of [title, year] pairs, got {_type(gt)}", source)
    for j, pair in enumerate(gt):
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
              and pair[0].strip()
              and (isinstance(pair[1], int) and not isinstance(pair[1], bool)
                   or isinstance(pair[1], str) and pair[1].strip().isdigit()))
        if not ok:
            raise RecordError(index, "groundtruth_with_release_year",
                              f"item {j} is {pair!r}, expected [title, \"year\"] with a "
                              "non-empty title and a digit-string year", source)


def validate_records(records: Iterable[Any], source: str | None = None) -> None:
    """Validate every record; the first bad one raises `RecordError`."""
    for i, r in enumerate(records):
        validate_record(r, i, source)


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict copy with ground-truth years as strings and pairs as lists."""
    out = dict(record)
    out["seen_titles"] = list(record["seen_titles"])
    out["groundtruth_with_release_year"] = [
        [str(t), str(y).strip()] for t, y in record["groundtruth_with_release_year"]]
    return out


def prompt_text(record: Mapping[str, Any]) -> str:
    """The prompt as text: the string itself, or the last user message's content."""
    p = record["prompt"]
    if isinstance(p, str):
        return p
    users = [m["content"] for m in p if m.get("role") == "user"]
    return users[-1] if users else p[-1]["content"]


def prompt_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The prompt as chat messages (a text prompt becomes one user turn)."""
    p = record["prompt"]
    if isinstance(p, str):
        return [{"role": "user", "content": p}]
    return [{"role": m["role"], "content": m["content"]} for m in p]


def groundtruth_pairs(record: Mapping[str, Any]) -> list[tuple[str, int]]:
    """Ground truth as `(title, int year)` pairs."""
    return [(str(t), int(str(y).strip())) for t, y in record["groundtruth_with_release_year"]]


# ---------------------------------------------------------------- JSONL


def read_jsonl(path: str | os.PathLike, *, validate: bool = True) -> list[dict[str, Any]]:
    """Read records from a JSONL file (`.gz` ok), validating each unless told not to."""
    records = []
    n = 0
    with open_text(path) as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RecordError(len(records), None, f"line {n} is not valid JSON "
                                      f"({e.msg})", str(path)) from None
        except UnicodeDecodeError as e:
            raise RecordError(len(records), None, f"line {n + 1} is not UTF-8 text ({e.reason} "
                              f"at byte {e.start} of a read block)", str(path)) from None
    if validate:
        validate_records(records, str(path))
    return records


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike, *,
                validate: bool = True) -> int:
    """Write records as JSONL (`.gz` compresses) atomically; returns how many were written."""
    records = list(records)
    if validate:
        validate_records(records, str(path))
    with atomic_write_text(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


# ---------------------------------------------------------------- datasets folders


def _datasets():
    try:
        import datasets
    except ImportError as e:  # optional dependency
        raise ImportError("reading or writing save_to_disk folders needs the `datasets` "
                          "package: pip install datasets (or rankgrpo[train])") from e
    return datasets


def save_to_disk(records: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping]],
                 path: str | os.PathLike, *, validate: bool = True) -> None:
    """Save a list of records (a `Dataset`) or `{split: records}` (a `DatasetDict`) with
    `datasets`' `save_to_disk`, atomically (built in a temporary folder, then moved)."""
    datasets = _datasets()
    path = Path(path)
    if isinstance(records, Mapping):
        splits = {name: list(recs) for name, recs in records.items()}
    else:
        splits = {None: list(records)}
    converted = {}
    for name, recs in splits.items():
        if validate:
            validate_records(recs, f"{path}[{name}]" if name else str(path))
        converted[name] = datasets.Dataset.from_list([normalize_record(r) for r in recs])
    obj = (converted[None] if None in converted else datasets.DatasetDict(converted))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        obj.save_to_disk(tmp)
        atomic_replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_from_disk(path: str | os.PathLike, split: str | None = None, *,
                   validate: bool = True) -> list[dict[str, Any]] | dict[str, list[dict]]:
    """Load a `save_to_disk` folder. A `DatasetDict` gives `{split: records}`, or one split's
    records when `split` is given; a `Dataset` gives its records."""
    datasets = _datasets()
    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        if split is not None:
            if split not in obj:
                raise KeyError(f"{path} has splits {sorted(obj)}, not {split!r}")
            obj = obj[split]
        else:
            out = {name: ds.to_list() for name, ds in obj.items()}
            if validate:
                for name, recs in out.items():
                    validate_records(recs, f"{path}[{name}]")
            return out
    elif split is not None:
        raise ValueError(f"{path} holds a single Dataset, not splits; drop split={split!r}")
    recs = obj.to_list()
    if validate:
        validate_records(recs, str(path))
    return recs


def load_records(path: str | os.PathLike, split: str | None = None, *,
                 validate: bool = True) -> list[dict[str, Any]]:
    """Records from a JSONL file or a `save_to_disk` folder (then `split` picks a split).

    For a folder of `{split}.jsonl[.gz]` files, `split` picks the file.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            out = load_from_disk(path, split, validate=validate)
            if isinstance(out, dict):
                raise ValueError(f"{path} holds splits {sorted(out)}; pass split=")
            return out
        if split is None:
            raise ValueError(f"{path} is a folder; pass split= to pick a JSONL file in it")
        for name in (f"{split}.jsonl", f"{split}.jsonl.gz"):
            if (path / name).exists():
                return read_jsonl(path / name, validate=validate)
        raise FileNotFoundError(f"no {split}.jsonl(.gz) or save_to_disk folder in {path}")
    return read_jsonl(path, validate=validate)
