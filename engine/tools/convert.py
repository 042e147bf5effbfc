"""Model interchange: engine checkpoint <-> reference ``.pth.tar`` <-> HuggingFace IJepa <-> timm ViT.

Formats
-------
``reference``
    What facebookresearch/ijepa writes (and the released ``IN1K-vit.h.14-300e.pth.tar``
    files): a ``torch.save`` dict with ``encoder``, ``predictor``, ``target_encoder`` state
    dicts (DDP ``module.`` prefix; files without it load too), ``opt``, ``scaler``, ``epoch``,
    ``loss``, ``batch_size``, ``world_size``, ``lr``.
``engine``
    The same dict plus ``"engine": {"format", "config", "step", ...}``.
``hf``
    A directory with ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``) holding ``transformers.IJepaModel`` weights under the
    on-disk names transformers writes and the hub checkpoints use
    (``encoder.layer.{i}.attention.attention.query`` ...). transformers >= 5 renames them to
    ``layers.{i}.attention.q_proj`` ... when loading; both spellings are read here.
``timm``
    A ``.safetensors`` file (or a torch-saved flat state dict) with timm ``VisionTransformer``
    keys of the ``vit_*_gap_*`` I-JEPA models: the reference's encoder names without prefix.
    timm applies ``norm`` per token and then mean-pools (``fc_norm=False``); a file with
    ``fc_norm.*`` (an older timm revision's renaming of the same weights) is read as ``norm``.

HF and timm hold ONE encoder. Converting out of engine/reference picks it with ``encoder``
(``context`` = the checkpoint's ``encoder`` entry, what HF's and timm's own converters take
and so what the hub weights are; ``target`` = the EMA ``target_encoder`` the paper evaluates).
Converting in from HF/timm gives an encoder-only engine checkpoint (``encoder`` and
``target_encoder`` both set to those weights, no predictor or optimizer state,
``engine.encoder_only = True``): good for ``ijepa eval``, not for resuming training.

Every file is read with ``torch.load(weights_only=True)`` or safetensors: nothing in a
file is ever executed. Tensors are copied, never recomputed, so round trips are bitwise.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors, save_file

from engine.checkpoint import FORMAT_VERSION, Snapshot, load_file, read_latest, save_atomic
from engine.config import VIT_SIZES, IJEPAConfig
from engine.errors import ConfigError, UsageError
from engine.model import VisionTransformer, strip_module_prefix
from engine.strategy import LocalStrategy

FORMATS = ("engine", "reference", "hf", "timm")
REFERENCE_FIELDS = ("encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", "loss",
                    "batch_size", "world_size", "lr")
LAYER_NORM_EPS = 1e-6   # every reference factory model; the engine's ViT hard-codes it too
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

# width -> heads of the reference factory sizes: a reference file stores no head count and
# the head split leaves no trace in the weights' shapes.
_FACTORY_HEADS = {dim: heads for dim, _, heads, _ in VIT_SIZES.values()}


# ----------------------------------------------------------------------------- architecture
@dataclasses.dataclass
class Arch:
    """Everything needed to rebuild an encoder around a state dict."""
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_ratio(self) -> float:
        ratio = self.mlp_hidden / self.embed_dim
        # the ViT computes int(dim * ratio); nudge up if float rounding would lose a unit
        while int(self.embed_dim * ratio) < self.mlp_hidden:
            ratio = math.nextafter(ratio, math.inf)
        return ratio

    def build_encoder(self) -> VisionTransformer:
        return VisionTransformer(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                                 embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                                 mlp_ratio=self.mlp_ratio, qkv_bias=True, eps=LAYER_NORM_EPS)

    def describe(self) -> str:
        return (f"ViT width {self.embed_dim}, depth {self.depth}, {self.num_heads} heads, "
                f"{self.img_size} px, patch {self.patch_size}, {self.in_chans} channel(s)")

    def timm_name(self) -> str:
        size = next((n for n, (d, dep, _, _) in VIT_SIZES.items() if d == self.embed_dim and dep == self.depth), None)
        base = size or f"vit_w{self.embed_dim}_d{self.depth}"
        return f"{base}_patch{self.patch_size}_gap_{self.img_size}"


def infer_arch(sd: dict, num_heads: Optional[int] = None, what: str = "checkpoint") -> Arch:
    """Architecture from an encoder state dict in reference naming (no ``module.`` prefix). The head
    count is not visible in any shape: ``num_heads`` if given, else the reference factory size with
    this width, else an error asking for it."""
    missing = [k for k in ("patch_embed.proj.weight", "pos_embed", "norm.weight", "blocks.0.mlp.fc1.weight",
                           "blocks.0.attn.qkv.weight") if k not in sd]
    if missing:
        raise UsageError(f"{what}: not an I-JEPA ViT encoder state dict (missing {', '.join(missing)})")
    if "blocks.0.attn.qkv.bias" not in sd:
        raise UsageError(f"{what}: attention without qkv bias; the engine's ViT (like every reference "
                         f"factory model) has qkv_bias=True")
    dim, chans, p, p2 = sd["patch_embed.proj.weight"].shape
    if p != p2:
        raise UsageError(f"{what}: non-square patches {p}x{p2} are not supported")
    n = sd["pos_embed"].shape[-2]
    grid = math.isqrt(n)
    if grid * grid != n or sd["pos_embed"].shape[-1] != dim:
        raise UsageError(f"{what}: pos_embed {tuple(sd['pos_embed'].shape)} is not a square grid of "
                         f"width {dim} (a cls token or non-square input is not an I-JEPA encoder)")
    depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
    heads = num_heads or _FACTORY_HEADS.get(dim)
    if heads is None:
        raise UsageError(f"{what}: width {dim} is not a reference factory size, so the number of "
                         f"attention heads is unknown; pass --num-heads")
    if dim % heads:
        raise UsageError(f"{what}: width {dim} is not divisible by {heads} heads")
    return Arch(img_size=grid * p, patch_size=p, in_chans=chans, embed_dim=dim, depth=depth,
                num_heads=heads, mlp_hidden=sd["blocks.0.mlp.fc1.weight"].shape[0])


# ----------------------------------------------------------------------------- the in-memory form
@dataclasses.dataclass
class Checkpoint:
    """A checkpoint of any format, normalised: state dicts in reference naming, no prefix."""
    fmt: str
    arch: Arch
    encoder: dict                       # the context encoder (or the only encoder of hf/timm)
    target_encoder: Optional[dict] = None
    predictor: Optional[dict] = None
    fields: dict = dataclasses.field(default_factory=dict)   # opt, scaler, epoch, loss, ...
    engine: Optional[dict] = None
    extras: dict = dataclasses.field(default_factory=dict)  # other top-level keys of an engine file
    path: str = ""

    @property
    def encoder_only(self) -> bool:
        return self.predictor is None

    def encoder_state(self, which: str) -> dict:
        if which not in ("target", "context"):
            raise UsageError(f"--encoder {which!r}: choose target or context")
        return self.encoder if which == "context" or self.target_encoder is None else self.target_encoder


def read_checkpoint(path: str, fmt: str = "auto", num_heads: Optional[int] = None) -> Checkpoint:
    """Read any supported format (``fmt``: auto, engine, reference, hf, timm)."""
    if fmt not in ("auto",) + FORMATS:
        raise UsageError(f"--from {fmt!r}: choose auto, {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if fmt not in ("auto", "hf"):
            raise UsageError(f"{path}: a directory can only be a HuggingFace model (--from hf)")
        return _read_hf(path, num_heads)
    obj, meta = None, {}
    if _is_safetensors(path):
        try:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
                meta = f.metadata() or {}
        except Exception as e:
            raise UsageError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
        detected = "hf" if any(k.startswith(("embeddings.", "ijepa.embeddings.")) for k in keys) else "timm"
    else:
        obj = load_file(path, mmap=True)
        detected = _detect_torch_object(obj, path)
        if fmt == "reference" and detected == "engine":
            detected = "reference"      # an engine file is a reference file plus the engine block
    if fmt not in ("auto", detected):
        raise UsageError(f"{path}: holds {detected} weights, not {fmt}")
    if detected == "hf":
        return _read_hf(path, num_heads)
    if detected == "timm":
        return _timm_checkpoint(load_safetensors(path) if obj is None else obj, meta, num_heads, path)
    return _reference_checkpoint(obj, detected, num_heads, path)


def _is_safetensors(path: str) -> bool:
    """A safetensors file starts with the 8-byte little-endian length of a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path) - 8)


