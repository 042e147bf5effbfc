"""Config loading and validation: reference files load unchanged, bad configs fail in one line."""
import glob
import os
import subprocess
import sys

import pytest
import yaml

from engine.config import ConfigError, IJEPAConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_CONFIGS = ["in1k_vith14_ep300", "in1k_vith16-448_ep300", "in22k_vith14_ep66", "in22k_vitg16_ep44"]


@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_reference_configs_load(name):
    cfg = IJEPAConfig.from_yaml(os.path.join(ROOT, "configs", f"{name}.yaml"), validate=False)
    assert cfg.mask.num_pred_masks == 4 and cfg.optimization.ema == (0.996, 1.0)
    assert cfg.meta.model_name in ("vit_huge", "vit_giant") and cfg.precision == "bf16"
    # placeholders in the reference files must be replaced before training: one clear line
    with pytest.raises(ConfigError, match="root_path"):
        cfg.validate()
    cfg = IJEPAConfig.from_yaml(os.path.join(ROOT, "configs", f"{name}.yaml"),
                                overrides=[f"data.root_path={ROOT}", "data.image_folder=configs",
                                           "logging.folder=runs/x"])
    assert cfg.arch["embed_dim"] in (1280, 1408)


def test_all_shipped_configs_parse():
    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        IJEPAConfig.from_yaml(path, validate=False)


def test_override_parsing_and_types():
    cfg = IJEPAConfig.from_yaml(os.path.join(ROOT, "configs", "smoke.yaml"),
                                overrides=["data.batch_size=4", "mask.aspect_ratio=[0.5, 2]", "train.seed=3"])
    assert cfg.data.batch_size == 4 and cfg.mask.aspect_ratio == (0.5, 2.0) and cfg.train.seed == 3
    assert cfg.optimization.final_weight_decay == 0.4


BAD = [
    ({"data": {"batch_size": 0}}, "data.batch_size"),
    ({"data": {"batch_size": "many"}}, "data.batch_size"),
    ({"data": {"crop_size": 30}}, "patch_size"),
    ({"mask": {"pred_mask_scale": [0.3, 0.1]}}, "mask.pred_mask_scale"),
    ({"mask": {"enc_mask_scale": [0.5, 1.5]}}, "mask.enc_mask_scale"),
    ({"mask": {"min_keep": 40}}, "min_keep"),
    ({"mask": {"mode": "fancy"}}, "mask.mode"),
    ({"meta": {"model_name": "vit_enormous"}}, "meta.model_name"),
    ({"optimization": {"lr": -1}}, "optimization.lr"),
    ({"optimization": {"ipe_scale": 0.5}}, "ipe_scale"),
    ({"data": {"dataset": "imagefolder", "root_path": "/nonexistent/dir"}}, "is not a directory"),
    ({"data": {"bogus_key": 1}}, "data.bogus_key"),
    ({"bogus_section": {}}, "bogus_section"),
    ({"train": {"precision": "fp8"}}, "train.precision"),
    ({"kernels": {"attention": "flash9"}}, "kernels.attention"),
]


def _smoke_dict():
    with open(os.path.join(ROOT, "configs", "smoke.yaml")) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("patch,needle", BAD)
def test_bad_values_raise_one_line_errors(patch, needle):
    d = _smoke_dict()
    for sec, vals in patch.items():
        d.setdefault(sec, {}).update(vals)
    with pytest.raises(ConfigError) as e:
        IJEPAConfig.from_dict(d)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content,needle", [
    ("data: {batch_size: -3}\n", "data.batch_size"),
    ("mask: [1, 2\n", "not valid YAML"),
    ("data:\n  crop_size: 96\nmask:\n  patch_size: 16\n  min_keep: 4\n", "never finish"),
    ("meta:\n  pred_emb_dim: 30\n", "pred_emb_dim"),
])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, content, needle):
    base = _smoke_dict()
    base["logging"]["folder"] = str(tmp_path / "run")
    cfg_path = tmp_path / "bad.yaml"
    if content.startswith("mask: ["):
        cfg_path.write_text(content)
    else:
        for sec, vals in (yaml.safe_load(content) or {}).items():
            base.setdefault(sec, {}).update(vals)
        cfg_path.write_text(yaml.safe_dump(base))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train", "--config", str(cfg_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("ijepa: error")]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "jepa-latest.pth.tar").exists()


def test_cli_missing_config_and_bad_args_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train", "--config", str(tmp_path / "nope.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "not found" in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--config" in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train", "--config", "configs/smoke.yaml",
                        "--override", "nodots"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "section.key=value" in r.stderr
