"""Pure tensor transforms that bring an auxiliary weight into the target's own layout.

Every fused q/k/v layout in scope stacks `[q; k; v]` along the output dimension with heads contiguous inside
each part (timm, OpenAI CLIP `in_proj_weight`, GPT-2 after transposing), so fusing is a `cat` and splitting is
a `chunk(3)`; head counts may differ. Conv1D (GPT-2) weights are `[in, out]` and are transposed on the way in
(aux) and on the way out (target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmsurgery.checkpoint.dtypes import ITEMSIZE

__all__ = ["OPS", "Transform"]

OPS = ("copy", "cat_qkv", "chunk_qkv")


@dataclass(frozen=True)
class Transform:
    op: str  # "copy": one aux tensor as is; "cat_qkv": cat(q, k, v); "chunk_qkv": part `part` of a fused qkv
    part: int | None = None  # 0, 1, 2 for q, k, v when op == "chunk_qkv"
    aux_conv1d: bool = False  # transpose each aux tensor first ([in, out] -> [out, in])
    target_conv1d: bool = False  # transpose the result last, into the target's [in, out]

    def __post_init__(self) -> None:
        if self.op not in OPS or (self.op == "chunk_qkv") != (self.part is not None):
            raise ValueError(f"bad transform {self}")

    def describe(self) -> str:
        core = {"copy": "copy", "cat_qkv": "cat(q,k,v)", "chunk_qkv": f"qkv.chunk(3)[{self.part}]"}[self.op]
        if self.aux_conv1d:
            core = "transpose, " + core
        if self.target_conv1d:
            core += ", transpose"
        return core

    def to_json(self) -> dict[str, object]:
        return {"op": self.op, "part": self.part, "aux_conv1d": self.aux_conv1d, "target_conv1d": self.target_conv1d}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transform:
        return cls(data["op"], data.get("part"), bool(data.get("aux_conv1d")), bool(data.get("target_conv1d")))

    def read(self, ck: Any, keys: Sequence[str], dtype: str, buf: Any) -> Any:
        """`apply([ck.get(k) for k in keys], dtype)`, the same values, but read into `buf` (a reused 1-D uint8
        tensor of at least `sum(nbytes)`) so a streaming `pair` touches no fresh memory per tensor: without
        transposes or a cast, `copy` is the tensor's bytes, `cat_qkv` the three tensors' bytes one after another,
        `chunk_qkv` a row range of the fused tensor. Anything else falls back to `apply` (fresh memory). The result
        is a view of `buf`, valid until `buf` is written again."""
        import torch

        infos = [ck.infos[k] for k in keys]
        if self.aux_conv1d or self.target_conv1d or any(i.dtype != dtype for i in infos):
            return self.apply([ck.get(k) for k in keys], dtype=getattr(torch, dtype))
        offset = 0
        parts = []
        for k, i in zip(keys, infos, strict=True):
            n = i.numel * ITEMSIZE[i.dtype]
            parts.append(ck.read_into(k, buf[offset : offset + n]))
            offset += n
        if self.op == "copy":
            return parts[0]
        if self.op == "cat_qkv":
            return buf[:offset].view(parts[0].dtype).reshape(self.out_shape([i.shape for i in infos]))
        return parts[0].chunk(3, dim=0)[self.part]  # rows of a contiguous tensor: contiguous

    def out_shape(self, aux_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        """The (linear-orientation, then target-orientation) shape the transform produces, from shapes alone."""
        shapes = [(s[1], s[0]) if self.aux_conv1d else tuple(s) for s in aux_shapes]
        if self.op == "copy":
            out = shapes[0]
        elif self.op == "cat_qkv":
            out = (sum(s[0] for s in shapes), shapes[0][1]) if len({s[1] for s in shapes}) == 1 else (-1, -1)
        else:
            out = (shapes[0][0] // 3, shapes[0][1]) if shapes[0][0] % 3 == 0 else (-1, -1)
        return (out[1], out[0]) if self.target_conv1d else tuple(out)

    def apply(self, tensors: Sequence[Any], dtype: Any = None) -> Any:
        """Apply to the aux tensor(s); returns a new contiguous tensor (never a view of a mapped input)."""
        import torch

        ts = [t.t() if self.aux_conv1d else t for t in tensors]
        if self.op == "copy":
            out = ts[0]
        elif self.op == "cat_qkv":
            out = torch.cat(list(ts), dim=0)
        else:
            out = ts[0].chunk(3, dim=0)[self.part]
        if self.target_conv1d:
            out = out.t()
        return out.to(dtype=dtype or out.dtype, copy=True).contiguous()