def _detect_torch_object(obj, path) -> str:
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not an I-JEPA checkpoint (holds a {type(obj).__name__}, expected a dict)")
    if isinstance(obj.get("encoder"), dict):
        return "engine" if isinstance(obj.get("engine"), dict) else "reference"
    keys = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k) for k in obj}
    if "patch_embed.proj.weight" in keys and "pos_embed" in keys:
        return "timm"       # a bare encoder state dict: timm's and the reference's names coincide
    raise UsageError(f"{path}: not an I-JEPA checkpoint (top-level keys: {', '.join(sorted(map(str, obj))[:6])}); "
                     f"expected encoder/predictor/target_encoder (reference or engine) or ViT encoder weights")


def _reference_checkpoint(obj: dict, fmt: str, num_heads, path) -> Checkpoint:
    enc, pred, tgt = (strip_module_prefix(obj[k]) if isinstance(obj.get(k), dict) else None
                      for k in REFERENCE_FIELDS[:3])
    engine = obj.get("engine") if fmt == "engine" else None
    if num_heads is None and engine is not None:
        try:
            num_heads = IJEPAConfig.from_dict(engine.get("config"), validate=False).arch["num_heads"]
        except (ConfigError, TypeError, KeyError):
            pass    # a config from another engine version: fall back to the factory sizes
    arch = infer_arch(enc, num_heads, what=path)
    extras = {k: v for k, v in obj.items() if k not in REFERENCE_FIELDS + ("engine",)} if engine else {}
    return Checkpoint(fmt=fmt, arch=arch, encoder=enc, target_encoder=tgt, predictor=pred, engine=engine, path=path,
                      fields={k: obj[k] for k in REFERENCE_FIELDS[3:] if k in obj}, extras=extras)


