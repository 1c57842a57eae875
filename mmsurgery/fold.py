"""The streaming file fold: a (trained) paired checkpoint in, a plain checkpoint out, one tensor at a time.

Every pathway weight becomes `foldmath.fold_weight(W, λ, W_aux)` — the same function `pathway.fold` uses, so
the file is bit-identical to folding in memory and calling `state_dict()`. λ and `W_aux` are dropped; every
other tensor is copied as it is. Memory stays near the largest tensor; the write is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsurgery import __version__
from mmsurgery.certificate import (
    Certificate,
    TensorDigest,
    certificate_versions,
    check_certificate_output,
    tensor_sha256,
    write_certificate,
)
from mmsurgery.checkpoint.dtypes import FLOATING, ITEMSIZE
from mmsurgery.checkpoint.dtypes import FOLD_DTYPES as DTYPES
from mmsurgery.checkpoint.hashing import HashJob
from mmsurgery.checkpoint.loaded import Checkpoint, TensorInfo
from mmsurgery.checkpoint.writer import SafetensorsWriter, WriteResult
from mmsurgery.errors import BadInputError, FoldError
from mmsurgery.foldmath import fold_weight
from mmsurgery.hf import output_for
from mmsurgery.paired_format import (
    SOURCE_KEY,
    LayerScales,
    PairedCheckpoint,
    aux_weight_key,
    cross_modal_scale_key,
    folded_metadata,
    open_paired,
    paired_view,
    weight_key,
)

__all__ = ["DTYPES", "FoldBuffers", "FoldResult", "PlainTensors", "default_output", "fold_file", "plain_tensors"]


def default_output(paired: Path) -> Path:
    """`<stem>.plain.safetensors` beside the input; `x.paired.safetensors` gives `x.plain.safetensors` (a model
    folder's default, `x.paired/` -> `x.plain/`, is `hf.ModelFolder.sibling`)."""
    name = paired.name.removesuffix(".index.json")
    stem = Path(name).stem.removesuffix(".paired")
    return paired.with_name(f"{stem}.plain.safetensors")


@dataclass(frozen=True, kw_only=True)
class FoldResult:
    source: Path
    output: Path | None  # a model folder, an index or the file; None: the input was already plain, nothing written
    scales: dict[str, LayerScales]  # module path -> λ (`paired_format.scale_entry`)
    num_tensors: int
    sha256: str | None  # of the paired input with source_hash=True (`fold --source-hash`), else None
    written: WriteResult | None
    certificate: Path | None = None  # the certificate written beside the fold (`fold --certificate`)

    @property
    def already_plain(self) -> bool:
        return not self.scales

    def to_json(self) -> dict[str, object]:
        return {
            "source": str(self.source),
            "output": str(self.output) if self.output else None,
            "already_plain": self.already_plain,
            "folded": len(self.scales),
            "num_tensors": self.num_tensors,
            "source_sha256": self.sha256,
            "bytes": self.written.total_size if self.written else 0,
            "certificate": str(self.certificate) if self.certificate else None,
            "copied": [p.name for p in self.written.extra_files] if self.written else [],
            "scales": self.scales,
        }


class PlainTensors:
    """What folding a paired checkpoint produces, tensor by tensor: the specs of the plain output (the input's
    order, pathway tensors dropped, floating dtypes cast for `dtype`) and `tensor(name)`, the one computation of
    each output tensor. `fold_file` writes these tensors; `verify`'s weights stage compares a PLAIN against them,
    so the gate and the fold cannot disagree about what a correct fold is.

    Build it with `plain_tensors(paired, dtype)`; it reads tensors from `paired.ck` lazily, so that must stay open.
    """

    def __init__(self, paired: PairedCheckpoint, dtype: str) -> None:
        self.paired = paired
        self.ck = paired.ck
        self.pathways = paired.pathways
        self.layers = list(paired.pathways)
        self.scales = paired.scales
        self.dtype = dtype
        self._folded = {weight_key(p): spec for p, spec in paired.pathways.items()}
        infos = paired.ck.infos
        self.specs = [self._spec(infos[k]) for k in paired.plain_keys]

    def _spec(self, info: TensorInfo) -> TensorInfo:
        cast = self.dtype != "keep" and info.dtype in FLOATING
        return TensorInfo(info.name, self.dtype if cast else info.dtype, info.shape)

    def tensor(self, name: str, buffers: FoldBuffers | None = None) -> Any:
        """The output tensor `name`: `fold_weight(W, λs, W_auxs)` for a pathway weight, the input tensor for every
        other one; cast to the output dtype. Raises `FoldError` for a non-finite fold or an overflowing cast.

        With `buffers` (the streaming fold's) the inputs are read into them and a float32 fold is computed in
        place in the first W_aux's buffer, so the result is a view of `buffers`, valid until the next call (further
        auxiliaries are read into fresh memory); the values are the same bits either way (elementwise
        operations, the same roundings)."""
        import torch

        spec = self._folded.get(name)
        if spec is None:
            t = self.ck.get(name) if buffers is None else self.ck.read_into(name, buffers.a)
        else:
            p, n = spec.module, spec.num_aux
            lam = [self.ck.get(cross_modal_scale_key(p, k)) for k in range(n)]
            if buffers is None:
                t = self.ck.get(name)
                t = fold_weight(t, lam, [self.ck.get(aux_weight_key(p, k)) for k in range(n)], name=p)
            else:
                t = self.ck.read_into(name, buffers.a)
                first = self.ck.read_into(aux_weight_key(p), buffers.b)
                auxes = [first, *(self.ck.get(aux_weight_key(p, k)) for k in range(1, n))]
                out = first if first.dtype == torch.float32 and first.shape == t.shape else None
                t = fold_weight(t, lam, auxes, name=p, out=out)
        if self.dtype != "keep" and t.is_floating_point():
            out_dtype = getattr(torch, self.dtype)
            if t.dtype != out_dtype:
                t = t.to(out_dtype)
                if not torch.isfinite(t).all():
                    raise FoldError(f"{name}: does not fit in {self.dtype} (overflow); use --dtype keep or float32")
        return t

    def buffers(self) -> FoldBuffers:
        """Two reusable read buffers, each the size of the largest input tensor, for `tensor(name, buffers)`."""
        import torch

        largest = max((i.numel * ITEMSIZE[i.dtype] for i in self.ck.infos.values()), default=0)
        return FoldBuffers(torch.empty(largest, dtype=torch.uint8), torch.empty(largest, dtype=torch.uint8))


@dataclass(frozen=True)
class FoldBuffers:
    """Reused buffers of a streaming fold: `a` receives W (or a pass-through tensor), `b` receives W_aux and,
    for float32, the folded result."""

    a: Any
    b: Any


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def plain_tensors(paired: PairedCheckpoint | Checkpoint, dtype: str = "keep") -> PlainTensors:
    """The fold of `paired` (see `PlainTensors`): a `PairedCheckpoint` (`open_paired`), or an open `Checkpoint`,
    which is viewed as one first (`paired_view`). No pathway layers means a plain input, whose tensors pass
    through. Raises `FoldError` for an inconsistent paired file or a non-finite λ, and `BadInputError` for an
    unknown `dtype` or a newer format version."""
    _check_dtype(dtype)
    if isinstance(paired, Checkpoint):
        paired = paired_view(paired)
    bad = paired.nonfinite_layers
    if bad:
        lam = paired.scales[bad[0]]
        raise FoldError(f"{bad[0]}: cross_modal_scale is {lam}; refusing to fold ({len(bad)} layer(s))")
    _check_floating(paired)
    return PlainTensors(paired, dtype)


def _check_floating(paired: PairedCheckpoint) -> None:
    """Every W and W_aux of a pathway is floating point, from the headers, before anything is read or written:
    `W + λ·W_aux` cast back to an integer W would be silently truncated (`foldmath.fold_weight` refuses it too)."""
    infos = paired.ck.infos
    for p, spec in paired.pathways.items():
        for name in (weight_key(p), *(aux_weight_key(p, k) for k in range(spec.num_aux))):
            dtype = infos[name].dtype
            if dtype not in FLOATING:
                raise FoldError(
                    f"{name}: {dtype}, not floating point; W + λ·W_aux cannot be stored in it without truncation "
                    "(a pathway folds floating-point weights only)"
                )


@contextlib.contextmanager
def _leave_a_core(hashing: HashJob | None) -> Iterator[None]:
    """One torch thread fewer while the sha256 runs on its own thread: on a 2-core machine two OpenMP threads
    beside the hash thread stall each elementwise fold on the preempted one (the arithmetic took 2.5× as long)."""
    import torch

    threads = torch.get_num_threads()
    if threads > 1 and hashing is not None and hashing.running:
        torch.set_num_threads(threads - 1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def fold_file(
    paired: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "keep",
    shard_size: int | str | None = None,
    force: bool = False,
    key: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    source_hash: bool = False,
    certificate: str | os.PathLike[str] | None = None,
) -> FoldResult:
    """Fold `paired` into a plain checkpoint at `out` (default: `<stem>.plain.safetensors` beside it).

    `paired` as a Hugging Face model folder (a folder with `config.json`: `pair`'s folder output, a
    `save_pretrained` folder, a Trainer `checkpoint-N`) gives a model folder: `<name>.plain/` beside it
    (`x.paired/` -> `x.plain/`) by default, or the folder `out` names, holding `model.safetensors` (or shards and
    their index) and the input's `config.json`, processor and tokenizer files, never its training state
    (`hf.model_folder`), so `from_pretrained` loads it as is. `out` naming a `.safetensors` file writes that file.

    `on_progress(bytes_written, bytes_total)` is called after each tensor written. `source_hash=True`
    (`--source-hash`) records the input's sha256 in the output's metadata (`mmsurgery.source_sha256`, which
    `verify` then checks against PAIRED), hashed on a second thread while the tensors stream. It is off by default:
    sha256 runs at ~1.6 GB/s on one core, so on a fast disk that one pass costs more than the rest of the fold
    (docs/benchmarks.md), and the fold's correctness does not depend on it (`verify` proves a fold bit for bit from
    PAIRED itself).
    A checkpoint without pathway tensors is reported as already plain and nothing is written. A non-finite λ or
    folded weight raises `FoldError` naming the layer, before anything is renamed into place.

    `certificate` names a fold certificate to write once the output is in place (`mmsurgery.certificate`):
    PAIRED's sha256 and the sha256 of every tensor as computed here, before it is written, so `verify PLAIN
    --certificate` can prove PLAIN without PAIRED. It needs PAIRED's sha256, so it costs that pass too.
    """
    _check_dtype(dtype)
    with open_paired(paired, key=key) as opened:
        ck = opened.ck
        inputs = [ck.path, *ck.files, *([ck.folder] if ck.folder is not None else [])]  # nothing goes inside
        if certificate is not None:
            check_certificate_output(certificate, inputs, force)
        hashed = source_hash or certificate is not None
        hashing = HashJob(ck.files, opener=ck.open_pinned) if hashed else None  # on the other core
        source = plain_tensors(opened, dtype)
        if not source.layers:
            digest = hashing.result() if hashing is not None else None
            return FoldResult(source=ck.path, output=None, scales={}, num_tensors=len(ck), sha256=digest, written=None)
        scales = json.dumps(source.scales, separators=(",", ":"))
        metadata = folded_metadata(ck.metadata, scales=scales, version=__version__, source_digest=source_hash)
        default = default_output(ck.path)
        dest, extra_files = output_for(out, paired, default, ".plain", replaces=".paired", occupied=ck.folder)
        with SafetensorsWriter(
            dest,
            source.specs,
            metadata=metadata,
            shard_size=shard_size,
            force=force,
            inputs=inputs,
            extra_files=extra_files,
            on_progress=on_progress,
        ) as w:
            buffers = source.buffers()
            digests: list[TensorDigest] = []
            with _leave_a_core(hashing):
                for s in source.specs:
                    t = source.tensor(s.name, buffers)
                    if certificate is not None:  # of the tensor computed here, never read back from the output
                        digests.append(TensorDigest(name=s.name, dtype=s.dtype, shape=s.shape, sha256=tensor_sha256(t)))
                    w.write(s.name, t)
            digest = hashing.result() if hashing is not None else None
            written = w.commit(patch={SOURCE_KEY: digest} if source_hash and digest is not None else None)
        output = written.path.parent if extra_files is not None else written.path
        cert_path = None
        if certificate is not None:
            assert digest is not None
            cert = Certificate(
                paired_path=str(paired),
                paired_sha256=digest,
                fold_dtype=dtype,
                tensors=tuple(digests),
                versions=certificate_versions(),
                written_by="fold",
            )
            cert_path = write_certificate(cert, certificate, inputs=inputs, force=force)
        return FoldResult(
            source=ck.path,
            output=output,
            scales=source.scales,
            num_tensors=len(source.specs),
            sha256=digest if source_hash else None,
            written=written,
            certificate=cert_path,
        )
