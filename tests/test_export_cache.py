"""The export cache binds new weights into a cached graph only when that gives exactly a fresh export's files, and
ignores (with a reason) any entry it cannot prove: damaged, foreign, of another format, or pinned to other weights."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from torch import Tensor, nn

from mmsurgery.models.vit import VisionTransformer, ViTConfig
from mmsurgery.verify import export_cache
from mmsurgery.verify.export_cache import MAGIC, ExportCache, Outcome, cache_key
from mmsurgery.verify.onnx_stage import OrtRunner

CFG = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def export(model: nn.Module, path: Path, example: Tensor = X) -> Path:
    """As `onnx_stage.export` exports (dynamic batch 1..1024, opset 20), with external data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=20,
            external_data=True,
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    return path


def random_vit(seed: int) -> VisionTransformer:
    """Every parameter random (no all-ones LayerNorm or zero bias, which the exporter treats specially)."""
    torch.manual_seed(seed)
    model = VisionTransformer(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def key_of(model: nn.Module, **overrides: object) -> str:
    kwargs: dict = {"model": model, "config": CFG.to_dict(), "example": X, "opset": 20, "max_batch": 1024}
    return cache_key(**(kwargs | overrides))


def files(path: Path) -> tuple[bytes, bytes]:
    return path.read_bytes(), Path(f"{path}.data").read_bytes()


@pytest.fixture(scope="module")
def vits(tmp_path_factory) -> SimpleNamespace:
    """Three tiny ViTs of one configuration with different weights, each freshly exported to `<name>/m.onnx`."""
    root = tmp_path_factory.mktemp("exports")
    models = {name: random_vit(seed) for seed, name in enumerate(("a", "a2", "b"))}
    graphs = {name: export(m, root / name / "m.onnx") for name, m in models.items()}
    key = key_of(models["a"])
    return SimpleNamespace(root=root, models=models, graphs=graphs, key=key)


@pytest.fixture
def proven(vits, tmp_path) -> ExportCache:
    """A cache whose entry two exports (a, a2) agree on."""
    cache = ExportCache(tmp_path / "cache")
    assert not cache.store(vits.key, vits.graphs["a"], vits.models["a"].state_dict()).stored
    assert cache.store(vits.key, vits.graphs["a2"], vits.models["a2"].state_dict()).stored
    return cache


def header(blob: bytes) -> tuple[dict, int]:
    (size,) = struct.unpack_from("<Q", blob, 40)
    return json.loads(blob[48 : 48 + size]), 48 + size


def repack(blob: bytes, edit) -> bytes:
    """The entry with its header edited and a valid digest: what a future version or a careful forger writes."""
    head, start = header(blob)
    edit(head)
    text = json.dumps(head, sort_keys=True).encode()
    body = struct.pack("<Q", len(text)) + text + blob[start:]
    return MAGIC + hashlib.sha256(body).digest() + body


# ---- (1) a bound graph is a fresh export ------------------------------------------------------------------------
def test_bound_graph_equals_a_fresh_export_of_the_new_weights(vits, tmp_path):
    cache = ExportCache(tmp_path / "cache")
    a, a2, b = (vits.models[n] for n in ("a", "a2", "b"))
    assert key_of(b) == vits.key  # the key does not see weight values

    first = cache.store(vits.key, vits.graphs["a"], a.state_dict())
    assert first == Outcome(stored=False, reason=first.reason) and "first export" in first.reason
    pending = cache.bind(vits.key, b.state_dict(), tmp_path / "early" / "m.onnx")
    assert not pending.hit and "seen one export" in pending.reason
    assert not (tmp_path / "early").exists()
    second = cache.store(vits.key, vits.graphs["a2"], a2.state_dict())
    assert second.stored and "32 of 32 state tensors may differ" in second.reason, second.reason

    dest = tmp_path / "bound" / "m.onnx"  # same file name as the fresh export: the .data location is in the graph
    found = cache.bind(vits.key, b.state_dict(), dest)
    assert found.hit and found.reason.startswith("bound 32 initializers"), found.reason

    fresh = onnx.load(str(vits.graphs["b"]))
    bound = onnx.load(str(dest))
    assert [n.SerializeToString() for n in bound.graph.node] == [n.SerializeToString() for n in fresh.graph.node]
    assert bound.graph.input == fresh.graph.input and bound.graph.output == fresh.graph.output
    got = {i.name: onnx.numpy_helper.to_array(i) for i in bound.graph.initializer}
    want = {i.name: onnx.numpy_helper.to_array(i) for i in fresh.graph.initializer}
    assert list(got) == list(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        assert got[name].tobytes() == value.tobytes(), name
    assert files(dest) == files(vits.graphs["b"])  # byte for byte, both files

    outputs = {name: OrtRunner(path)(X)[0] for name, path in (("bound", dest), *vits.graphs.items())}
    assert torch.equal(outputs["bound"], outputs["b"])
    with torch.no_grad():
        torch.testing.assert_close(outputs["bound"], b(X), atol=1e-4, rtol=1e-4)
    assert (outputs["bound"] - outputs["a"]).abs().max() > 0.1  # not A's graph: cannot pass trivially
    assert files(dest)[1] != files(vits.graphs["a"])[1] != files(vits.graphs["a2"])[1]


def test_the_exporter_keeps_every_weight_some_transposed(vits, proven):
    """What dynamo does with the ViT's weights: nothing is dropped; names stay on biases, norms, embeddings, the
    patch conv and the head (a Gemm with transB); the block linears become `val_N` = weight.T for MatMul."""
    head, _ = header(proven.entry_path(vits.key).read_bytes())
    assert head["unused"] == []
    recipe = export_cache._recipe(head)
    sources = {src for src, _ in recipe.values()}
    assert sources == set(vits.models["a"].state_dict())
    transposed = sorted(src for src, perm in recipe.values() if perm is not None)
    assert transposed == sorted(
        k for k in sources if k.startswith("blocks.") and k.endswith(".weight") and "norm" not in k
    )
    assert all(perm == [1, 0] for _, perm in recipe.values() if perm is not None)
    assert all(name.startswith("val_") for name, (src, perm) in recipe.items() if perm is not None)
    assert set(head["constants"]) >= {"val_58"}  # the attention scale, 0.5: a constant of the config


# ---- the binding rule: pinned tensors, values the exporter rewrites --------------------------------------------
def test_a_tensor_no_export_has_varied_stays_pinned(vits, tmp_path):
    cache = ExportCache(tmp_path / "cache")
    a = vits.models["a"]
    cache.store(vits.key, vits.graphs["a"], a.state_dict())
    again = cache.store(vits.key, vits.graphs["a"], a.state_dict())  # the same weights gated twice
    assert again.stored and "0 of 32 state tensors may differ" in again.reason
    other = cache.bind(vits.key, vits.models["b"].state_dict(), tmp_path / "b.onnx")
    assert not other.hit and "no export has shown" in other.reason
    same = cache.bind(vits.key, a.state_dict(), tmp_path / "a" / "m.onnx")
    assert same.hit and files(tmp_path / "a" / "m.onnx") == files(vits.graphs["a"])


def test_values_the_exporter_rewrites_are_not_bound(vits, proven, tmp_path):
    b = vits.models["b"]
    zero_bias = dict(b.state_dict()) | {"head.bias": torch.zeros(5)}
    found = proven.bind(vits.key, zero_bias, tmp_path / "z.onnx")
    assert not found.hit and "head.bias is uniform" in found.reason
    shared = dict(b.state_dict()) | {"blocks.1.norm1.weight": b.state_dict()["blocks.0.norm1.weight"].clone()}
    found = proven.bind(vits.key, shared, tmp_path / "s.onnx")
    assert not found.hit and "equals blocks.0.norm1.weight" in found.reason
    assert not (tmp_path / "z.onnx").exists() and not (tmp_path / "s.onnx").exists()

    # why: a fresh export of the zero-bias model really is another graph (onnxscript drops an all-zero Gemm bias)
    model = random_vit(2)
    model.load_state_dict(zero_bias)
    path = export(model, tmp_path / "zero" / "m.onnx")
    assert "head.bias" not in {i.name for i in onnx.load(str(path), load_external_data=False).graph.initializer}
    # that export disagrees with the entry, but the entry never claimed to bind it: the entry stands
    kept = proven.store(vits.key, path, zero_bias)
    assert not kept.stored and "would not bind" in kept.reason and "the entry is kept" in kept.reason, kept.reason
    assert proven.bind(vits.key, b.state_dict(), tmp_path / "b" / "m.onnx").hit


# ---- (2) entries that cannot be proven are misses, and the caller exports --------------------------------------
def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


DAMAGE = {
    "digest byte": (lambda blob: _flip(blob, 20), "digest does not match"),
    "header byte (the recipe)": (lambda blob: _flip(blob, blob.index(b'"segments"') + 30), "digest does not match"),
    "skeleton byte": (lambda blob: _flip(blob, header(blob)[1] + 100), "digest does not match"),
    "magic": (lambda blob: b"X" + blob[1:], "not an export cache entry"),
    "truncated": (lambda blob: blob[: len(blob) // 2], "digest does not match"),
    "header only": (lambda blob: blob[:30], "truncated"),
    "another format": (lambda blob: repack(blob, lambda h: h.update(format=2)), "cache format 2"),
    "forged shape": (
        lambda blob: repack(blob, lambda h: h["state"]["head.weight"].update(shape=[32, 5])),
        "head.weight is float32[5, 32], the entry's is float32[32, 5]",
    ),
    "forged source": (
        lambda blob: repack(
            blob, lambda h: [s.update(state="pos_embed") for s in h["segments"] if s.get("state") == "head.weight"]
        ),
        "bytes, the entry says",
    ),
    "forged sections": (lambda blob: repack(blob + b"\0", lambda h: None), "do not add up"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_a_miss_with_the_reason(vits, proven, tmp_path, damage):
    change, expected = DAMAGE[damage]
    path = proven.entry_path(vits.key)
    path.write_bytes(change(path.read_bytes()))
    dest = tmp_path / "out" / "m.onnx"
    found = proven.bind(vits.key, vits.models["b"].state_dict(), dest)
    assert not found.hit and expected in found.reason, found.reason
    assert not dest.parent.exists() or not any(dest.parent.iterdir())


def test_foreign_missing_unreadable_and_unfitting_entries_are_misses(vits, proven, tmp_path):
    state = vits.models["b"].state_dict()
    unfit = proven.bind(vits.key, {k: v for k, v in state.items() if k != "head.bias"}, tmp_path / "u.onnx")
    assert not unfit.hit and "missing ['head.bias']" in unfit.reason
    other = key_of(vits.models["a"], opset=19)
    shutil.copy(proven.entry_path(vits.key), proven.entry_path(other))  # another key's file under this key's name
    foreign = proven.bind(other, state, tmp_path / "f.onnx")
    assert not foreign.hit and "stored under key" in foreign.reason
    assert "no entry" in ExportCache(tmp_path / "empty").bind(vits.key, state, tmp_path / "m.onnx").reason
    proven.entry_path(vits.key).unlink()
    proven.entry_path(vits.key).mkdir()
    assert "not a regular file" in proven.bind(vits.key, state, tmp_path / "d.onnx").reason
    proven.entry_path(vits.key).rmdir()
    os.mkfifo(proven.entry_path(vits.key))  # read, it would block forever
    assert "not a regular file" in proven.bind(vits.key, state, tmp_path / "p.onnx").reason
    assert not any(tmp_path.glob("*.onnx"))


def test_after_a_miss_the_caller_exports_and_the_entry_starts_again(vits, proven, tmp_path):
    path = proven.entry_path(vits.key)
    path.write_bytes(_flip(path.read_bytes(), 100))
    b, dest = vits.models["b"], tmp_path / "gate" / "m.onnx"
    found = proven.bind(vits.key, b.state_dict(), dest)
    assert not found.hit
    export(b, dest)  # what verify does on a miss
    stored = proven.store(vits.key, dest, b.state_dict())
    assert not stored.stored and "kept as the first export" in stored.reason and "digest" in stored.reason
    assert files(dest) == files(vits.graphs["b"])
    assert proven.store(vits.key, vits.graphs["a"], vits.models["a"].state_dict()).stored


# ---- (3) graphs with constants computed from the weights are never made bindable -------------------------------
class Baked(nn.Module):
    """`scale.sum()` and `scale.exp()` are folded into small float constants (`sum_1`, `exp`) that equal no weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.randn(16))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.scale.sum() + self.scale.exp()


def test_a_constant_computed_from_the_weights_is_not_stored(tmp_path):
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    models = [Baked().eval() for _ in range(3)]
    graphs = [export(m, tmp_path / str(i) / "m.onnx", x) for i, m in enumerate(models[:2])]
    cache = ExportCache(tmp_path / "cache")
    key = cache_key(model=models[0], config={}, example=x, opset=20, max_batch=1024)
    first = cache.store(key, graphs[0], models[0].state_dict())
    assert not first.stored and "bound to no initializer: scale" in first.reason
    second = cache.store(key, graphs[1], models[1].state_dict())
    assert not second.stored and "computed from the weights" in second.reason, second.reason
    assert "exp" in second.reason and "sum_1" in second.reason
    found = cache.bind(key, models[2].state_dict(), tmp_path / "m.onnx")
    assert not found.hit and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("when", ["first", "second", "after a proven entry"])
def test_a_hand_edited_initializer_is_never_bound(vits, tmp_path, when):
    edited = tmp_path / "edited" / "m.onnx"
    shutil.copytree(vits.graphs["a"].parent, edited.parent)
    proto = onnx.load(str(edited), load_external_data=False)
    target = next(i for i in proto.graph.initializer if i.name.startswith("val_") and len(i.dims) == 2)
    offset = int(next(e.value for e in target.external_data if e.key == "offset"))
    data = bytearray(Path(f"{edited}.data").read_bytes())
    data[offset : offset + 4] = struct.pack("<f", 12345.0)  # now it matches no transform of any weight
    Path(f"{edited}.data").write_bytes(bytes(data))

    cache = ExportCache(tmp_path / "cache")
    order = {
        "first": [(edited, "a"), (vits.graphs["a2"], "a2")],
        "second": [(vits.graphs["a2"], "a2"), (edited, "a")],
        "after a proven entry": [(vits.graphs["a2"], "a2"), (vits.graphs["b"], "b"), (edited, "a")],
    }[when]
    for graph, name in order:
        outcome = cache.store(vits.key, graph, vits.models[name].state_dict())
    # the entry would have bound a's weights to another graph than this one: whichever is wrong, it starts again
    assert not outcome.stored and f"initializer {target.name} is" in outcome.reason, outcome.reason
    assert "a constant" in outcome.reason and "starts again" in outcome.reason
    assert not cache.bind(vits.key, vits.models["b"].state_dict(), tmp_path / "m.onnx").hit


# ---- (4) the key ---------------------------------------------------------------------------------------------
def test_the_key_changes_with_everything_that_shapes_the_graph(vits, monkeypatch):
    a = vits.models["a"]
    base = key_of(a)
    assert base == key_of(vits.models["b"]) == key_of(a, example=X[:2])  # weights and batch size do not count

    class Renamed(VisionTransformer):
        pass

    renamed = Renamed(CFG).eval()
    changed = {
        "config": key_of(a, config=dataclasses.replace(CFG, num_classes=7).to_dict()),
        "opset": key_of(a, opset=19),
        "input shape": key_of(a, example=torch.randn(4, 3, 32, 32)),
        "input dtype": key_of(a, example=X.double()),
        "input names": key_of(a, input_names=["pixels"]),
        "output names": key_of(a, output_names=["logits"]),
        "batch range": key_of(a, max_batch=512),
        "model class": key_of(renamed),
        "training mode": key_of(random_vit(0).train()),
        "state dtype": key_of(random_vit(0).double()),
    }
    real = export_cache.versions()
    for name in ("torch", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "mmsurgery", "python"):
        monkeypatch.setattr(export_cache, "versions", lambda name=name: real | {name: "0.0.0"})
        changed[f"{name} version"] = key_of(a)
    monkeypatch.undo()
    assert key_of(a) == base
    assert len({base, *changed.values()}) == len(changed) + 1, changed


def test_an_edited_model_source_changes_the_key(tmp_path, monkeypatch):
    (tmp_path / "edited_arch.py").write_text("import torch\nclass M(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import edited_arch

    def key() -> str:
        return cache_key(model=edited_arch.M(4, 4), config={}, example=torch.randn(2, 4), opset=20, max_batch=8)

    try:
        before = key()
        (tmp_path / "edited_arch.py").write_text("import torch\nclass M(torch.nn.Linear):\n    pass  # edited\n")
        assert key() != before
    finally:
        sys.modules.pop("edited_arch", None)


# ---- (5) concurrent stores --------------------------------------------------------------------------------------
def _race(cache: ExportCache, key: str, jobs: list[tuple[Path, dict]]) -> list[Outcome]:
    barrier = threading.Barrier(len(jobs))
    results: list[Outcome] = [Outcome(reason="never ran")] * len(jobs)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = cache.store(key, *jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_stores_leave_one_valid_entry(vits, tmp_path, round_):
    states = {n: m.state_dict() for n, m in vits.models.items()}
    cache = ExportCache(tmp_path / "cache")
    _race(cache, vits.key, [(vits.graphs[n], states[n]) for n in ("a", "a2")])
    found = cache.bind(vits.key, states["b"], tmp_path / "x" / "m.onnx")  # a whole entry: one witness or both
    assert found.hit or "seen one export" in found.reason, found.reason

    results = _race(cache, vits.key, [(vits.graphs[n], states[n]) for n in ("a2", "b", "a")])
    assert any(r.stored for r in results), results
    assert [p.name for p in cache.root.iterdir()] == [f"{vits.key}.entry"]  # no temp file left behind
    dest = tmp_path / "bound" / "m.onnx"
    bound = next(n for n in ("a", "a2", "b") if cache.bind(vits.key, states[n], dest).hit)
    assert files(dest) == files(vits.graphs[bound])