def _timm_checkpoint(sd: dict, meta: dict, num_heads, path) -> Checkpoint:
    sd = strip_module_prefix(sd)
    if "cls_token" in sd or "reg_token" in sd:
        raise UsageError(f"{path}: has a cls/register token; I-JEPA encoders have none (a timm "
                         f"vit_*_gap_* model is expected)")
    sd = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v
          for k, v in sd.items() if not k.startswith("head.")}
    if num_heads is None and meta.get("num_heads"):
        num_heads = int(meta["num_heads"])
    return Checkpoint(fmt="timm", arch=infer_arch(sd, num_heads, what=path), encoder=sd, path=path)


# ----------------------------------------------------------------------------- HF naming
# (reference name, HF name) outside the blocks
_HF_TOP = (("pos_embed", "embeddings.position_embeddings"),
           ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
           ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
           ("norm.weight", "layernorm.weight"), ("norm.bias", "layernorm.bias"))
# (reference block suffix, HF legacy on-disk suffix, transformers>=5 in-memory suffix)
_HF_BLOCK = (("norm1", "layernorm_before", "layernorm_before"),
             ("attn.proj", "attention.output.dense", "attention.o_proj"),
             ("norm2", "layernorm_after", "layernorm_after"),
             ("mlp.fc1", "intermediate.dense", "mlp.fc1"), ("mlp.fc2", "output.dense", "mlp.fc2"))
