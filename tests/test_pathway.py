from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from pathway_fixtures import batch, make_paired_state, state_equal, tiny_vit, train_steps
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from mmsurgery.checkpoint import Checkpoint
from mmsurgery.errors import AttachError, BadInputError, FoldError
from mmsurgery.paired_format import open_paired
from mmsurgery.pathway import (
    attach,
    fold,
    is_attached,
    param_groups,
    pathway_modules,
    scales,
    split_paired,
)


def _attached(seed: int = 0, aux_trainable: bool = True, **overrides) -> tuple[nn.Module, nn.Module, dict]:
    """(plain model, identical model with the pathway attached, paired state)."""
    plain = tiny_vit(seed, **overrides)
    paired = make_paired_state(plain)
    return plain, attach(copy.deepcopy(plain), paired, aux_trainable=aux_trainable), paired


def _set_scales(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for pw in pathway_modules(model).values():
            pw.cross_modal_scale.fill_(value)


def test_lambda_zero_equals_plain_model() -> None:
    plain, model, _ = _attached()
    x, _ = batch()
    # Exact: W + 0·W_aux == W bit for bit, so the forward is the plain one.
    assert torch.equal(model(x), plain(x))
    _set_scales(model, 1.0)
    assert not torch.equal(model(x), plain(x))  # the pathway is live, so the check above is not vacuous


def test_train_then_fold_is_exact() -> None:
    plain, model, paired = _attached()
    x, y = batch()
    train_steps(model, x, y, steps=3)
    assert all(v != 0.0 for v in scales(model).values()) and len(scales(model)) == 8
    aux0 = paired["blocks.1.mlp.fc2.aux_weight"]
    assert not torch.equal(model.state_dict()["blocks.1.mlp.fc2.aux_weight"], aux0)  # W_aux trained too
    with torch.no_grad():
        unfolded = model(x)
        assert not torch.equal(unfolded, plain(x))
        fold(model)
        # Exact (torch.equal): fold_weight computes the same float32 expression as the forward, so the
        # folded weights are bit-identical and so is the matmul that uses them.
        assert torch.equal(model(x), unfolded)
    assert not is_attached(model)


def test_folded_model_is_plain() -> None:
    plain, model, _ = _attached()
    _set_scales(model, 0.3)
    fold(model)
    plain_sd, folded_sd = plain.state_dict(), model.state_dict()
    assert list(folded_sd) == list(plain_sd)
    assert all(folded_sd[k].shape == v.shape for k, v in plain_sd.items())
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    assert not parametrize.is_parametrized(model.blocks[0].attn.qkv)
    assert not model.blocks[0].attn.qkv._state_dict_hooks
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert fold(model) is model and state_equal(model.state_dict(), folded_sd)  # idempotent
    assert fold(plain) is plain and state_equal(plain.state_dict(), plain_sd)  # no pathway: no-op


def test_frozen_aux_stays_bit_identical() -> None:
    _plain, model, paired = _attached(aux_trainable=False)
    x, y = batch()
    train_steps(model, x, y, steps=3)
    sd = model.state_dict()
    for name in model.block_linear_names():
        assert torch.equal(sd[f"{name}.aux_weight"], paired[f"{name}.aux_weight"])
        assert not torch.equal(sd[f"{name}.weight"], paired[f"{name}.weight"])
    assert all(v != 0.0 for v in scales(model).values())


def test_linears_without_bias() -> None:
    plain, model, _ = _attached(qkv_bias=False)
    x, y = batch()
    assert "blocks.0.attn.qkv.bias" not in model.state_dict()
    train_steps(model, x, y, steps=2)
    with torch.no_grad():
        unfolded = model(x)
        assert not torch.equal(unfolded, plain(x))
        fold(model)
        assert torch.equal(model(x), unfolded)  # exact, as in test_train_then_fold_is_exact
    assert list(model.state_dict()) == list(plain.state_dict())


def _wrong_shape(paired: dict) -> dict:
    return {**paired, "blocks.1.mlp.fc1.aux_weight": torch.zeros(3, 3)}


def _missing_module(paired: dict) -> dict:
    return {**paired, "blocks.7.attn.qkv.aux_weight": torch.zeros(96, 32),
            "blocks.7.attn.qkv.cross_modal_scale": torch.zeros(1)}  # fmt: skip


def _lonely_scale(paired: dict) -> dict:
    return {**paired, "norm.cross_modal_scale": torch.zeros(1)}


def _non_finite(paired: dict) -> dict:
    aux = paired["blocks.0.attn.proj.aux_weight"].clone()
    aux[0, 0] = float("nan")
    return {**paired, "blocks.0.attn.proj.aux_weight": aux}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_wrong_shape, r"blocks\.1\.mlp\.fc1.*shape"),
        (_missing_module, r"blocks\.7\.attn\.qkv.*no such module"),
        (_lonely_scale, r"'norm'.*no aux_weight"),
        (_non_finite, r"blocks\.0\.attn\.proj.*non-finite"),
        (lambda p: {k: v for k, v in p.items() if "aux" not in k and "scale" not in k}, "no pathway keys"),
    ],
)
def test_failed_attach_leaves_model_untouched(damage: Callable[[dict], dict], message: str) -> None:
    plain = tiny_vit()
    model = copy.deepcopy(plain)
    with pytest.raises(AttachError, match=message):
        attach(model, damage(make_paired_state(plain)))
    assert state_equal(model.state_dict(), plain.state_dict())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_attach_twice_and_unknown_layer_refused() -> None:
    _plain, model, paired = _attached()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AttachError, match="already has a pathway"):
        attach(model, paired)
    with pytest.raises(AttachError, match="asked for in layers"):
        attach(tiny_vit(), paired, layers=["blocks.0.attn.qkv", "head"])
    assert state_equal(model.state_dict(), before)


