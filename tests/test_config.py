"""Configs: typed defaults, YAML presets, key=value overrides, errors that name the key, and every
file in configs/ loads and validates (objective hyperparameters against the objective's own
dataclass; accelerate launch configs through accelerate's own loader)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    resolve_group,
)
from fewstep.objectives import registry
from fewstep.objectives.registry import make_params

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)
LAUNCH = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def test_defaults_and_preset_name():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.objective.name == "dsm" and cfg.teacher.source == "digits-vp"
    assert resolve_group(cfg, "generator").lr == 1e-5  # the built-in default group
    p = load_config(CONFIGS / "digits" / "dsm.yaml")
    assert p.name == "digits/dsm"
    assert str(p.run_dir()) == str(Path("runs") / "digits" / "dsm")


def test_overrides_dotted_typed():
    cfg = load_config(
        CONFIGS / "digits" / "dsm.yaml",
        [
            "objective.t_min=0.05",
            "optim.generator.lr=1e-5",
            "data.batch_size=8",
            "lora.target_modules=[to_q,to_v]",
            "optim.fake_score.betas=[0.0, 0.95]",
            "resume=latest",
            "lora.student=true",
            "precision.mixed_precision=bf16",
        ],
    )
    assert cfg.objective.params["t_min"] == 0.05
    assert cfg.optim["generator"].lr == 1e-5 and isinstance(cfg.optim["generator"].lr, float)  # YAML reads 1e-5 as str
    assert cfg.data.batch_size == 8 and cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.optim["fake_score"].betas == (0.0, 0.95)
    assert cfg.resume == "latest" and cfg.lora.student is True
    # a group takes what it does not set from optim.default (here the preset's lr 1e-4 -> generator's own 1e-5)
    g = resolve_group(cfg, "generator")
    assert g.lr == 1e-5 and g.grad_clip == 1.0 and g.warmup_steps == 20
    # objective suggestions sit between the group's own values and optim.default
    assert resolve_group(cfg, "guidance", {"lr": 3e-3, "weight_decay": 0.5}).lr == 3e-3
    assert resolve_group(cfg, "generator", {"lr": 3e-3}).lr == 1e-5


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batchsize=4", "data.batchsize"),
        ("optim.generator.lrr=1e-4", "optim.generator.lrr"),
        ("lora.rnk=4", "lora.rnk"),
        ("stepz=3", "stepz"),
        ("data.batch_size=abc", "data.batch_size"),
        ("lora.student=maybe", "lora.student"),
        ("optim.generator.betas=[0.9]", "optim.generator.betas"),
        ("precision.mixed_precision=fp8", "precision.mixed_precision"),
        ("checkpoint.state_dict=zip", "checkpoint.state_dict"),
        ("ema.rate=1.5", "ema.rate"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.generator.grad_clip=-1", "optim.generator.grad_clip"),
    ],
)
def test_bad_key_or_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "digits" / "dsm.yaml", [override])
    assert key in str(e.value)


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CONFIGS / "nope.yaml")
    with pytest.raises(ConfigError, match="resume and overwrite"):
        load_config(None, ["resume=latest", "overwrite=true"])


def test_objective_params_checked_against_its_dataclass():
    p = make_params("dsm", {"t_min": "0.1", "sampling_steps": 2})
    assert p.t_min == 0.1 and p.sampling_steps == 2
    with pytest.raises(ConfigError, match="objective.t_mni"):
        make_params("dsm", {"t_mni": 0.1})
    with pytest.raises(ConfigError, match="objective.sampling_steps"):
        make_params("dsm", {"sampling_steps": "many"})
    with pytest.raises(ValueError, match="objective.t_min"):  # the dataclass's own validate()
        make_params("dsm", {"t_min": 0.9, "t_max": 0.5})
    with pytest.raises(ConfigError, match="objective.name"):
        registry.resolve("no_such_objective")


def test_registry_names_fixed_fields():
    p = make_params("decoupled_dmd", {})
    assert p.variant == "ddmd"
    with pytest.raises(ConfigError, match="objective.variant"):
        make_params("decoupled_dmd", {"variant": "dmd2"})


def test_old_fake_score_group_name_is_read_with_a_deprecation_warning(tmp_path):
    new = CONFIGS / "digits" / "dmd2_1step_vp.yaml"
    text = new.read_text()
    assert "\n  fake_score:\n" in text
    old = tmp_path / "configs" / "digits" / "dmd2_1step_vp.yaml"
    old.parent.mkdir(parents=True)
    old.write_text(text.replace("\n  fake_score:\n", "\n  guidance:\n"))
    with pytest.warns(FutureWarning, match=r"^optim.guidance is deprecated: .* now optim.fake_score"):
        cfg = load_config(old)
    assert "guidance" not in cfg.optim and cfg.optim["fake_score"].lr == 1e-4
    assert config_to_dict(cfg) == config_to_dict(load_config(new))
    with pytest.warns(FutureWarning, match="optim.guidance"):  # the same for a command-line override
        assert load_config(CONFIGS / "digits" / "dsm.yaml", ["optim.guidance.lr=3e-4"]).optim["fake_score"].lr == 3e-4
    with pytest.raises(ConfigError, match="optim.guidance and optim.fake_score are both set"):
        load_config(new, ["optim.guidance.lr=3e-4"])


def test_round_trip_to_dict():
    cfg = load_config(CONFIGS / "digits" / "dsm.yaml", ["optim.generator.lr=2e-5"])
    again = config_from_dict(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.name == str(path.relative_to(CONFIGS).with_suffix(""))
    params = make_params(cfg.objective.name, cfg.objective.params)
    assert type(params).__name__  # built from the preset without error
    groups = [g for g in cfg.optim if g != "default"]
    for g in groups:
        resolve_group(cfg, g)
    if cfg.data.prompts is not None:
        assert (ROOT / cfg.data.prompts).is_file(), f"{path}: data.prompts {cfg.data.prompts} is missing"


def test_presets_exist():
    names = {str(p.relative_to(CONFIGS)) for p in PRESETS}
    for need in (
        "digits/dsm.yaml",
        "sd15/dmd2_1step.yaml",
        "sdxl/dmd2_4step_lora.yaml",
        "pixart/tdm_4step.yaml",
        "sd3/scm_2step.yaml",
        "flux/dmd2_4step.yaml",
    ):
        assert need in names


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(path))
    assert c.num_processes >= 1
    if "fsdp" in path.name:
        assert str(c.distributed_type).endswith("FSDP") and int(c.fsdp_config["fsdp_version"]) == 2
    assert {p.name for p in LAUNCH} >= {"single_gpu.yaml", "multi_gpu.yaml", "fsdp2.yaml", "fsdp2_2nodes.yaml"}