_HF_QKV = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))


def to_hf_state_dict(sd: dict, depth: int) -> dict:
    """Reference-named encoder -> ``IJepaModel`` on-disk names; qkv split into three D-row slices."""
    out = {theirs: sd[ours] for ours, theirs in _HF_TOP}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs, _ in _HF_BLOCK:
            for t in ("weight", "bias"):
                out[f"{dst}{theirs}.{t}"] = sd[f"{src}{ours}.{t}"]
        for t in ("weight", "bias"):
            for (name, _), part in zip(_HF_QKV, sd[f"{src}attn.qkv.{t}"].chunk(3, dim=0)):   # rows are [q; k; v]
                out[f"{dst}attention.attention.{name}.{t}"] = part
    return out


def from_hf_state_dict(hf: dict, what: str = "HF model") -> dict:
    """``IJepaModel`` weights (on-disk or transformers>=5 names, optional ``ijepa.`` prefix of the
    classification wrapper) -> reference-named encoder state dict."""
    hf = {k[len("ijepa."):] if k.startswith("ijepa.") else k: v for k, v in hf.items()
          if not k.startswith("classifier.")}
    try:
        out = {ours: hf[theirs] for ours, theirs in _HF_TOP}
    except KeyError as e:
        raise UsageError(f"{what}: not an IJepaModel state dict (missing {e.args[0]})") from None
    if "embeddings.cls_token" in hf:
        raise UsageError(f"{what}: has a cls token; not an I-JEPA encoder")
    legacy = any(k.startswith("encoder.layer.") for k in hf)
    layer_ids = {int(m.group(1)) for k in hf for m in [re.match(r"(?:encoder\.layer|layers)\.(\d+)\.", k)] if m}
    for i in sorted(layer_ids):
        src, dst = (f"encoder.layer.{i}." if legacy else f"layers.{i}."), f"blocks.{i}."
        try:
            for ours, disk, mem in _HF_BLOCK:
                for t in ("weight", "bias"):
                    out[f"{dst}{ours}.{t}"] = hf[f"{src}{disk if legacy else mem}.{t}"]
            for t in ("weight", "bias"):
                parts = [hf[f"{src}attention.attention.{d}.{t}" if legacy else f"{src}attention.{m}.{t}"]
                         for d, m in _HF_QKV]
                out[f"{dst}attn.qkv.{t}"] = torch.cat(parts, dim=0)
        except KeyError as e:
            raise UsageError(f"{what}: layer {i} incomplete (missing {e.args[0]})") from None
    return out


def _hf_config(arch: Arch, source_encoder: Optional[str]) -> dict:
    return {
        "architectures": ["IJepaModel"], "model_type": "ijepa", "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.depth, "num_attention_heads": arch.num_heads, "intermediate_size": arch.mlp_hidden,
        "hidden_act": "gelu",            # exact (erf) GELU, as nn.GELU() in the reference
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": LAYER_NORM_EPS, "image_size": arch.img_size, "patch_size": arch.patch_size,
        "num_channels": arch.in_chans, "qkv_bias": True,
        # not read by transformers; records which I-JEPA encoder these weights are
        "ijepa_engine_source_encoder": source_encoder,
    }