def test_layers_subset_init_scale_and_dtype() -> None:
    plain = tiny_vit().double()
    paired = make_paired_state(plain)
    paired = {k: v.float() if "aux" in k else v for k, v in paired.items()}
    model = attach(plain, paired, layers=["blocks.1.mlp.fc2"], init_scale=0.25)
    assert scales(model) == {"blocks.1.mlp.fc2": 0.25}
    aux = pathway_modules(model)["blocks.1.mlp.fc2"].aux_weight
    assert aux.dtype == torch.float64
    paired["blocks.1.mlp.fc2.aux_weight"].add_(1.0)  # the model holds a copy, not a view
    assert not torch.equal(aux.float(), paired["blocks.1.mlp.fc2.aux_weight"])


def test_state_dict_round_trip_both_ways(tmp_path) -> None:
    _plain, model, paired = _attached()
    x, y = batch()
    keys = list(model.state_dict())
    assert set(keys) == set(paired)  # public names only
    qkv = [k.rsplit(".", 1)[-1] for k in keys if k.startswith("blocks.0.attn.qkv.")]
    assert qkv == ["weight", "bias", "aux_weight", "cross_modal_scale"]
    train_steps(model, x, y, steps=2)
    trained = model.state_dict()
    path = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in trained.items()}, str(path))
    # Into a freshly attached model, from the flat file: strict, and the outputs match exactly.
    fresh = attach(tiny_vit(seed=9), paired)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert state_equal(fresh.state_dict(), trained)
    # The other way: a λ saved as a 0-d scalar (some tools drop the [1]) still loads.
    scalars = {k: v.reshape(()) if k.endswith("cross_modal_scale") else v for k, v in trained.items()}
    fresh.load_state_dict(scalars, strict=True)
    # Missing pathway keys are reported under their public names.
    plain_only, _ = split_paired(trained)
    with pytest.raises(RuntimeError, match=r'"blocks\.0\.attn\.qkv\.aux_weight"'):
        fresh.load_state_dict(plain_only, strict=True)


