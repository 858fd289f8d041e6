"""Graph encoder: a PyTorch Geometric GraphSAGE over the knowledge graph, plus text/structure fusion.

Contract
--------
* Model: ``L`` (default 2) ``SAGEConv`` layers, mean aggregation (``sum`` also supported), ReLU
  between layers and none after the last, no dropout, no normalisation inside. Dimensions:
  ``in_dim -> hidden -> ... -> out``; ``in_dim`` is the text encoder's dimension (384).
  Edges are undirected: the caller passes every typed edge in both directions (a self-loop
  once), so a node's neighbourhood is every node it shares an edge with, once per edge.
* Input features ``h0``: a product with text gets its text embedding; every other node (and a
  product not yet described) gets its **node-type embedding**: one row per label of
  ``node_types`` plus a last row shared by unknown labels, drawn from the seeded init as
  N(0, 1) and scaled to unit norm so that it lives on the same scale as the (unit-norm) text
  embeddings. The rows are parameters: a trained checkpoint may carry learned ones.
* Weights come from a checkpoint (safetensors; the config is stored in its metadata) or from a
  seeded initialisation (``seed``; the global RNG is left untouched). ``version`` is a short
  sha256 over the config and every weight, so the same seed and config always give the same
  version, and any trained checkpoint gets its own.
* ``dense(l, agg, x_self)`` is the node-wise half of layer ``l`` (``lin_l(agg) + lin_r(x_self)``
  and the ReLU): exactly what ``SAGEConv.forward`` does after ``propagate``. The incremental
  engine calls it for the rows it recomputes; ``forward_all`` is the plain PyG forward pass.
* Optional **alignment head** (``align=True``): a linear map ``align_text(t)`` from the
  text space (``in_dim``) into the structure space (``out``), trained with a contrastive loss
  between a product's text embedding and its structure vector ``hL``
  (``training/train.py``). A text query ``q`` then becomes the vector
  ``fuse(q, align_text(q))``, comparable with published product vectors
  (``kg-streamer search``). The head is not used by message passing; it lives in the same
  checkpoint, so it is part of ``version``. ``align=False`` configs serialise exactly as before
  (their version is unchanged).
* Fusion (``fuse``) makes the published vector from the text features ``t = h0`` and the
  structure vector ``s = hL``, both first L2-normalised, with ``w = fusion_text_weight``:

  - ``concat``: ``[sqrt(w) * t, sqrt(1-w) * s]`` (dim ``in_dim + out``). It has unit norm and the
    cosine similarity of two fused vectors is exactly ``w * cos(t, t') + (1-w) * cos(s, s')``.
  - ``mean``: ``normalize(w * t + (1-w) * s)`` (dim ``in_dim``; needs ``out == in_dim``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv

DEFAULT_NODE_TYPES: tuple[str, ...] = ("Product", "User", "Brand", "Category", "Attribute")
Fusion = Literal["concat", "mean"]


class SageLinear(Protocol):
    """What kg-streamer reads of a ``SAGEConv``'s ``lin_l`` / ``lin_r`` (PyG's ``Linear``, which
    ships no type information): ``torch.nn.Module`` attribute access types them as
    ``Tensor | Module``, so callers ``cast`` to this."""

    weight: Tensor
    bias: Tensor | None

    def __call__(self, x: Tensor, /) -> Tensor: ...


@dataclass(frozen=True)
class GraphEncoderConfig:
    in_dim: int = 384
    hidden: int = 128
    out: int = 128
    layers: int = 2
    aggr: Literal["mean", "sum"] = "mean"
    seed: int = 0
    node_types: tuple[str, ...] = field(default=DEFAULT_NODE_TYPES)
    align: bool = False

    def dims(self) -> list[int]:
        """Feature width of h0..hL."""
        return [self.in_dim] + [self.hidden] * (self.layers - 1) + [self.out]

    def to_json(self) -> str:
        doc = asdict(self)
        if not doc["align"]:
            del doc["align"]  # configs without the head keep the JSON (and version) they always had
        return json.dumps(doc, sort_keys=True)

    @staticmethod
    def from_json(raw: str) -> GraphEncoderConfig:
        doc: dict[str, Any] = json.loads(raw)
        doc["node_types"] = tuple(doc["node_types"])
        return GraphEncoderConfig(**doc)


class GraphEncoder(nn.Module):
    def __init__(self, config: GraphEncoderConfig = GraphEncoderConfig()) -> None:
        super().__init__()
        if config.layers < 1:
            raise ValueError("layers must be >= 1")
        if config.aggr not in ("mean", "sum"):
            raise ValueError("aggr must be 'mean' or 'sum' (the incremental engine needs a delta rule)")
        self.config = config
        dims = config.dims()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.convs = nn.ModuleList(SAGEConv(dims[i], dims[i + 1], aggr=config.aggr) for i in range(config.layers))
            emb = torch.randn(len(config.node_types) + 1, config.in_dim)
        # torch's stubs leave the classmethod unannotated
        self.type_embedding = nn.Embedding.from_pretrained(F.normalize(emb, dim=1), freeze=True)  # type: ignore[no-untyped-call]
        if config.align:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)
                self.align = nn.Linear(config.in_dim, config.out, bias=False)
        self._type_index = {t: i for i, t in enumerate(config.node_types)}
        self.eval()

    # ---- features ----------------------------------------------------------------------
    @property
    def dims(self) -> list[int]:
        return self.config.dims()

    @property
    def num_layers(self) -> int:
        return self.config.layers

    def type_index(self, label: str) -> int:
        return self._type_index.get(label, len(self.config.node_types))

    @torch.no_grad()
    def type_features(self, labels: Sequence[str]) -> Tensor:
        """Node-type embeddings [len(labels), in_dim] (float32, on the model's device)."""
        idx = torch.tensor([self.type_index(x) for x in labels], dtype=torch.long, device=self.type_embedding.weight.device)
        feats: Tensor = self.type_embedding(idx)
        return feats.float()

    # ---- forward -----------------------------------------------------------------------
    def dense(self, layer: int, agg: Tensor, x_self: Tensor) -> Tensor:
        """Node-wise part of ``layer`` (0-based): SAGEConv after propagate, then ReLU if not last."""
        conv = self.convs[layer]
        # two fused multiply-adds into one output (what lin_l(agg) + lin_r(x_self) computes, with
        # one allocation instead of three: this runs on every recomputed row of every batch)
        lin_l, lin_r = cast(SageLinear, conv.lin_l), cast("SageLinear | None", getattr(conv, "lin_r", None))
        if lin_l.bias is not None:
            out = torch.addmm(lin_l.bias, agg, lin_l.weight.t())
        else:
            out = agg @ lin_l.weight.t()
        if lin_r is not None:
            out.addmm_(x_self, lin_r.weight.t())
            if lin_r.bias is not None:
                out += lin_r.bias
        return out.relu_() if layer < self.num_layers - 1 else out

    @torch.no_grad()
    def forward_all(self, x: Tensor, edge_index: Tensor) -> list[Tensor]:
        """The plain PyG forward pass, returning every layer's output [h0, h1, ..., hL]."""
        hs = [x]
        for layer, conv in enumerate(self.convs):
            h = conv(hs[-1], edge_index)
            hs.append(h.relu() if layer < self.num_layers - 1 else h)
        return hs

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.forward_all(x, edge_index)[-1]

    @property
    def has_align(self) -> bool:
        return self.config.align

    def align_text(self, text: Tensor) -> Tensor:
        """Text embeddings [n, in_dim] -> the structure space [n, out] (needs ``align=True``)."""
        if not self.config.align:
            raise ValueError("this graph model has no alignment head (train with --align)")
        aligned: Tensor = self.align(F.normalize(text, p=2, dim=1))
        return aligned

    # ---- identity and persistence ------------------------------------------------------
    @property
    def version(self) -> str:
        """Short sha256 of the config and every weight."""
        h = hashlib.sha256(self.config.to_json().encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"config": self.config.to_json(), "version": self.version})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> GraphEncoder:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            config = GraphEncoderConfig.from_json((f.metadata() or {})["config"])
        model = cls(config)
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval()


