"""The fold certificate: `verify PLAIN --certificate CERT` proves PLAIN where PAIRED is not (issue 24).

The console script in a subprocess writes the certificates (`fold --certificate`, `verify --against
--certificate`) and gates with them; the tampering matrix of the weights stage (tests/test_verify_weights.py) runs
again with a certificate in PAIRED's place, through the CLI entry point in process for speed. Every tamper must
exit 1 naming the tensor; the correct fold passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_verify_weights import CFG, MATRIX, _metadata, _trained

from mmsurgery.certificate import SCHEMA, read_certificate
from mmsurgery.checkpoint.writer import SafetensorsWriter, write_safetensors
from mmsurgery.errors import BadInputError
from mmsurgery.fold import fold_file
from mmsurgery.models.vit import VisionTransformer
from mmsurgery.pairing import pair

SCRIPT = Path(sys.executable).with_name("mmsurgery")


def mmsurgery(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


def refused(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one `error:` line naming each of `needles`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def c(tmp_path_factory) -> SimpleNamespace:
    """A trained paired tiny ViT, its fold and fold certificate (console script), a certificate written by a
    passing `verify --against --onnx`, and another trained paired file with its own fold and certificate."""
    d = tmp_path_factory.mktemp("certificate")
    for seed, name in ((0, "target"), (1, "aux")):
        torch.manual_seed(seed)
        save_file(VisionTransformer(CFG).state_dict(), d / f"{name}.safetensors")
    paired = pair(d / "target.safetensors", d / "aux.safetensors", d / "p.safetensors", heads=2).output
    trained = _trained(paired, d / "trained.safetensors", seed=2)
    r = mmsurgery("fold", trained, "-o", d / "plain.safetensors", "--certificate", d / "fold.cert", "-q")
    assert r.returncode == 0, r.stderr
    assert f"certificate {d / 'fold.cert'}" in r.stdout
    r = mmsurgery("verify", d / "plain.safetensors", "--against", trained, "--onnx", "--certificate", d / "v.cert")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "v.cert: written" in r.stdout
    other = _trained(paired, d / "other.safetensors", seed=3)
    fold_file(other, d / "plain-other.safetensors", certificate=d / "other.cert")
    return SimpleNamespace(
        dir=d,
        trained=trained,
        plain=d / "plain.safetensors",
        fold_cert=d / "fold.cert",
        cert=d / "v.cert",
        other=other,
        other_plain=d / "plain-other.safetensors",
        other_cert=d / "other.cert",
        pathway="blocks.1.mlp.fc1.weight",
        norm="blocks.0.norm1.weight",
        bias="blocks.1.attn.proj.bias",
    )


def _report(path: Path) -> dict:
    data = json.loads(path.read_text())
    return {s["name"]: s for s in data["stages"]} | {"_inputs": data["inputs"]}


# ---- what a certificate holds -------------------------------------------------------------------------------
def test_fold_certificate_names_paired_and_every_tensor(c) -> None:
    doc = json.loads(c.fold_cert.read_text())
    assert doc["schema"] == SCHEMA == "mmsurgery.certificate/1"
    cert = read_certificate(c.fold_cert)
    assert cert.paired_sha256 == _sha(c.trained) and cert.written_by == "fold" and cert.fold_dtype == "keep"
    assert cert.outputs is None and cert.cost is None and cert.versions["torch"] == torch.__version__
    plain = load_file(c.plain)
    assert [t.name for t in cert.tensors] == list(plain)
    for t in cert.tensors:  # an independent digest: the bytes a safetensors file stores for the tensor
        value = plain[t.name]
        assert t.shape == tuple(value.shape) and t.dtype == str(value.dtype).removeprefix("torch.")
        assert t.sha256 == hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()


def test_verify_certificate_records_outputs_arch_and_cost(c) -> None:
    cert = read_certificate(c.cert)
    assert cert.written_by == "verify" and cert.paired_sha256 == _sha(c.trained)
    assert [t.sha256 for t in cert.tensors] == [t.sha256 for t in read_certificate(c.fold_cert).tensors]
    assert cert.arch is not None and cert.arch["name"] == "vit" and cert.arch["config"]["num_heads"] == 2
    assert cert.outputs is not None and cert.outputs.batch_sizes == (1, 4) and cert.outputs.seed == 0
    outs = cert.outputs.tensors()
    assert [tuple(t.shape) for t in outs[4]] == [(4, CFG.num_classes)]
    assert cert.outputs.pathway_effect_max_abs > 1e-3  # the recorded outputs are not the target's
    assert cert.cost is not None and cert.cost["params"] > 0 and cert.cost["graph"]["node_count"] > 0
    assert {"onnx", "onnxruntime"} <= set(cert.versions)
    assert c.cert.stat().st_size < 100_000


def test_a_damaged_write_cannot_certify_itself(c, tmp_path, monkeypatch) -> None:
    """The digests are of the tensors the fold computed, not of what reached the disk: a writer that flips one
    bit on its way out gives a PLAIN the certificate then refuses."""
    original = SafetensorsWriter.write

    def flipping(self, name, tensor):
        if name == c.pathway:
            tensor = tensor.clone()
            tensor.view(-1).view(torch.int32)[3] ^= 1
        return original(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", flipping)
    fold_file(c.trained, tmp_path / "damaged.safetensors", certificate=tmp_path / "c.cert")
    monkeypatch.undo()
    assert read_certificate(tmp_path / "c.cert").by_name[c.pathway] == read_certificate(c.fold_cert).by_name[c.pathway]
    r = mmsurgery(
        "verify", tmp_path / "damaged.safetensors", "--certificate", tmp_path / "c.cert", "--stages", "weights"
    )
    assert r.returncode == 1 and c.pathway in r.stdout, r.stdout


# ---- gating with it -----------------------------------------------------------------------------------------
def test_the_correct_fold_passes_with_either_certificate(c, tmp_path) -> None:
    for cert in (c.fold_cert, c.cert):
        r = mmsurgery("verify", c.plain, "--certificate", cert, "--json", tmp_path / "r.json")
        assert r.returncode == 0, r.stdout + r.stderr
        stages = _report(tmp_path / "r.json")
        w = stages["weights"]
        n = len(load_file(c.plain))
        assert w["status"] == "pass" and w["numbers"]["identical_tensors"] == n == w["numbers"]["expected_tensors"]
        assert stages["_inputs"]["certificate"]["mode"] == "used in PAIRED's place"
        assert stages["_inputs"]["against"] is None
    # the verify-written certificate also proves the outputs (fold) and the cost; the fold-written one has none
    assert stages["fold"]["status"] == "pass" and stages["fold"]["numbers"]["max_abs"] == 0.0
    assert "as certified" in stages["cost"]["message"]


def test_the_recorded_outputs_tell_another_model_apart(c, tmp_path) -> None:
    """The fold stage without PAIRED compares with outputs the certificate recorded, not with PLAIN's own: the fold
    of another trained paired file (every folded weight different) fails it, and so does ONNX Runtime."""
    r = mmsurgery(
        "verify",
        c.other_plain,
        "--certificate",
        c.cert,
        "--onnx",
        "--stages",
        "fold,onnx",
        "--json",
        tmp_path / "r.json",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    stages = _report(tmp_path / "r.json")
    assert stages["fold"]["status"] == "fail" and stages["fold"]["numbers"]["max_abs"] > 1e-3
    assert stages["onnx"]["status"] == "fail"


@pytest.mark.parametrize("case", list(MATRIX))
def test_every_tamper_fails_against_the_certificate_naming_the_tensor(c, cli, tmp_path, case) -> None:
    make, named = MATRIX[case]
    sd = load_file(c.plain)
    tampered = make(c)(sd, c)
    path = tmp_path / "tampered.safetensors"
    save_file(tampered, path, metadata=_metadata(c.plain))
    r = cli("verify", path, "--certificate", c.cert, "--json", tmp_path / "r.json", "--stages", "weights")
    assert r.code == 1, r.out + r.err
    assert "FAILED (weights" in r.out
    w = _report(tmp_path / "r.json")["weights"]
    name = named[1:] if named.startswith("=") else getattr(c, named)
    assert w["status"] == "fail" and name in w["message"], w["message"]
    if case.startswith(("pathway", "norm", "bias")):
        assert [d["name"] for d in w["numbers"]["differing"]] == [name]


def test_onnx_with_a_certificate_passes_and_one_ulp_fails(c, tmp_path) -> None:
    r = mmsurgery("verify", c.plain, "--certificate", c.cert, "--onnx", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    onnx = _report(tmp_path / "r.json")["onnx"]
    assert (
        onnx["status"] == "pass" and onnx["numbers"]["compared"] == "ONNX Runtime vs the certificate's unfolded outputs"
    )
    sd = load_file(c.plain)
    flat = sd[c.norm].view(-1)
    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    save_file(sd, tmp_path / "ulp.safetensors", metadata=_metadata(c.plain))
    r = mmsurgery("verify", tmp_path / "ulp.safetensors", "--certificate", c.cert, "--onnx", "--stages", "weights,onnx")
    assert r.returncode == 1 and "FAILED (weights" in r.stdout and c.norm in r.stdout, r.stdout


def test_a_certificate_of_another_paired_file_fails(c, tmp_path) -> None:
    r = mmsurgery("verify", c.plain, "--certificate", c.other_cert, "--json", tmp_path / "r.json")
    assert r.returncode == 1, r.stdout + r.stderr
    w = _report(tmp_path / "r.json")["weights"]
    assert w["status"] == "fail" and w["numbers"]["differing_tensors"] >= 8  # every folded weight
    # and a PLAIN that records its source must name the certificate's PAIRED, even with identical tensors
    fold_file(c.trained, tmp_path / "sourced.safetensors", source_hash=True)
    doc = json.loads(c.other_cert.read_text())
    body = doc["body"]
    body["tensors"] = json.loads(c.fold_cert.read_text())["body"]["tensors"]  # the right tensors, the other PAIRED
    tampered = tmp_path / "spliced.cert"
    tampered.write_text(json.dumps({"schema": SCHEMA, "body": body, "digest": _body_digest(body)}))
    r = mmsurgery("verify", tmp_path / "sourced.safetensors", "--certificate", tampered, "--stages", "weights")
    assert r.returncode == 1 and "folded from another file" in r.stdout, r.stdout


def _body_digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def test_a_sharded_set_a_model_folder_and_a_dcp_folder_pass(c, tmp_path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    state = load_file(c.plain)
    write_safetensors(tmp_path / "sh", list(state.items()), metadata=_metadata(c.plain), shard_size="40KB")
    assert len(list((tmp_path / "sh").glob("*.safetensors"))) > 1
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(state, folder / "model.safetensors", metadata=_metadata(c.plain))
    (folder / "config.json").write_text('{"model_type": "vit"}')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(state), checkpoint_id=tmp_path / "dcp", no_dist=True)
    for plain in (tmp_path / "sh", folder, tmp_path / "dcp"):
        r = mmsurgery("verify", plain, "--certificate", c.fold_cert, "--stages", "weights")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{len(state)} tensors" in r.stdout


def test_cross_check_with_paired(c, tmp_path) -> None:
    r = mmsurgery("verify", c.plain, "--against", c.trained, "--certificate", c.cert, "--stages", "weights,keys")
    assert r.returncode == 0 and "cross-checked with PAIRED" in r.stdout, r.stdout + r.stderr
    r = mmsurgery("verify", c.plain, "--against", c.trained, "--certificate", c.other_cert, "--stages", "weights")
    assert r.returncode == 1 and "the certificate names another PAIRED" in r.stdout, r.stdout
    assert c.other_cert.exists()  # read, never rewritten


def test_a_failed_gate_writes_no_certificate(c, tmp_path) -> None:
    r = mmsurgery("verify", c.other_plain, "--against", c.trained, "--certificate", tmp_path / "new.cert")
    assert r.returncode == 1 and "not written: the gate failed" in r.stdout, r.stdout
    assert not (tmp_path / "new.cert").exists() and list(tmp_path.iterdir()) == []


# ---- a certificate that is not one -------------------------------------------------------------------------
def _damaged(c, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = c.cert.read_text()
    doc = json.loads(text)
    cases: dict[str, tuple[str | bytes, str]] = {
        "truncated": (text[: len(text) // 2], "not JSON"),
        "empty": ("", "not JSON"),
        "binary": (b"\x00\xff" * 100, "not JSON"),
        "edited": (text.replace('"fold_dtype": "keep"', '"fold_dtype": "float16"'), "digest does not match"),
        "foreign version": (json.dumps({**doc, "schema": "mmsurgery.certificate/2"}), "newer than this mmsurgery"),
        "other schema": (json.dumps({**doc, "schema": "mmsurgery.verify/1"}), "not a certificate"),
        "no body": (json.dumps({"schema": SCHEMA}), "no body or digest"),
        "a list": ("[1, 2]", "no schema"),
        "NaN": (text.replace('"seed": 0', '"seed": NaN'), "not JSON"),
    }
    body = doc["body"]
    body["tensors"][0]["sha256"] = "zz"
    cases["malformed, digest redone"] = (
        json.dumps({"schema": SCHEMA, "body": body, "digest": _body_digest(body)}),
        "malformed certificate",
    )
    out = {}
    for name, (content, needle) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-').replace(',', '')}.cert"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        out[name] = (path, needle)
    return out


def test_damaged_certificates_are_one_line_and_exit_2(c, tmp_path, cli) -> None:
    cases = _damaged(c, tmp_path)
    for name, (path, needle) in cases.items():
        r = cli("verify", c.plain, "--certificate", path)
        assert r.code == 2 and r.out == "", (name, r.out, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], (name, r.err)
    refused(mmsurgery("verify", c.plain, "--certificate", cases["edited"][0]), "damaged or edited")


def _one_line(r, *needles: str) -> None:
    """The CLI entry in process: exit 2, nothing on stdout, one stderr line naming each of `needles`."""
    lines = r.err.strip().splitlines()
    assert r.code == 2 and r.out == "" and len(lines) == 1, (r.code, r.out, r.err)
    assert all(n in lines[0] for n in needles), lines[0]


def test_a_fifo_a_folder_and_a_huge_file_are_refused(c, tmp_path, cli) -> None:
    fifo = tmp_path / "fifo.cert"
    os.mkfifo(fifo)
    refused(mmsurgery("verify", c.plain, "--certificate", fifo, timeout=30), "FIFO")  # a hang would time out
    (tmp_path / "folder.cert").mkdir()
    _one_line(cli("verify", c.plain, "--certificate", tmp_path / "folder.cert"), "folder.cert")
    huge = tmp_path / "huge.cert"
    with open(huge, "wb") as f:
        f.truncate(65 << 20)  # sparse: no disk used
    _one_line(cli("verify", c.plain, "--certificate", huge), "more than a certificate")


def test_options_the_certificate_cannot_answer_are_refused(c, tmp_path, cli) -> None:
    refused(mmsurgery("verify", c.plain, "--certificate", c.cert, "--batch-sizes", "2,3"), "--batch-sizes 1,4")
    _one_line(cli("verify", c.plain, "--certificate", tmp_path / "new.cert"), "no such certificate")
    _one_line(
        cli("verify", c.plain, "--against", c.trained, "--certificate", tmp_path / "n.cert", "--stages", "keys"),
        "needs the weights stage",
    )


def test_fold_never_overwrites_a_certificate_or_an_input(c, tmp_path) -> None:
    before = c.cert.read_bytes()
    r = mmsurgery("fold", c.trained, "-o", tmp_path / "x.safetensors", "--certificate", c.cert)
    refused(r, "exists")
    assert c.cert.read_bytes() == before and not (tmp_path / "x.safetensors").exists()
    r = mmsurgery("fold", c.trained, "-o", tmp_path / "y.safetensors", "--certificate", c.trained, "--force")
    refused(r, "overwrite an input")
    assert not (tmp_path / "y.safetensors").exists()


def test_read_certificate_refuses_in_one_line_from_python(tmp_path) -> None:
    with pytest.raises(BadInputError, match="no such certificate"):
        read_certificate(tmp_path / "absent.cert")


def test_safetensors_metadata_is_untouched_by_a_certificate(c, tmp_path) -> None:
    """`fold --certificate` writes the same PLAIN as a fold without one (the certificate lives beside it)."""
    fold_file(c.trained, tmp_path / "bare.safetensors")
    assert (tmp_path / "bare.safetensors").read_bytes() == c.plain.read_bytes()
    with safe_open(c.plain, "pt") as f:
        assert "mmsurgery.source_sha256" not in (f.metadata() or {})
