"""The fold certificate: what the correct PLAIN of one PAIRED is, small enough to travel without PAIRED.

`fold --certificate CERT` (or `verify PLAIN --against PAIRED --certificate CERT` after a passing gate) writes it
where PAIRED is; `verify PLAIN --certificate CERT` gates PLAIN with it where only PLAIN is (docs/verify.md,
"Gating without PAIRED"). It holds, in one JSON document (schema `mmsurgery.certificate/1`):

- `paired`: PAIRED's path as given and its sha256 (of its `name sha256` lines for a shard set);
- `tensors`: for every tensor of the correct PLAIN, in order, its name, dtype, shape and the sha256 of its bytes
  (row-major, little-endian: what a safetensors file stores), computed from the fold of PAIRED in memory, never
  read back from a written file, so a damaged write cannot certify itself; `fold_dtype` is the `--dtype` of it;
- `versions`: mmsurgery, torch and Python (and onnx / onnxruntime when a graph was used);
- written by `verify` also: `arch` (the architecture and the configuration the gate built), `outputs` (the
  seed, batch sizes and sha256 of the seeded inputs, and the unfolded model's float32 outputs at each batch size)
  and `cost` (parameters, FLOPs per op, configuration, and the ONNX graph's structure when one was exported).

The document is `{"schema", "body", "digest"}`, `digest` being the sha256 of the body's canonical JSON (sorted
keys, no spaces): a damaged, truncated or hand-edited certificate is refused in one line. It proves that PLAIN
equals the fold of the PAIRED whose digest it names; it is only as trustworthy as the place it is kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsurgery.checkpoint.loaded import brief
from mmsurgery.checkpoint.pins import check_regular
from mmsurgery.checkpoint.publish import check_output, os_error, write_text_atomic
from mmsurgery.errors import BadInputError

__all__ = [
    "KIND",
    "MAX_BYTES",
    "SCHEMA",
    "VERSION",
    "Certificate",
    "RecordedOutputs",
    "TensorDigest",
    "certificate_versions",
    "check_certificate_output",
    "read_certificate",
    "tensor_sha256",
    "write_certificate",
]

KIND = "mmsurgery.certificate"
VERSION = 1
SCHEMA = f"{KIND}/{VERSION}"
MAX_BYTES = 64 << 20  # a ViT-L certificate is ~0.1 MB; a 7B model's a few MB: anything this big is not one
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCHEMA = re.compile(rf"{re.escape(KIND)}/([1-9][0-9]{{0,8}})")


def tensor_sha256(tensor: Any) -> str:
    """sha256 of a tensor's bytes as a safetensors file stores them (contiguous, row-major, little-endian), so a
    tensor read from any format gives the digest of the same values."""
    import torch

    t = tensor.detach().contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy()).hexdigest()


def certificate_versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The versions a certificate records: mmsurgery, torch, Python, and `extra` (onnx, onnxruntime...)."""
    import platform

    import torch

    from mmsurgery import __version__

    return {"mmsurgery": __version__, "torch": torch.__version__, "python": platform.python_version(), **(extra or {})}


@dataclass(frozen=True, kw_only=True)
class TensorDigest:
    name: str
    dtype: str  # safetensors' names as `TensorInfo.dtype` gives them: float32, bfloat16, ...
    shape: tuple[int, ...]
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256}


@dataclass(frozen=True, kw_only=True)
class RecordedOutputs:
    """The unfolded model's outputs on the seeded inputs, float32, per batch size."""

    seed: int
    batch_sizes: tuple[int, ...]
    inputs: dict[int, list[str]]  # batch size -> sha256 of each input tensor (`tensor_sha256`)
    outputs: dict[int, list[tuple[tuple[int, ...], bytes]]]  # batch size -> (shape, float32 bytes) per output
    pathway_effect_max_abs: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "batch_sizes": list(self.batch_sizes),
            "inputs": {str(b): d for b, d in self.inputs.items()},
            "outputs": {
                str(b): [{"shape": list(s), "float32": base64.b64encode(data).decode()} for s, data in outs]
                for b, outs in self.outputs.items()
            },
            "pathway_effect_max_abs": self.pathway_effect_max_abs,
        }

    def tensors(self) -> dict[int, list[Any]]:
        """The recorded outputs as float32 tensors, per batch size."""
        import torch

        return {
            b: [torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape) for shape, data in outs]
            for b, outs in self.outputs.items()
        }


@dataclass(frozen=True, kw_only=True)
class Certificate:
    paired_path: str
    paired_sha256: str
    fold_dtype: str
    tensors: tuple[TensorDigest, ...]
    versions: dict[str, str]
    written_by: str  # "fold" or "verify"
    arch: dict[str, Any] | None = None  # {"name", "config"}: what the gate built (verify only)
    outputs: RecordedOutputs | None = None
    cost: dict[str, Any] | None = None  # {"params", "flops", "flops_per_op", "config", "graph"}
    by_name: dict[str, TensorDigest] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.tensors})

    def body(self) -> dict[str, Any]:
        return {
            "paired": {"path": self.paired_path, "sha256": self.paired_sha256},
            "fold_dtype": self.fold_dtype,
            "tensors": [t.to_json() for t in self.tensors],
            "versions": dict(self.versions),
            "written_by": self.written_by,
            "arch": self.arch,
            "outputs": self.outputs.to_json() if self.outputs is not None else None,
            "cost": self.cost,
        }

    def dumps(self) -> str:
        body = self.body()
        return json.dumps({"schema": SCHEMA, "body": body, "digest": _digest(body)}, indent=1) + "\n"


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_certificate(
    cert: Certificate, path: str | os.PathLike[str], *, inputs: Sequence[Path] = (), force: bool = False
) -> Path:
    """Write `cert` to `path` atomically (temp file + rename). Refuses an existing file unless `force`, and an
    input (`inputs`) always."""
    check_certificate_output(path, inputs, force)
    try:
        return write_text_atomic(path, cert.dumps(), force=force)
    except OSError as e:
        raise os_error(e, Path(path)) from e