def _read_hf(path: str, num_heads) -> Checkpoint:
    cfg, cfg_path = {}, os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError:
                raise UsageError(f"{cfg_path}: not valid JSON") from None
    if cfg.get("model_type", "ijepa") != "ijepa":
        raise UsageError(f"{cfg_path}: model_type {cfg.get('model_type')!r}, expected 'ijepa'")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise UsageError(f"{cfg_path}: hidden_act {cfg['hidden_act']!r}; the I-JEPA ViT uses exact 'gelu'")
    if not math.isclose(float(cfg.get("layer_norm_eps", LAYER_NORM_EPS)), LAYER_NORM_EPS):
        raise UsageError(f"{cfg_path}: layer_norm_eps {cfg['layer_norm_eps']}; the I-JEPA ViT uses 1e-6")
    if cfg.get("qkv_bias", True) is not True:
        raise UsageError(f"{cfg_path}: qkv_bias false; the I-JEPA ViT has qkv biases")
    if not os.path.isdir(path):
        files = [path]
    elif os.path.isfile(os.path.join(path, HF_WEIGHTS)):
        files = [os.path.join(path, HF_WEIGHTS)]
    elif os.path.isfile(os.path.join(path, HF_INDEX)):
        with open(os.path.join(path, HF_INDEX)) as f:
            files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise UsageError(f"{path}: no {HF_WEIGHTS} or {HF_INDEX} (a HuggingFace model directory "
                         f"saved with safetensors is expected)")
    sd = from_hf_state_dict({k: v for file in files for k, v in load_safetensors(file).items()}, what=path)
    arch = infer_arch(sd, num_heads or cfg.get("num_attention_heads"), what=path)
    return Checkpoint(fmt="hf", arch=arch, encoder=sd, path=path)


# ----------------------------------------------------------------------------- writers
def _prefixed(sd: Optional[dict]) -> Optional[dict]:
    return None if sd is None else {"module." + k: v for k, v in sd.items()}


def _reference_dict(ck: Checkpoint) -> dict:
    if ck.encoder_only:
        raise UsageError(f"{ck.path}: holds only an encoder ({ck.fmt}); a reference checkpoint needs the "
                         f"predictor and optimizer state as well (convert --to hf/timm, or eval it directly)")
    return {"encoder": _prefixed(ck.encoder), "predictor": _prefixed(ck.predictor),
            "target_encoder": _prefixed(ck.target_encoder if ck.target_encoder is not None else ck.encoder),
            **{k: ck.fields.get(k) for k in REFERENCE_FIELDS[3:]}}