def test_attach_from_file(tmp_path) -> None:
    plain = tiny_vit()
    path = tmp_path / "paired.safetensors"
    save_file(make_paired_state(plain), str(path))
    assert len(pathway_modules(attach(copy.deepcopy(plain), path))) == 8
    with pytest.raises(BadInputError, match="no such file"):
        attach(plain, tmp_path / "missing.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in make_paired_state(plain).items()}}, tmp_path / "ddp.pt")
    assert len(pathway_modules(attach(copy.deepcopy(plain), tmp_path / "ddp.pt"))) == 8  # as training saves it


def test_attach_from_a_paired_checkpoint_equals_attach_from_the_state_dict(tmp_path) -> None:
    plain = tiny_vit()
    state = make_paired_state(plain)
    path = tmp_path / "paired.safetensors"
    save_file(state, str(path))
    from_dict = attach(copy.deepcopy(plain), state, init_scale=0.5)
    with open_paired(path) as paired:
        from_file = attach(copy.deepcopy(plain), paired, init_scale=0.5)
    assert state_equal(from_file.state_dict(), from_dict.state_dict())  # bit for bit, same key order
    x, _ = batch()
    with torch.no_grad():
        out = from_file(x)
        assert torch.equal(out, from_dict(x))
        assert not torch.equal(out, plain(x))  # λ = 0.5: the pathway is live, so the equality above is not vacuous


def test_attach_from_a_path_reads_each_aux_once_and_never_the_whole_file(tmp_path, monkeypatch) -> None:
    plain = tiny_vit()
    state = make_paired_state(plain)
    path = tmp_path / "paired.safetensors"
    save_file(state, str(path))
    expected = attach(copy.deepcopy(plain), state).state_dict()

    def whole(self: Checkpoint) -> None:
        raise AssertionError("attach loaded the whole paired file")

    reads: list[str] = []
    real_get, real_read_into = Checkpoint.get, Checkpoint.read_into
    monkeypatch.setattr(Checkpoint, "to_state_dict", whole)
    monkeypatch.setattr(Checkpoint, "items", whole)
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: reads.append(name) or real_get(self, name))
    buffers: dict[str, int] = {}

    def read_into(self: Checkpoint, name: str, buf: torch.Tensor) -> torch.Tensor:
        reads.append(name)
        buffers[name] = buf.data_ptr()
        return real_read_into(self, name, buf)

    monkeypatch.setattr(Checkpoint, "read_into", read_into)
    model = attach(copy.deepcopy(plain), path)
    assert sorted(reads) == sorted(k for k in state if k.endswith(".aux_weight"))  # each W_aux once; no W
    assert state_equal(model.state_dict(), expected)
    # read straight into the buffer that becomes the parameter: one copy of W_aux in memory, not two
    params = model.state_dict(keep_vars=True)
    assert all(params[k].data_ptr() == ptr for k, ptr in buffers.items())


def test_failed_attach_from_a_file_leaves_model_untouched(tmp_path) -> None:
    plain = tiny_vit()
    model = copy.deepcopy(plain)

    def _foreign_module(paired: dict) -> dict:  # a consistent pathway of a module the model lacks
        return {**_missing_module(paired), "blocks.7.attn.qkv.weight": torch.zeros(96, 32)}

    for damage, message in [
        (_non_finite, r"'blocks\.0\.attn\.proj': aux_weight has non-finite values"),
        (_foreign_module, r"'blocks\.7\.attn\.qkv': no such module"),
        (_lonely_scale, r"not a consistent paired checkpoint: norm: no aux_weight"),  # open_paired's checks
        (_missing_module, r"not a consistent paired checkpoint: blocks\.7\.attn\.qkv: no weight"),
        (_wrong_shape, r"not a consistent paired checkpoint: blocks\.1\.mlp\.fc1: aux_weight \[3, 3\] != weight"),
    ]:
        path = tmp_path / f"{damage.__name__}.safetensors"
        save_file(damage(make_paired_state(plain)), str(path))
        with pytest.raises(AttachError, match=message):
            attach(model, path)
        assert state_equal(model.state_dict(), plain.state_dict())
        assert not any(parametrize.is_parametrized(m) for m in model.modules())


