"""tools.plan (token budgets) and tools.select_config (which preset fits a machine)."""

from __future__ import annotations

import pytest

from titan_dsv3.config import parse_args, resolve_model_args
from titan_dsv3.config.budget import budget_params
from titan_dsv3.config.manager import TRAIN_CONFIGS
from titan_dsv3.tools import plan, select_config


def test_strict_passes_for_every_preset(capsys):
    assert plan.main(["--all", "--strict"]) == 0
    out = capsys.readouterr().out
    assert all(p.stem in out for p in plan.preset_files())


def test_an_off_budget_ratio_fails_strict(capsys):
    assert plan.main(["--all", "--strict", "--tokens-per-param", "40"]) == 1
    assert "outside [20, 26]" in capsys.readouterr().err
    assert plan.main(["--all", "--tokens-per-param", "40"]) == 0  # without --strict: reported, not failed


def test_too_few_fixed_steps_fail_strict(tmp_path, capsys):
    cfg = tmp_path / "short.toml"
    cfg.write_text(
        '[model]\npreset = "deepseek_1b"\n'
        "[training]\nsteps = 1000\nseq_len = 4096\nlocal_batch_size = 8\nglobal_batch_size = 128\n"
        "[parallelism]\ndata_parallel_shard_degree = 8\n"
    )
    assert plan.main(["--config", str(cfg), "--strict"]) == 1
    p = plan.make_plan(cfg)
    assert (
        p.steps == 1000 and not p.steps_from_budget and p.ratio == pytest.approx(1000 * 128 * 4096 / p.active)
    )
    assert plan.main(["--config", str(cfg), "--strict", "--world-size", "3"]) == 2  # does not validate


@pytest.mark.parametrize("r", [20.0, 26.0])
def test_budget_steps_reach_the_ratio_in_whole_steps(r):
    path = TRAIN_CONFIGS / "deepseek_5b.toml"
    p = plan.make_plan(path, tokens_per_param=r)
    assert p.active == resolve_model_args(
        parse_args(["--job.config_file", str(path)], world_size=8)
    ).num_params(active=True, include_mtp=False)
    assert p.tokens >= r * p.active > p.tokens - p.tokens_per_step  # the fewest whole steps
    assert p.tokens_per_step == 256 * 4096 and p.world_size == 8


def test_markdown_table_lists_every_preset(capsys):
    assert plan.main(["--all", "--markdown"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| preset |") and len(lines) == 2 + len(plan.preset_files())
    assert "| `deepseek_671b` | 671.03B | 682.64B | 37.55B |" in lines[-1]


def test_budget_counts_match_config_budget():
    for path in plan.preset_files():
        p = plan.make_plan(path)
        args = resolve_model_args(parse_args(["--job.config_file", str(path)], world_size=p.world_size))
        assert p.active == budget_params(args) and p.total == args.num_params(include_mtp=False)


def test_select_config_ranks_what_fits(capsys):
    assert select_config.main(["--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "largest that fits" in out and "deepseek_671b" not in out  # 671B needs far more than 8 GPUs
    small = select_config.choose("deepseek_1b", 8, 80)
    assert small.fits and small.chosen.total <= 0.97 * 80 * 2**30
    assert "NGPU=8 CONFIG_FILE=train_configs/deepseek_1b.toml ./run_train.sh" in small.command()
    big = select_config.choose("deepseek_671b", 8, 80)
    assert not big.fits
    assert select_config.choose("deepseek_671b", 256, 80).fits
    assert select_config.choose("deepseek_671b", 256, 80).command().startswith("torchrun --nnodes 32")


def test_select_config_info(capsys):
    assert select_config.main(["--info", "deepseek_16b"]) == 0
    out = capsys.readouterr().out
    assert "as written (fsdp 4, ep 4" in out and "fits 141 GiB: yes" in out and "fits 80 GiB: no" in out