def engine_config_for(ck: Checkpoint) -> dict:
    """An engine config describing a checkpoint that came without one (shapes + reference fields)."""
    a = ck.arch
    name = next((n for n, (d, dep, _, _) in VIT_SIZES.items() if d == a.embed_dim and dep == a.depth),
                next((n for n, (d, *_) in VIT_SIZES.items() if d == a.embed_dim), "vit_base"))
    d = {"meta": {"model_name": name},
         "model": {"embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.num_heads, "mlp_ratio": a.mlp_ratio},
         "data": {"crop_size": a.img_size, "in_chans": a.in_chans}, "mask": {"patch_size": a.patch_size}}
    if ck.predictor is not None:
        depth = 1 + max(int(m.group(1)) for k in ck.predictor for m in [re.match(r"predictor_blocks\.(\d+)\.", k)] if m)
        d["meta"].update(pred_depth=depth, pred_emb_dim=int(ck.predictor["predictor_embed.weight"].shape[0]))
    if isinstance(ck.fields.get("batch_size"), int):
        d["data"]["batch_size"] = ck.fields["batch_size"]
    if isinstance(ck.fields.get("lr"), (int, float)):
        d["optimization"] = {"lr": float(ck.fields["lr"])}
    return IJEPAConfig.from_dict(d, validate=False).to_dict()


def _engine_dict(ck: Checkpoint) -> dict:
    out = ({"encoder": _prefixed(ck.encoder), "target_encoder": _prefixed(ck.encoder)} if ck.encoder_only
           else _reference_dict(ck))
    if ck.engine is not None:
        return {**out, **ck.extras, "engine": ck.engine}
    config = engine_config_for(ck)
    # A converted file starts a NEW engine run from these weights (and optimizer state): step, epoch
    # and data position are 0, the RNG is the seeded state (taken from a fresh generator, so the
    # global RNG is left alone); the reference's own ``epoch`` stays in the top-level field.
    rng = torch.Generator().manual_seed(config["train"]["seed"]).get_state()
    out["engine"] = {"format": FORMAT_VERSION, "config": config, "step": 0, "epoch": 0,
                     "batch_in_epoch": 0, "sampler": None, "rng_cpu": rng, "rng_cuda": [],
                     "converted_from": ck.fmt, "encoder_only": ck.encoder_only}
    return out


def write_engine(ck: Checkpoint, path: str):
    save_atomic(_engine_dict(ck), path)


def write_reference(ck: Checkpoint, path: str):
    save_atomic(_reference_dict(ck), path)


def _save_safetensors(sd: dict, path: str, metadata: dict):
    # safetensors stores each tensor on its own: slices (the qkv split) must own their memory
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, path, metadata=metadata)
    # mkstemp and safetensors create owner-only files; a checkpoint is shared like any output
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_hf(ck: Checkpoint, path: str, which: str = "context"):
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{path}: exists and is not a directory (--to hf writes a model directory)")
    os.makedirs(path, exist_ok=True)
    sd = to_hf_state_dict(ck.encoder_state(which), ck.arch.depth)
    _save_safetensors(sd, os.path.join(path, HF_WEIGHTS), {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(json.dumps(_hf_config(ck.arch, which if ck.target_encoder is not None else None),
                           indent=2, sort_keys=True) + "\n")


def write_timm(ck: Checkpoint, path: str, which: str = "context"):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": "pt", "num_heads": str(ck.arch.num_heads), "img_size": str(ck.arch.img_size),
            "timm_model": ck.arch.timm_name(), "timm_kwargs": json.dumps(timm_kwargs(ck.arch), sort_keys=True)}
    if ck.target_encoder is not None:
        meta["source_encoder"] = which
    _save_safetensors(ck.encoder_state(which), path, meta)


def timm_kwargs(arch: Arch) -> dict:
    """Arguments of ``timm.models.vision_transformer.VisionTransformer`` that compute exactly
    the engine encoder (per-token final norm, then mean pooling, no cls token)."""
    return dict(img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans, embed_dim=arch.embed_dim,
                depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=True,
                class_token=False, global_pool="avg", fc_norm=False, pre_norm=False, no_embed_class=False,
                dynamic_img_size=False, num_classes=0)


def convert(input_path: str, output_path: str, to: str, src: str = "auto", which: str = "context",
            num_heads: Optional[int] = None, force: bool = False) -> Checkpoint:
    if to not in FORMATS:
        raise UsageError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if which not in ("target", "context"):
        raise UsageError(f"--encoder {which!r}: choose target or context")
    if os.path.exists(output_path) and not force:
        raise UsageError(f"{output_path}: exists; pass --force to overwrite")
    ck = read_checkpoint(input_path, src, num_heads)
    {"engine": write_engine, "reference": write_reference,
     "hf": lambda c, p: write_hf(c, p, which), "timm": lambda c, p: write_timm(c, p, which)}[to](ck, output_path)
    return ck


# ----------------------------------------------------------------------------- CLI
def add_parser(sub):
    p = sub.add_parser("convert", help="convert between engine, reference, HuggingFace and timm checkpoints",
                       description="Convert an I-JEPA checkpoint. engine/reference: .pth.tar files; hf: a directory "
                                   "(config.json + model.safetensors) for transformers.IJepaModel; timm: a "
                                   ".safetensors file for a timm vit_*_gap_* VisionTransformer. Tensors are copied "
                                   "bit for bit.")
    p.add_argument("--input", required=True, help="checkpoint file or HF model directory")
    p.add_argument("--output", required=True, help="file (engine, reference, timm) or directory (hf)")
    p.add_argument("--to", required=True, help="engine | reference | hf | timm")
    p.add_argument("--from", dest="src", default="auto", help="auto (default) | engine | reference | hf | timm")
    p.add_argument("--encoder", default="context", choices=("target", "context"),
                   help="which encoder goes to hf/timm (default context: the 'encoder' entry, as HF's and "
                        "timm's own converters take it; target = the EMA encoder the paper evaluates)")
    p.add_argument("--num-heads", type=int, help="attention heads, for widths that are not reference factory sizes")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=_main)
    e = sub.add_parser("export", help="write any engine checkpoint (sharded ZeRO folder or file) as one .pth.tar",
                       description="Consolidate a checkpoint written by 'ijepa train' -- a sharded ZeRO folder "
                                   "({logging.folder}/{write_tag}-sharded, or one tag folder in it) or a single file "
                                   "-- into the reference .pth.tar layout (encoder/predictor/target_encoder with the "
                                   "module. prefix, AdamW state) or the engine's file (adds the exact resume point). "
                                   "Runs offline in one process, no GPU needed.")
    e.add_argument("--checkpoint", required=True, metavar="PATH", help="sharded folder, tag folder or file")
    e.add_argument("--output", required=True, metavar="FILE", help="output file (.pth.tar)")
    e.add_argument("--format", choices=["reference", "engine"], default="reference",
                   help="reference: the reference's layout; engine: plus the engine's resume entry (default reference)")
    e.set_defaults(func=_export_main)