def check_fusion(mode: str, text_dim: int, struct_dim: int) -> None:
    if mode not in ("concat", "mean"):
        raise ValueError(f"fusion must be 'concat' or 'mean', not {mode!r}")
    if mode == "mean" and text_dim != struct_dim:
        raise ValueError(
            f"fusion='mean' needs gnn_out == text dim ({struct_dim} != {text_dim}); "
            f"set KGS_GNN_OUT={text_dim} or use fusion='concat'"
        )


def fused_dim(mode: str, text_dim: int, struct_dim: int) -> int:
    check_fusion(mode, text_dim, struct_dim)
    return text_dim + struct_dim if mode == "concat" else text_dim


def fuse(text: Tensor, struct: Tensor, mode: Fusion = "concat", text_weight: float = 0.5) -> Tensor:
    """The published vector from text features (h0) and structure (hL); unit norm (module doc)."""
    if not 0.0 <= text_weight <= 1.0:
        raise ValueError("fusion_text_weight must be in [0, 1]")
    check_fusion(mode, text.shape[1], struct.shape[1])
    t = F.normalize(text, p=2, dim=1)
    s = F.normalize(struct, p=2, dim=1)
    if mode == "concat":
        return torch.cat([t * math.sqrt(text_weight), s * math.sqrt(1.0 - text_weight)], dim=1)
    return F.normalize(t * text_weight + s * (1.0 - text_weight), p=2, dim=1)


def vector_version(text_model_id: str, graph_version: str, fusion: str, text_weight: float) -> str:
    """The version every published vector carries: a short sha256 of what makes the vector,
    the text model, the graph model's version, and the fusion and its weight."""
    raw = f"{text_model_id}|{graph_version}|{fusion}|{text_weight}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]