class _DirectWeightAttention(nn.Module):
    """Like VideoMAE: reads `self.qkv.weight` itself instead of calling the module."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv.weight, self.qkv.bias)


def test_weight_attribute_is_the_effective_weight() -> None:
    torch.manual_seed(0)
    model = _DirectWeightAttention()
    x = torch.randn(4, 8)
    plain_out = model(x)
    w, b = model.qkv.weight.detach().clone(), model.qkv.bias.detach().clone()
    aux = torch.randn(24, 8)
    attach(model, {"qkv.aux_weight": aux, "qkv.cross_modal_scale": torch.zeros(1)}, init_scale=0.5)
    # Exact: the same expression evaluated on the same tensors.
    assert torch.equal(model.qkv.weight, w + torch.tensor([0.5]) * aux)
    assert torch.equal(model(x), F.linear(x, w + torch.tensor([0.5]) * aux, b))
    assert not torch.equal(model(x), plain_out)


class _Conv1DLike(nn.Module):
    """HF GPT-2 style: weight stored [in, out], forward `x @ W + b`, no `nn.Linear`."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


def _hf_conv1d(nx: int, nf: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(nf, nx)


@pytest.mark.parametrize("factory", [_Conv1DLike, _hf_conv1d], ids=["conv1d-like", "hf-conv1d"])
def test_conv1d_orientation(factory: Callable[[int, int], nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(factory(8, 12), nn.GELU(), factory(12, 8))
    x = torch.randn(5, 8)
    plain_out = model(x)
    paired = {f"{i}.{k}": v for i in (0, 2) for k, v in
              (("aux_weight", torch.randn_like(model[i].weight)), ("cross_modal_scale", torch.zeros(1)))}  # fmt: skip
    attach(model, paired)
    assert torch.equal(model(x), plain_out)  # exact at λ = 0
    train_steps(model, x, torch.randint(0, 8, (5,)), steps=2)
    with torch.no_grad():
        unfolded = model(x)
        assert not torch.equal(unfolded, plain_out)
        fold(model)
        assert torch.equal(model(x), unfolded)  # exact: same float32 weight expression


def test_param_groups() -> None:
    _plain, model, _ = _attached()
    groups = param_groups(model, 0.05, lr=1e-3, scale_lr_mult=10.0)
    by_name = {g["name"]: g for g in groups}
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable) and len(ids) == len(set(ids))
    scale_group = by_name["cross_modal_scale"]
    lambda_ids = {id(pw.cross_modal_scale) for pw in pathway_modules(model).values()}
    assert {id(p) for p in scale_group["params"]} == lambda_ids
    assert scale_group["weight_decay"] == 0.0 and scale_group["lr"] == pytest.approx(1e-2)
    assert scale_group["lr_mult"] == 10.0
    aux_ids = {id(pw.aux_weight) for pw in pathway_modules(model).values()}
    assert aux_ids <= {id(p) for p in by_name["decay"]["params"]}
    assert by_name["decay"]["weight_decay"] == 0.05
    assert id(model.pos_embed) in {id(p) for p in by_name["no_decay"]["params"]}
    frozen = attach(tiny_vit(), make_paired_state(tiny_vit()), aux_trainable=False)
    frozen_ids = {id(p) for g in param_groups(frozen, 0.05) for p in g["params"]}
    assert not frozen_ids & {id(pw.aux_weight) for pw in pathway_modules(frozen).values()}
    assert "lr" not in param_groups(frozen, 0.05)[0]


def test_non_finite_lambda_fold_leaves_model_attached() -> None:
    _plain, model, _ = _attached()
    _set_scales(model, 0.1)
    with torch.no_grad():
        pathway_modules(model)["blocks.1.mlp.fc2"].cross_modal_scale.fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FoldError, match=r"blocks\.1\.mlp\.fc2"):
        fold(model)
    assert is_attached(model) and len(pathway_modules(model)) == 8
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) or "fc2.cross" in k for k, v in model.state_dict().items())