def export(checkpoint: str, output: str, fmt: str = "reference") -> dict:
    """Any engine checkpoint -- a sharded ZeRO folder ``{folder}/{tag}-sharded`` (its ``latest`` tag)
    or one tag folder in it, or a single file -- as ONE file: the reference's ``.pth.tar`` layout
    (``fmt="reference"``) or the engine's, which ``ijepa train --resume`` continues from."""
    if fmt not in ("reference", "engine"):
        raise UsageError(f"--format {fmt!r}: choose reference or engine")
    if os.path.isdir(checkpoint) and not os.path.isfile(os.path.join(checkpoint, "rank00000.pt")):
        tag = read_latest(checkpoint)
        if tag is None:
            raise UsageError(f"--checkpoint {checkpoint}: neither a checkpoint tag folder nor a folder with a "
                             f"'latest' file (expected {{logging.folder}}/{{write_tag}}-sharded)")
        checkpoint = os.path.join(checkpoint, tag)
    snap = Snapshot(checkpoint)
    cfg = IJEPAConfig.from_dict(snap.meta["config"], validate=False)
    cfg.kernels.attention = cfg.kernels.gather = cfg.kernels.ema = "auto"   # a CPU process reads it
    strategy = LocalStrategy(cfg, torch.device("cpu"))
    strategy.load(snap)
    progress = {k: snap.meta.get(k) for k in ("step", "epoch", "batch_in_epoch", "sampler", "rng_cpu", "rng_cuda",
                                              "skipped_steps", "bad_files", "loss", "world_size")}
    state = strategy.state(progress)
    state["engine"].update(exported_from={"path": os.path.abspath(checkpoint), "strategy": snap.meta["strategy"],
                                          "world_size": snap.meta["world_size"]})
    if fmt == "reference":
        state.pop("engine")
    save_atomic(state, output)
    return state


def _export_main(args) -> int:
    state = export(args.checkpoint, args.output, args.format)
    n_enc = sum(v.numel() for v in state["encoder"].values())
    print(f"exported {args.checkpoint} (epoch {state['epoch']}, {n_enc:,} encoder parameters) -> {args.output} "
          f"[{args.format}]")
    return 0


def _main(args) -> int:
    if args.num_heads is not None and args.num_heads <= 0:
        raise UsageError(f"--num-heads {args.num_heads}: must be a positive integer")
    ck = convert(args.input, args.output, args.to, args.src, args.encoder, args.num_heads, args.force)
    what = "encoder only" if ck.encoder_only else "encoder, predictor, target encoder"
    picked = f", {args.encoder} encoder" if args.to in ("hf", "timm") and not ck.encoder_only else ""
    print(f"{args.input} ({ck.fmt}: {what}; {ck.arch.describe()}) -> {args.output} ({args.to}{picked})")
    return 0
