"""Configuration: plain data, validated before any work starts.

The layout is the reference's YAML (sections ``meta``, ``data``, ``mask``,
``optimization``, ``logging``) so its config files load unchanged, plus the
engine's own sections (``model``, ``kernels``, ``train``, ``checkpoint``,
``deepspeed``) and a few extra keys in the shared sections. Every key is typed;
an unknown key or a bad value raises ``ConfigError`` with one line naming the key,
the value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Optional

import yaml

from engine.errors import ConfigError


# Reference factory sizes: (embed_dim, depth, num_heads, mlp_ratio).
VIT_SIZES = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}


@dataclass
class MetaConfig:
    use_bfloat16: bool = True
    model_name: str = "vit_base"
    load_checkpoint: bool = False
    read_checkpoint: Optional[str] = None
    copy_data: bool = False
    pred_depth: int = 6
    pred_emb_dim: int = 384


@dataclass
class DataConfig:
    batch_size: int = 128
    color_jitter_strength: float = 0.0
    crop_scale: tuple = (0.3, 1.0)
    crop_size: int = 224
    image_folder: str = ""
    num_workers: int = 10
    pin_mem: bool = True
    root_path: str = ""
    use_color_distortion: bool = False
    use_gaussian_blur: bool = False
    use_horizontal_flip: bool = False
    # engine additions
    dataset: str = "imagefolder"      # imagefolder | fmnist | synthetic
    loader: str = "torch"             # torch | dali | auto
    in_chans: int = 3
    synthetic_size: int = 1024        # images per epoch for dataset: synthetic
    fmnist_dir: str = "/usr/share/datasets/fashion-mnist"
    max_images: Optional[int] = None  # use only the first N images (quick runs)
    prefetch: int = 2                 # batches (with their masks) prepared ahead in a thread; 0 = inline


@dataclass
class MaskConfig:
    allow_overlap: bool = False
    aspect_ratio: tuple = (0.75, 1.5)
    enc_mask_scale: tuple = (0.85, 1.0)
    min_keep: int = 10
    num_enc_masks: int = 1
    num_pred_masks: int = 4
    patch_size: int = 16
    pred_mask_scale: tuple = (0.15, 0.2)
    # engine addition: "reference" reproduces the reference collator bit for bit,
    # "paper" lets blocks touch every row/column and draws aspect independently.
    mode: str = "reference"
    # loop: the per-sample sampler (bit-exact to the reference in reference mode);
    # vectorized: whole batch in tensor ops (same distribution, for GPUs / large batches)
    sampler: str = "loop"
    # paper mode only: keep every mask whole (no truncation to the batch minimum) and run the
    # context encoder and predictor on packed variable-length sequences (no padding)
    packed: bool = False


@dataclass
class OptimizationConfig:
    ema: tuple = (0.996, 1.0)
    epochs: int = 300
    final_lr: float = 1.0e-6
    final_weight_decay: float = 0.4
    ipe_scale: float = 1.0
    lr: float = 0.001
    start_lr: float = 0.0002
    warmup: float = 40
    weight_decay: float = 0.04
    # engine additions
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None    # max global grad norm; None = off (reference)
    # torch AdamW(fused=True): one kernel per step, and a non-finite step is skipped on the device
    # (no host sync); false: torch's default AdamW (the reference's), one host sync per skip check
    fused_optimizer: bool = True


@dataclass
class LoggingConfig:
    folder: str = "runs/default"
    write_tag: str = "jepa"
    log_every: int = 10                  # progress/log line every N steps
    tensorboard: bool = True
    diagnostics_every: int = 50          # collapse diagnostics every N steps (0 = off)


@dataclass
class ModelConfig:
    """Overrides of the factory size named by ``meta.model_name`` (None = factory value)."""
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    pred_num_heads: Optional[int] = None   # reference: the encoder's head count
    # init std of the patch-embedding conv (reference 0.02). With small patches (4x4x3 = 48 inputs)
    # its output is ~5x weaker than the sin-cos positions, so targets are mostly position; a larger
    # value restores the content/position balance the reference has at 16x16 patches.
    patch_embed_std: Optional[float] = None


@dataclass
class LossConfig:
    """How targets are formed (engine addition; the reference is ``target_norm: layer``)."""
    # layer:  LayerNorm of each target token (reference)
    # center: first subtract the batch mean at each token position, then LayerNorm. Removes the
    #         part of the target that depends on position only, which small grids can predict
    #         without looking at the image (see benchmarks/RESULTS.md, demo ablation)
    # batch:  standardise each position and channel over the batch, then LayerNorm
    target_norm: str = "layer"


@dataclass
class KernelsConfig:
    attention: str = "auto"   # auto | triton | xformers | sdpa | chunked | naive
    gather: str = "auto"      # auto | triton | torch
    ema: str = "auto"         # auto | triton | torch (foreach lerp) | naive (the reference loop)


@dataclass
class TrainConfig:
    device: str = "auto"          # auto | cpu | cuda
    precision: Optional[str] = None   # fp32 | bf16; None = from meta.use_bfloat16
    seed: int = 0
    threads: Optional[int] = None     # torch.set_num_threads
    max_steps: Optional[int] = None   # stop after N optimizer steps (schedules keep the full length)
    max_minutes: Optional[float] = None  # stop (with a checkpoint) after this wall time
    nonfinite: str = "skip"       # skip (reference behaviour) | stop
    progress: bool = True         # progress bar on stderr
    # fast-path switches (each keeps the reference's numbers within fp32 rounding)
    skip_unused_rows: bool = True  # predictor's last block: no query/MLP work for context rows
    compile: bool = False          # torch.compile each transformer block (dynamic token count)
    activation_checkpointing: bool = False  # recompute encoder/predictor blocks in backward (memory)


@dataclass
class CheckpointConfig:
    every_steps: int = 0          # also checkpoint every N steps (0 = only at epoch end)
    keep_last: int = 2            # step checkpoints kept besides -latest
    save_every_epochs: int = 50   # reference: extra ep{N} file every 50 epochs


@dataclass
class IJEPAConfig:
    meta: MetaConfig = field(default_factory=MetaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: Optional[dict] = None

    @classmethod
    def from_dict(cls, d: dict | None, validate: bool = True) -> "IJEPAConfig":
        d = d or {}
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {type(d).__name__}")
        kwargs, hints = {}, typing.get_type_hints(cls)
        for key, value in d.items():
            if key not in hints:
                raise ConfigError(f"config: unknown section {key!r}; allowed: {', '.join(hints)}")
            if key == "deepspeed" and value is not None and not isinstance(value, dict):
                raise ConfigError("deepspeed: expected a mapping (a DeepSpeed config dict)")
            kwargs[key] = value if key == "deepspeed" else _build_section(key, hints[key], value)
        cfg = cls(**kwargs)
        return cfg.validate() if validate else cfg

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None, validate: bool = True) -> "IJEPAConfig":
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "parse error"
            raise ConfigError(f"{path}: not valid YAML ({first})") from None
        for ov in overrides or []:
            apply_override(d, ov)
        return cls.from_dict(d, validate=validate)

    def to_dict(self) -> dict:
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: copy.deepcopy(v) if not dataclasses.is_dataclass(v) else
                {k: (list(x) if isinstance(x, tuple) else x) for k, x in dataclasses.asdict(v).items()}
                for name, v in sections.items()}

    def replace(self, **sections) -> "IJEPAConfig":
        """A copy with some keys changed, e.g. ``cfg.replace(data={"batch_size": 8})``."""
        d = self.to_dict()
        for sec, vals in sections.items():
            d[sec] = {**d[sec], **vals} if isinstance(vals, dict) and isinstance(d.get(sec), dict) else vals
        return IJEPAConfig.from_dict(d)

    @property
    def arch(self) -> dict:
        """The encoder's width, depth, heads and MLP ratio after overrides."""
        name = self.meta.model_name
        if name not in VIT_SIZES:
            raise ConfigError(f"meta.model_name: unknown model {name!r}; allowed: {', '.join(VIT_SIZES)}")
        dim, depth, heads, ratio = VIT_SIZES[name]
        m = self.model
        return dict(embed_dim=m.embed_dim or dim, depth=m.depth or depth, num_heads=m.num_heads or heads,
                    mlp_ratio=m.mlp_ratio or ratio, pred_num_heads=m.pred_num_heads or m.num_heads or heads)

    @property
    def grid(self) -> int:
        return self.data.crop_size // self.mask.patch_size

    @property
    def precision(self) -> str:
        return self.train.precision or ("bf16" if self.meta.use_bfloat16 else "fp32")

    def validate(self) -> "IJEPAConfig":
        """Raise ``ConfigError`` on the first problem; checks everything that can be checked
        before data or models are touched."""
        d, m, o, t, k = self.data, self.mask, self.optimization, self.train, self.kernels
        arch = self.arch
        _choice("data.dataset", d.dataset, ("imagefolder", "fmnist", "synthetic"))
        _choice("data.loader", d.loader, ("torch", "dali", "auto"))
        _choice("mask.mode", m.mode, ("reference", "paper"))
        _choice("mask.sampler", m.sampler, ("loop", "vectorized"))
        if m.packed and m.mode != "paper":
            raise ConfigError("mask.packed: needs mask.mode=paper (reference mode keeps the reference's "
                              "truncation to the batch minimum, for parity)")
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        _choice("train.nonfinite", t.nonfinite, ("skip", "stop"))
        if t.precision is not None:
            _choice("train.precision", t.precision, ("fp32", "bf16"))
        _choice("kernels.attention", k.attention, ("auto", "triton", "xformers", "sdpa", "chunked", "naive"))
        _choice("kernels.gather", k.gather, ("auto", "triton", "torch"))
        _choice("kernels.ema", k.ema, ("auto", "triton", "torch", "naive"))
        _choice("loss.target_norm", self.loss.target_norm, ("layer", "center", "batch"))
        for key, value in (("data.batch_size", d.batch_size), ("data.crop_size", d.crop_size),
                           ("mask.patch_size", m.patch_size), ("optimization.epochs", o.epochs),
                           ("optimization.grad_accum_steps", o.grad_accum_steps), ("data.in_chans", d.in_chans)):
            _positive(key, value)
        if d.crop_size % m.patch_size:
            raise ConfigError(f"mask.patch_size: {m.patch_size} does not divide data.crop_size {d.crop_size}; "
                              f"pick a crop size that is a multiple of the patch size")
        if self.grid < 2:
            raise ConfigError(f"data.crop_size/mask.patch_size gives a {self.grid}x{self.grid} grid; need at least 2x2")
        for key, pair in (("mask.enc_mask_scale", m.enc_mask_scale), ("mask.pred_mask_scale", m.pred_mask_scale),
                          ("data.crop_scale", d.crop_scale)):
            _check_pair(key, pair, lambda a, b: 0 < a <= b <= 1, "0 < min <= max <= 1")
        _check_pair("mask.aspect_ratio", m.aspect_ratio, lambda a, b: 0 < a <= b, "0 < min <= max")
        _check_pair("optimization.ema", o.ema, lambda a, b: 0 <= a <= b <= 1, "0 <= start <= end <= 1")
        _positive("mask.num_pred_masks", m.num_pred_masks)
        _positive("mask.num_enc_masks", m.num_enc_masks)
        if m.min_keep < 0:
            raise ConfigError(f"mask.min_keep: {m.min_keep} must be >= 0")
        for key in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay", "warmup"):
            v = getattr(o, key)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ConfigError(f"optimization.{key}: {v!r} must be a finite number >= 0")
        if o.ipe_scale < 1.0:
            raise ConfigError(f"optimization.ipe_scale: {o.ipe_scale} < 1 would end the momentum schedule "
                              f"before training ends; use >= 1.0")
        if o.warmup > o.epochs * o.ipe_scale:
            raise ConfigError(f"optimization.warmup: {o.warmup} epochs is longer than the schedule "
                              f"({o.epochs} epochs x ipe_scale {o.ipe_scale})")
        if o.clip_grad is not None and o.clip_grad <= 0:
            raise ConfigError(f"optimization.clip_grad: {o.clip_grad} must be > 0 or null (off)")
        if arch["embed_dim"] % arch["num_heads"]:
            raise ConfigError(f"model: embed_dim {arch['embed_dim']} not divisible by num_heads {arch['num_heads']}")
        if arch["embed_dim"] % 4:
            raise ConfigError(f"model: embed_dim {arch['embed_dim']} must be divisible by 4 (2-D sin-cos positions)")
        pdim, pheads = self.meta.pred_emb_dim, arch["pred_num_heads"]
        if pdim % 4 or pdim % pheads:
            raise ConfigError(f"meta.pred_emb_dim: {pdim} must be divisible by 4 and by the predictor's {pheads} heads")
        _positive("meta.pred_depth", self.meta.pred_depth)
        # The reference's collator loops forever when a drawn block cannot hold more than
        # min_keep patches; reject such configs here (masks.check_mask_config does the math).
        from engine.masks import check_mask_config
        check_mask_config(d.crop_size, m.patch_size, m.enc_mask_scale, m.pred_mask_scale,
                          m.aspect_ratio, m.min_keep, m.mode, m.num_pred_masks, m.allow_overlap)
        if d.dataset == "imagefolder":
            root = os.path.join(d.root_path, d.image_folder) if d.image_folder else d.root_path
            if not d.root_path or d.root_path.startswith("$"):
                raise ConfigError("data.root_path: not set; point it at the folder that holds "
                                  "data.image_folder (an ImageFolder tree with train/)")
            if not os.path.isdir(root):
                raise ConfigError(f"data.root_path/image_folder: {root} is not a directory")
        if d.dataset == "fmnist" and d.in_chans not in (1, 3):
            raise ConfigError(f"data.in_chans: {d.in_chans}; Fashion-MNIST gives 1 or 3 (replicated) channels")
        if self.logging.folder.startswith("$"):
            raise ConfigError(f"logging.folder: {self.logging.folder!r} is a placeholder; set a real path "
                              f"(e.g. --override logging.folder=runs/my_run)")
        _positive("logging.log_every", self.logging.log_every)
        if t.max_steps is not None:
            _positive("train.max_steps", t.max_steps)
        return self


