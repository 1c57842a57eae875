"""Everything mmsurgery knows about checkpoint families, as one validated table.

Adding a family is one `Family` entry here plus one fixture in tests/families.py. No other module matches
key names. Sources: ../shared/reference/checkpoint-families.md (cheat sheet, section 1.15).

A stack is found by its container name (`blocks`, `layer`, ...) followed by a block index. Inside a block, each
role regex is matched against the suffix after the index (`attn.qkv.weight`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mmsurgery.paired_format import PAIRABLE_ROLES  # the roles plans record: the contract names them

__all__ = [
    "DECODER_MARKER",
    "EMA_MARKER",
    "FAMILIES",
    "GATED_ROLE",
    "NORM_PLACEMENTS",
    "ORIENTATIONS",
    "PAIRABLE_ROLES",
    "ROLES",
    "Family",
    "containers",
    "family",
    "validate",
]

GATED_ROLE = "mlp_gated"
ROLES: tuple[str, ...] = (*PAIRABLE_ROLES, GATED_ROLE)
NORM_PLACEMENTS = ("pre", "post", "unknown")
ORIENTATIONS = ("linear", "conv1d")  # conv1d: GPT-2's Conv1D stores [in, out]

# A stack whose prefix has one of these name segments is a decoder / an EMA copy: listed, never picked by default.
DECODER_MARKER = re.compile(r"(?:^|[._])(?:decoder\w*|MAE_decoder)(?:[._]|$)", re.IGNORECASE)
EMA_MARKER = re.compile(r"(?:^|[._])(?:\w*ema|momentum\w*|transformer_k|teacher|student)(?:[._]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Family:
    name: str
    examples: str  # who uses this layout, for humans and reports
    containers: tuple[str, ...]  # the stack name's last segment, e.g. "blocks" in "MAE_encoder.blocks.blocks"
    roles: Mapping[str, str]  # role -> regex on the in-block suffix
    norm: str = "pre"
    orientation: str = "linear"
    patterns: Mapping[str, re.Pattern[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patterns", {r: re.compile(rf"^(?:{p})$") for r, p in self.roles.items()})

    def role_of(self, suffix: str) -> str | None:
        return next((role for role, pat in self.patterns.items() if pat.match(suffix)), None)


def _split_qkv(prefix: str, q: str, k: str, v: str) -> dict[str, str]:
    return {"q": rf"{prefix}\.{q}\.weight", "k": rf"{prefix}\.{k}\.weight", "v": rf"{prefix}\.{v}\.weight"}


FAMILIES: tuple[Family, ...] = (
    Family(
        "timm-vit",
        "timm ViT/DeiT, MAE (+decoder_blocks), DINOv2 (also chunked), BEiT, EVA, Point-MAE/BERT, AudioMAE, VideoMAE",
        ("blocks", "decoder_blocks"),
        {
            "qkv": r"attn\.qkv\.weight",
            **_split_qkv("attn", "q_proj", "k_proj", "v_proj"),
            "attn_out": r"attn\.proj\.weight",
            "mlp_in": r"mlp\.fc1\.weight",
            "mlp_out": r"mlp\.fc2\.weight",
            GATED_ROLE: r"mlp\.(?:fc1_g|fc1_x|w12|w1|w2|w3)\.weight",
        },
    ),
    Family(
        "openai-whisper",
        "OpenAI Whisper encoder/decoder (encoder.blocks.i)",
        ("blocks",),
        {
            **_split_qkv("attn", "query", "key", "value"),
            "attn_out": r"attn\.out\.weight",
            "mlp_in": r"mlp\.0\.weight",
            "mlp_out": r"mlp\.2\.weight",
        },
    ),
    Family(
        "hf-vit",
        "Hugging Face ViT, ViTMAE, AST, VideoMAE, DINOv2, BEiT (encoder.layer.i, any model prefix)",
        ("layer", "decoder_layers"),
        {
            **_split_qkv(r"attention\.attention", "query", "key", "value"),
            "attn_out": r"attention\.output\.dense\.weight",
            "mlp_in": r"intermediate\.dense\.weight|mlp\.fc1\.weight",
            "mlp_out": r"output\.dense\.weight|mlp\.fc2\.weight",
            GATED_ROLE: r"mlp\.(?:weights_in|weights_out)\.weight",
        },
    ),
    Family(
        "hf-vit-v5",
        "Hugging Face ViT and kin as transformers 5 names them (layers.i.attention.q_proj ... mlp.fc1)",
        ("layers",),
        {
            **_split_qkv("attention", "q_proj", "k_proj", "v_proj"),
            "attn_out": r"attention\.o_proj\.weight",
            "mlp_in": r"mlp\.fc1\.weight",
            "mlp_out": r"mlp\.fc2\.weight",
        },
    ),
    Family(
        "bert",
        "Hugging Face BERT, MiniLM, RoBERTa, sentence-transformers (post-norm)",
        ("layer",),
        {
            **_split_qkv(r"attention\.self", "query", "key", "value"),
            "attn_out": r"attention\.output\.dense\.weight",
            "mlp_in": r"intermediate\.dense\.weight",
            "mlp_out": r"output\.dense\.weight",
        },
        norm="post",
    ),
    Family(
        "hf-clip",
        "Hugging Face CLIP/SigLIP vision and text towers (encoder.layers.i)",
        ("layers",),
        {
            **_split_qkv("self_attn", "q_proj", "k_proj", "v_proj"),
            "attn_out": r"self_attn\.out_proj\.weight",
            "mlp_in": r"mlp\.fc1\.weight",
            "mlp_out": r"mlp\.fc2\.weight",
        },
    ),
    Family(
        "hf-whisper",
        "Hugging Face Whisper/BART-style encoder layers (fc1/fc2 on the layer)",
        ("layers",),
        {
            **_split_qkv("self_attn", "q_proj", "k_proj", "v_proj"),
            "attn_out": r"self_attn\.out_proj\.weight",
            "mlp_in": r"fc1\.weight",
            "mlp_out": r"fc2\.weight",
        },
    ),
    Family(
        "wav2vec2",
        "Hugging Face wav2vec2/HuBERT (post-norm in base models, pre-norm in 'stable layer norm' ones)",
        ("layers",),
        {
            **_split_qkv("attention", "q_proj", "k_proj", "v_proj"),
            "attn_out": r"attention\.out_proj\.weight",
            "mlp_in": r"feed_forward\.intermediate_dense\.weight",
            "mlp_out": r"feed_forward\.output_dense\.weight",
        },
        norm="unknown",
    ),
    Family(
        "openai-clip",
        "OpenAI CLIP / OpenCLIP (transformer.resblocks.i, nn.MultiheadAttention in_proj)",
        ("resblocks",),
        {
            "qkv": r"attn\.in_proj_weight",
            "attn_out": r"attn\.out_proj\.weight",
            "mlp_in": r"mlp\.c_fc\.weight",
            "mlp_out": r"mlp\.c_proj\.weight",
        },
    ),
    Family(
        "gpt2",
        "GPT-2 (h.i / transformer.h.i, Conv1D weights stored [in, out])",
        ("h",),
        {
            "qkv": r"attn\.c_attn\.weight",
            "attn_out": r"attn\.c_proj\.weight",
            "mlp_in": r"mlp\.c_fc\.weight",
            "mlp_out": r"mlp\.c_proj\.weight",
        },
        orientation="conv1d",
    ),
)


def validate(families: tuple[Family, ...] = FAMILIES) -> None:
    """Fail loudly, at import, on a malformed table entry."""
    names = [f.name for f in families]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate family names in {names}")
    for f in families:
        if not f.containers or not all(re.fullmatch(r"\w+", c) for c in f.containers):
            raise ValueError(f"{f.name}: containers must be plain identifiers")
        unknown = set(f.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"{f.name}: unknown roles {sorted(unknown)}")
        if not {"attn_out", "mlp_in", "mlp_out"} <= set(f.roles):
            raise ValueError(f"{f.name}: must name attn_out, mlp_in and mlp_out")
        if "qkv" not in f.roles and not {"q", "k", "v"} <= set(f.roles):
            raise ValueError(f"{f.name}: needs a fused qkv role or all of q, k, v")
        if f.norm not in NORM_PLACEMENTS or f.orientation not in ORIENTATIONS:
            raise ValueError(f"{f.name}: bad norm {f.norm!r} or orientation {f.orientation!r}")


def containers() -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for f in FAMILIES for c in f.containers))


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


validate()