def check_certificate_output(path: str | os.PathLike[str], inputs: Sequence[Path] = (), force: bool = False) -> None:
    """The output checks of `write_certificate`, run also before the work that produces the certificate, so a
    fold or a gate never runs only to find it cannot write its certificate."""
    path = Path(path)
    check_output(path, list(inputs), force)
    if not path.parent.is_dir():
        raise BadInputError(f"{path}: its folder does not exist")


# ---- reading ------------------------------------------------------------------------------------------------
class _Damaged(Exception):
    pass


def read_certificate(path: str | os.PathLike[str]) -> Certificate:
    """Read and check a certificate; `BadInputError` in one line for anything that is not an intact certificate
    this mmsurgery reads: not a regular file, too big, not JSON, another schema, a newer version, a digest that
    does not match its body (damaged or edited), or a body of the wrong shape."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such certificate")
    check_regular(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise BadInputError(f"{path}: {size:,} bytes, more than a certificate ({MAX_BYTES:,} at most)")
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadInputError(f"{path}: not a certificate (not JSON; damaged or truncated?)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schema"), str):
        raise BadInputError(f"{path}: not a certificate (no schema {SCHEMA!r})")
    m = _SCHEMA.fullmatch(doc["schema"])
    if m is None:
        raise BadInputError(f"{path}: schema {brief(doc['schema'], 60)}, not a certificate ({SCHEMA})")
    if int(m[1]) > VERSION:
        raise BadInputError(
            f"{path}: a {doc['schema']} certificate, newer than this mmsurgery reads ({SCHEMA}): upgrade"
        )
    body, digest = doc.get("body"), doc.get("digest")
    if not isinstance(body, dict) or not isinstance(digest, str):
        raise BadInputError(f"{path}: not a certificate (no body or digest)")
    try:
        actual = _digest(body)
    except (TypeError, ValueError):
        actual = None
    if actual != digest:
        raise BadInputError(f"{path}: the certificate's digest does not match its contents: damaged or edited")
    try:
        return _parse(body)
    except (_Damaged, KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"{path}: a malformed certificate ({brief(str(exc), 100)})") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _want(cond: bool, what: str) -> None:
    if not cond:
        raise _Damaged(what)


def _str(d: Mapping[str, Any], key: str) -> str:
    v = d[key]
    _want(isinstance(v, str), f"{key} is not a string")
    return v


def _ints(v: Any, what: str) -> tuple[int, ...]:
    _want(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v), what)
    return tuple(v)


def _parse(body: Mapping[str, Any]) -> Certificate:
    paired = body["paired"]
    _want(isinstance(paired, dict), "paired is not an object")
    sha = _str(paired, "sha256")
    _want(bool(_HEX64.fullmatch(sha)), "paired.sha256 is not a sha256")
    tensors = []
    for t in body["tensors"]:
        _want(isinstance(t, dict), "a tensor entry is not an object")
        digest = _str(t, "sha256")
        _want(bool(_HEX64.fullmatch(digest)), f"the sha256 of {t.get('name')!r} is not a sha256")
        shape = _ints(t["shape"], f"the shape of {t.get('name')!r}")
        tensors.append(TensorDigest(name=_str(t, "name"), dtype=_str(t, "dtype"), shape=shape, sha256=digest))
    _want(len({t.name for t in tensors}) == len(tensors), "a tensor is listed twice")
    versions = body["versions"]
    _want(isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values()), "versions")
    outputs = body.get("outputs")
    arch, cost = body.get("arch"), body.get("cost")
    _want(arch is None or isinstance(arch, dict), "arch is not an object")
    _want(cost is None or isinstance(cost, dict), "cost is not an object")
    return Certificate(
        paired_path=_str(paired, "path"),
        paired_sha256=sha,
        fold_dtype=_str(body, "fold_dtype"),
        tensors=tuple(tensors),
        versions=dict(versions),
        written_by=_str(body, "written_by"),
        arch=arch,
        outputs=_parse_outputs(outputs) if outputs is not None else None,
        cost=cost,
    )


def _parse_outputs(o: Mapping[str, Any]) -> RecordedOutputs:
    _want(isinstance(o, dict), "outputs is not an object")
    sizes = _ints(o["batch_sizes"], "outputs.batch_sizes")
    seed = o["seed"]
    _want(isinstance(seed, int) and not isinstance(seed, bool), "outputs.seed is not an integer")
    inputs = {int(b): list(d) for b, d in o["inputs"].items()}
    outs: dict[int, list[tuple[tuple[int, ...], bytes]]] = {}
    for b, items in o["outputs"].items():
        decoded = []
        for item in items:
            shape = _ints(item["shape"], "an output's shape")
            data = base64.b64decode(item["float32"], validate=True)
            n = 1
            for s in shape:
                n *= s
            _want(len(data) == 4 * n, f"an output of batch {b} holds {len(data)} bytes for shape {list(shape)}")
            decoded.append((shape, data))
        outs[int(b)] = decoded
    _want(set(outs) == set(sizes) == set(inputs), "outputs, inputs and batch_sizes disagree")
    effect = o.get("pathway_effect_max_abs")
    _want(effect is None or isinstance(effect, (int, float)), "pathway_effect_max_abs is not a number")
    return RecordedOutputs(
        seed=seed,
        batch_sizes=sizes,
        inputs=inputs,
        outputs=outs,
        pathway_effect_max_abs=float(effect) if effect is not None else None,
    )
