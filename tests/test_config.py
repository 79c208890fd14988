"""Config loading: every shipped YAML file loads, `--set` overrides are typed, bad values fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.cli import _overrides, _stage
from training.config import ConfigError, FinetuneConfig, PretrainConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CLASSES = {"finetune": FinetuneConfig, "adapt": FinetuneConfig, "pretrain": PretrainConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_names_its_stage_and_loads(path: Path) -> None:
    import yaml

    stage = _stage(path)
    cfg = load_config(path, CLASSES[stage])
    assert cfg.stage == stage
    # every key of the file arrives in the config (none silently dropped or defaulted)
    for key, value in (yaml.safe_load(path.read_text()) or {}).items():
        if not isinstance(value, dict):
            assert str(getattr(cfg, key)) == str(value) or getattr(cfg, key) == value, key


def test_stage_is_named_and_checked(tmp_path: Path, capsys) -> None:
    from training.cli import main

    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text("epochs: 1\n")  # neither optimizer nor lora: once read as pretraining
    assert main(["train", "--config", str(unnamed)]) == 2
    assert "`stage` must name the stage (pretrain, adapt, finetune), got None" in (
        capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match="stage 'pretrain' is not one of finetune, adapt"):
        load_config(CONFIGS / "tiny-pretrain.yaml", FinetuneConfig)
    with pytest.raises(ConfigError, match="stage 'finetune' is not one of pretrain"):
        load_config(CONFIGS / "tiny-ivon.yaml", PretrainConfig)


def test_set_exponent_without_dot_is_a_number() -> None:
    # YAML 1.1 reads "1e5" as a string; the field is a float, so it must arrive as 100000.0.
    overrides = _overrides(["ivon.ess=1e5", "ivon.lr=0.1", "epochs=2"])
    assert overrides["ivon.ess"] == "1e5"  # what YAML gives: the case being fixed
    cfg = load_config(CONFIGS / "default-ivon.yaml", FinetuneConfig, overrides)
    assert cfg.ivon.ess == 100000.0 and isinstance(cfg.ivon.ess, float)
    assert cfg.ivon.lr == 0.1 and cfg.epochs == 2


def test_set_integer_field_from_string() -> None:
    cfg = load_config(CONFIGS / "default-ivon.yaml", FinetuneConfig, {"epochs": "3"})
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ivon.ess": "lots"}, "IVONConfig.ess: expected a number, got 'lots'"),
        ({"epochs": "two"}, "FinetuneConfig.epochs: expected an integer, got 'two'"),
        ({"ivon.ess": -1.0}, "must be positive"),
        ({"ivon.essx": 1.0}, "unknown keys ['essx']"),
        ({"eval_split": "test"}, "must not be 'test'"),
    ],
)
def test_bad_values_are_refused_clearly(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "default-ivon.yaml", FinetuneConfig, overrides)
    assert message in str(err.value)


def test_cli_reports_input_errors_without_a_traceback(tmp_path: Path, capsys) -> None:
    from training.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "default-ivon.yaml").read_text())
    assert main(["train", "--config", str(bad), "--set", "ivon.ess=lots"]) == 2
    err = capsys.readouterr().err
    assert "quaver train: error: IVONConfig.ess: expected a number, got 'lots'" in err
    assert "Traceback" not in err
    missing = tmp_path / "no-such-posterior"
    code = main(["evaluate", "--base", str(tmp_path), "--posterior", str(missing)])
    assert code == 2
    assert "quaver evaluate: error:" in capsys.readouterr().err
    for cmd in ("evaluate", "calibrate"):  # K < 1 is a usage error, before anything loads
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--base", str(tmp_path), "--posterior", str(missing), "--samples", "0"])
        assert exit_.value.code == 2
        assert "--samples: must be at least 1, got 0" in capsys.readouterr().err


def test_cli_split_sizes_are_checked(tmp_path: Path, capsys) -> None:
    from training.cli import main

    for cmd in (["data", "--out"], ["pipeline", "--work"]):
        assert main([*cmd, str(tmp_path / "w"), "--size", "pretrain=many"]) == 2
        assert "want SPLIT=N" in capsys.readouterr().err
    assert main(["data", "--out", str(tmp_path / "w"), "--size", "valid=3"]) == 2
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_cli_pretrain_weights(tmp_path: Path, capsys) -> None:
    from training.cli import main
    from training.data.manifest import read_manifest

    out = tmp_path / "w"
    for spec, message in (("nope=2", "want FAMILY=N"), ("rhythm=0", "K must be >= 1")):
        assert main(["data", "--out", str(out), "--pretrain-weight", spec]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
    sizes = [f"--size={s}" for s in ("pretrain=11", "train=0", "calib=0", "test=0", "test_shift=0")]
    assert main(["data", "--out", str(out), *sizes, "--pretrain-weight", "rhythm=3"]) == 0
    families = [item.family for item in read_manifest(out, "pretrain")]
    assert families.count("rhythm") == 3 and len(set(families)) == 9  # one 11-slot rotation


def test_cli_default_takes_benchmark_sizes(tmp_path: Path, capsys) -> None:
    """`quaver default --size ... --even-pretrain` reaches the recipe's benchmark overrides
    (the real mix's lever runs, docs/real_sounds.md); a bad size is a usage error."""
    from training.cli import build_parser, default_recipe, main

    args = build_parser().parse_args(
        ["default", "--real-mix", "--no-ship", "--size", "pretrain=4800", "--even-pretrain"]
    )
    recipe = default_recipe(args)
    assert recipe.real_mix and recipe.ship_dir is None
    assert recipe.sizes == {"pretrain": 4800, "pretrain_weights": {}}
    plain = default_recipe(build_parser().parse_args(["default"]))
    assert plain.sizes == {} and plain.ship_dir == Path("app/default")
    assert plain.real_mix  # the shipped default's benchmark
    assert not default_recipe(build_parser().parse_args(["default", "--synthetic"])).real_mix
    assert main(["default", "--work", str(tmp_path), "--size", "pretrain=lots"]) == 2
    assert "want SPLIT=N" in capsys.readouterr().err