def test_deepcopy_keeps_the_pathway_independent() -> None:
    _plain, model, paired = _attached()
    clone = fold(copy.deepcopy(model))
    assert is_attached(model) and set(model.state_dict()) == set(paired)
    assert not is_attached(clone)


def test_autocast_bfloat16_backward_reaches_every_lambda() -> None:
    _plain, model, _ = _attached()
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [pw.cross_modal_scale.grad for pw in pathway_modules(model).values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().item() > 0 for g in grads)


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    _plain, model, _ = _attached()
    _set_scales(model, 0.2)
    x, y = batch()
    compiled = torch.compile(model)
    eager_out = model(x)
    compiled_out = compiled(x)
    # 1e-5: inductor may fuse W + λ·W_aux (e.g. into an FMA) and reorder reductions; float32 rounding only.
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=0)
    F.cross_entropy(compiled_out, y).backward()
    assert all(pw.cross_modal_scale.grad.abs().item() > 0 for pw in pathway_modules(model).values())


def test_hf_vit_split_qkv() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    plain = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    # Module names changed across transformers versions (4.x `encoder.layer.{i}.attention.attention.query`,
    # 5.x `layers.{i}.attention.q_proj`); every nn.Linear of a pooler-less ViTModel is a block linear.
    linears = [name for name, m in plain.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12 and any(("query" in n or "q_proj" in n) for n in linears)
    model = attach(copy.deepcopy(plain), make_paired_state(plain, linears=linears))
    x, _ = batch()
    with torch.no_grad():
        plain_out = plain(pixel_values=x).last_hidden_state
        assert torch.equal(model(pixel_values=x).last_hidden_state, plain_out)  # exact at λ = 0
    opt = torch.optim.AdamW(param_groups(model, 0.05, lr=1e-2))
    for _ in range(2):
        opt.zero_grad()
        model(pixel_values=x).last_hidden_state[:, 0].square().mean().backward()
        opt.step()
    assert len(scales(model)) == 12 and all(v != 0.0 for v in scales(model).values())
    with torch.no_grad():
        unfolded = model(pixel_values=x).last_hidden_state
        assert not torch.equal(unfolded, plain_out)
        fold(model)
        assert torch.equal(model(pixel_values=x).last_hidden_state, unfolded)  # exact: same weights
    assert list(model.state_dict()) == list(plain.state_dict())


def test_distributed_checkpoint_get_model_state_dict_on_an_attached_model() -> None:
    """torch's DCP state-dict API resolves every key with getattr: `P.aux_weight` / `P.cross_modal_scale` must be
    attributes of the attached module (issue 12; it raised AttributeError). Full and sharded-style options give
    exactly `model.state_dict()` and load it back into another attached model; nothing is registered twice;
    folding removes the names with the pathway."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from mmsurgery import pathway

    model = tiny_vit()
    paired = make_paired_state(model)
    pathway.attach(model, paired)
    model.load_state_dict({**paired, **{k: v + 0.1 for k, v in paired.items() if k.endswith("cross_modal_scale")}})
    n_params = len(list(model.parameters()))
    ref = model.state_dict()
    for full in (True, False):
        got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=full))
        assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    qkv = model.blocks[0].attn.qkv
    assert qkv.aux_weight is pathway.pathway_modules(model)["blocks.0.attn.qkv"].aux_weight
    assert float(qkv.cross_modal_scale.detach()) == pytest.approx(0.1)
    assert len(list(model.parameters())) == n_params  # aliases, not new parameters
    # and back: set_model_state_dict into another attached model of other values
    for full in (True, False):
        other = tiny_vit(seed=7)
        pathway.attach(other, make_paired_state(other, seed=8))
        set_model_state_dict(other, dict(ref), options=StateDictOptions(full_state_dict=full))
        assert state_equal(other.state_dict(), ref)
    pathway.fold(model)
    assert not hasattr(model.blocks[0].attn.qkv, "aux_weight")
