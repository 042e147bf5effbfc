"""Every config key means the same under every backend, or is refused with one line (the table is
tests/backend_table.py; the ZeRO columns run in the 2-rank harness of tests/test_distributed.py)."""
import os

import pytest

from backend_table import BASE, TABLE, run_table
from engine import IJEPAConfig
from engine.cli import main as cli_main
from engine.strategy import UNSUPPORTED
from engine.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def make_cfg(folder, overrides):
    return IJEPAConfig.from_yaml(SMOKE, [f"logging.folder={folder}", *BASE, *overrides])


def expected(backend):
    refused = {key for (key, _, where) in UNSUPPORTED if where == backend}
    return {key: ("refused" if key in refused else "ok") for key, *_ in TABLE}


def verdicts(results):
    return {k: v.split(":")[0] for k, v in results.items()}


@pytest.mark.slow
def test_every_key_is_honoured_by_the_local_strategy(tmp_path):
    results = run_table(train, make_cfg, "local", str(tmp_path))
    assert verdicts(results) == expected("local"), {k: v for k, v in results.items() if v != "ok"}


def test_a_key_zero3_cannot_honour_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    rc = cli_main(["train", "--config", SMOKE, "--zero", "3", "--override", f"logging.folder={tmp_path}/run",
                   "--override", "train.compile=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("ijepa: error: train.compile=True is not supported "
                                                           "under zero3"), err
    assert not os.path.exists(tmp_path / "run")