def _choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _positive(key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: {value!r} must be a positive integer")


def _check_pair(key, value, ok, rule):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{key}: {value!r} must be a pair [min, max]")
    if not ok(float(value[0]), float(value[1])):
        raise ConfigError(f"{key}: {list(value)} must satisfy {rule}")


def _build_section(name, cls, value):
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    kwargs, hints = {}, typing.get_type_hints(cls)
    for key, v in value.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key}: unknown key; allowed: {', '.join(hints)}")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], v)
    return cls(**kwargs)


# type hint -> (accepted Python types, how an error names them); a bool is never a number here
_SCALARS = {bool: ((bool,), "true or false"), int: ((int,), "an integer"), float: ((int, float), "a number"),
            str: ((str,), "a string"), dict: ((dict,), "a mapping"), tuple: ((list, tuple), "a list")}


def _coerce(key, hint, v):
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        if v is None:
            return None
        hint = next(a for a in args if a is not type(None))
    elif v is None:
        raise ConfigError(f"{key}: null is not allowed here")
    if hint is int and isinstance(v, float) and v.is_integer():
        return int(v)
    if hint is float and isinstance(v, str):
        try:
            return float(v)   # the reference writes some floats as strings ("1e-6")
        except ValueError:
            pass
    if hint in _SCALARS:
        types, expected = _SCALARS[hint]
        if not isinstance(v, types) or (isinstance(v, bool) and hint is not bool):
            raise ConfigError(f"{key}: {v!r} must be {expected}")
    if hint is tuple:
        try:
            return tuple(float(x) for x in v)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {v!r} must be a list of numbers") from None
    return float(v) if hint is float else v


def apply_override(d: dict, override: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to a raw config dict."""
    path, eq, raw = override.partition("=")
    keys = path.strip().split(".")
    if not eq or len(keys) < 2 or not all(keys):
        raise ConfigError(f"--override {override!r}: expected section.key=value, e.g. data.batch_size=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = d
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"--override {override!r}: {k} is not a section")
        node = node[k]
    node[keys[-1]] = value
