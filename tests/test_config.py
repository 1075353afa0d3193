"""prefix_rft.config (YAML + overrides, resolution, validation) and prefix_rft.cli dispatch."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import yaml

from prefix_rft import cli
from prefix_rft.config import (
    SECTIONS,
    Config,
    all_keys,
    choice_fields,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_defaults_follow_design_section_3():
    cfg = load_config(None, ["--train.steps=200"])
    assert (cfg.rollout.group_size, cfg.prefix.num_prefixed) == (8, 1)
    assert (cfg.prefix.start, cfg.prefix.end, cfg.prefix.high) == (0.95, 0.05, 0.95)
    assert (cfg.loss.clip_low, cfg.loss.clip_high, cfg.loss.clip_c) == (0.2, 0.2, None)
    assert cfg.loss.entropy_top_fraction == 0.2 and cfg.loss.entropy_mask_scope == "micro_batch"
    assert cfg.optim.lr == 1e-6 and cfg.rollout.temperature == 1.0
    # sentinels resolved from other fields
    assert cfg.prefix.decay_steps == 200 and cfg.data.seed == cfg.train.seed == cfg.rollout.seed
    assert cfg.train.mini_batch_size == cfg.train.prompts_per_step


def test_every_field_has_a_unit_comment():
    import inspect
    import sys

    for section, cls in SECTIONS.items():
        if section == "prefix":
            continue  # beta_beta shares beta_alpha's comment
        source = inspect.getsource(sys.modules[cls.__module__])  # data: prefix_rft.data.options
        for f in dataclasses.fields(cls):
            line = next(ln for ln in source.splitlines() if ln.strip().startswith(f"{f.name}:"))
            assert "#" in line, f"{section}.{f.name} has no comment"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    shipped = {p.name for p in CONFIGS}
    assert {"demo.yaml", "qwen2.5-math-1.5b.yaml", "qwen2.5-math-7b.yaml"} <= shipped
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    for section, values in raw.items():  # every value in the file made it into the config
        for name, value in values.items():
            got = getattr(getattr(cfg, section), name)
            if dataclasses.is_dataclass(got):  # a nested group (model.lora): the given fields
                got = {k: v for k, v in dataclasses.asdict(got).items() if k in value}
            as_text = isinstance(value, bool) and got == str(value).lower()
            assert got == value or as_text, (section, name)


def test_paper_configs_carry_the_paper_settings():
    for name in ("qwen2.5-math-1.5b.yaml", "qwen2.5-math-7b.yaml"):
        cfg = load_config(Path(CONFIGS[0]).parent / name)
        assert cfg.optim.lr == 1e-6 and cfg.rollout.group_size == 8 and cfg.prefix.num_prefixed == 1
        assert cfg.rollout.max_response_tokens == 8192 and cfg.rollout.temperature == 1.0
        assert cfg.train.steps == 500 and cfg.prefix.schedule == "cosine"
        assert (cfg.prefix.start, cfg.prefix.end) == (0.95, 0.05)
        assert cfg.loss.entropy_top_fraction == 0.2 and cfg.data.schema == "verl"


def test_yaml_then_overrides_with_type_conversion(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  clip_high: 0.28\nmodel:\n  liger: true\ntrain:\n  steps: 10\n")
    cfg = load_config(path, [
        "--train.steps=20", "--optim.lr=3e-6", "--data.train_files=[a.jsonl, b.parquet]",
        "--loss.clip_c=3", "--rollout.enforce_eager=yes",
        "--data.prompt_template=Solve: {question} \\boxed{{}}",
        "--optim.betas=[0.9, 0.95]", "--data.system_prompt=null", "--prefix.decay_steps=1e3",
    ])
    assert cfg.loss.clip_high == 0.28 and cfg.model.liger == "true"
    assert cfg.train.steps == 20 and cfg.optim.lr == 3e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"]
    assert cfg.loss.clip_c == 3.0 and isinstance(cfg.loss.clip_c, float)
    assert cfg.rollout.enforce_eager is True and cfg.data.system_prompt is None
    assert cfg.data.prompt_template == "Solve: {question} \\boxed{{}}"
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.prefix.decay_steps == 1000
    assert load_config(None, ["--data.train_files=one.jsonl"]).data.train_files == ["one.jsonl"]
    assert load_config(None, ["--loss.algo=rft"]).prefix.num_prefixed == 0


@pytest.mark.parametrize("override,message", [
    ("--loss.clip_hihg=0.3", "unknown config key 'loss.clip_hihg' (did you mean: loss.clip_high"),
    ("--trian.steps=3", "unknown config key 'trian.steps' (did you mean: train.steps"),
    ("--optim.clip_high=3", "did you mean: loss.clip_high"),
    ("--loss.algo=ppo", "loss.algo must be one of sft|rft|prefix_rft, got 'ppo'"),
    ("--model.dtype=fp16", "model.dtype must be one of auto|fp32|bf16"),
    ("--train.steps=ten", "train.steps must be an integer, got 'ten'"),
    ("--train.steps=0", "train.steps must be an int >= 1, got 0"),
    ("--optim.lr=fast", "optim.lr must be a number"),
    ("--prefix.start=1.5", "prefix.start must be a number in [0.0, 1.0], got 1.5"),
    ("--prefix.end=0.99", "prefix.end must be <= start (0.95), got 0.99"),
    ("--prefix.schedule=stairs",
     "prefix.schedule must be one of cosine|linear|constant|uniform|step"),
    ("--prefix.num_prefixed=9", "prefix.num_prefixed must be <= rollout.group_size (8)"),
    ("--loss.clip_c=0.5", "loss.clip_c must be a number in (1.0, inf)"),
    ("--loss.entropy_top_fraction=0", "loss.entropy_top_fraction must be a number in (0.0, 1.0]"),
    ("--loss.entropy_mask_scope=batch", "loss.entropy_mask_scope must be one of micro_batch|mini"),
    ("--loss.baseline=mean", "loss.baseline must be one of group|on_policy|official, got 'mean'"),
    ("--loss.kernel_impl=cuda", "loss.kernel_impl must be one of auto|torch|triton"),
    ("--rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0.0"),
    ("--rollout.temperature=0", "rollout.temperature must be a number in (0.0, inf)"),
    ("--rollout.engine=sglang", "rollout.engine must be one of hf|vllm, got 'sglang'"),
    ("--train.mini_batch_size=5", "train.mini_batch_size must divide train.prompts_per_step"),
    ("--optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("--model.gradient_checkpointing=maybe", "model.gradient_checkpointing must be true or false"),
    ("--data.train_files={a: 1}", "data.train_files must be a list"),
    ("--train.steps", "override must look like --section.field=value"),
])
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollouts:\n  group_size: 4\n")
    with pytest.raises(ValueError, match=r"unknown config key 'rollouts' \(did you mean: rollout"):
        load_config(bad)
    bad.write_text("rollout: 4\n")
    with pytest.raises(ValueError, match="section 'rollout' must be a mapping"):
        load_config(bad)


def test_every_choice_field_validates_its_default():
    cfg = Config()
    for key, allowed in choice_fields().items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) in allowed
        assert key in all_keys()


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["--loss.clip_c=3.0", "--data.train_files=[x.jsonl]",
                             "--data.system_prompt="])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(path)
    assert config_to_dict(again) == config_to_dict(cfg)
    assert yaml.safe_load(path.read_text())["loss"]["clip_c"] == 3.0
    assert parse_override("--data.system_prompt=''") == ("data.system_prompt", "")


# ---------------------------------------------------------------- CLI
def test_cli_train_dispatches_with_overrides_and_resume(monkeypatch, tmp_path):
    seen = {}
    fake = types.ModuleType("prefix_rft.train")
    fake.train = lambda cfg: seen.setdefault("cfg", cfg) and 0
    monkeypatch.setitem(sys.modules, "prefix_rft.train", fake)
    monkeypatch.setattr("prefix_rft.preflight.preflight", lambda cfg: None)  # no model here
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 7\n")
    rc = cli.main(["train", "--config", str(config), "--loss.clip_high=0.3", "--train.seed", "5",
                   "--resume", "auto"])
    cfg = seen["cfg"]
    assert rc == 0 and cfg.train.steps == 7 and cfg.loss.clip_high == 0.3 and cfg.train.seed == 5
    assert cfg.checkpoint.resume == "auto"


def test_cli_train_config_errors_are_one_line(monkeypatch, capsys):
    assert cli.main(["train", "--loss.clip_hgh=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefix-rft train: error: unknown config key") and err.count("\n") == 1
    assert "did you mean: loss.clip_high" in err
    assert cli.main(["train", "stray"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err


def test_cli_print_config(capsys):
    assert cli.main(["train", "--print-config", "--rollout.group_size=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["group_size"] == 4 and printed["prefix"]["decay_steps"] == 500


@pytest.mark.parametrize("command,module,function", [
    ("eval", "prefix_rft.evaluate", "main"),
    ("demo", "prefix_rft.demo.run", "main"),
])
def test_cli_passes_arguments_through(monkeypatch, command, module, function):
    calls = []
    fake = types.ModuleType(module)
    setattr(fake, function, lambda argv: calls.append(argv) or 3)
    monkeypatch.setitem(sys.modules, module, fake)
    argv = ["--model", "m", "--data", "a.jsonl", "b.jsonl", "--k", "32", "--help"]
    assert cli.main([command, *argv]) == 3
    assert calls == [argv]


def test_cli_bench_default_and_named(monkeypatch, capsys):
    calls = []
    for name in ("benchmarks.cpu_kernels", "benchmarks.rollout"):
        fake = types.ModuleType(name)
        fake.main = lambda argv, n=name: calls.append((n, argv)) or [{"row": 1}]
        monkeypatch.setitem(sys.modules, name, fake)
    assert cli.main(["bench"]) == 0
    assert cli.main(["bench", "kernels", "--n", "64"]) == 0
    assert cli.main(["bench", "rollout"]) == 0
    assert calls == [("benchmarks.cpu_kernels", []), ("benchmarks.cpu_kernels", ["--n", "64"]),
                     ("benchmarks.rollout", [])]
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_cli_bench_outside_source_tree(monkeypatch, capsys):
    def missing(name, *args, **kwargs):
        raise ModuleNotFoundError(f"No module named {name!r}", name="benchmarks")

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    assert cli.main(["bench"]) == 2
    message = capsys.readouterr().err
    assert "source tree" in message and "python -m benchmarks.cpu_kernels" in message


def test_cli_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out


def test_reward_section_overrides_and_validation():
    cfg = load_config(None, ["--reward.fallback=last_number", "--reward.timeout_s=2.5"])
    assert cfg.reward.fallback == "last_number" and cfg.reward.timeout_s == 2.5
    with pytest.raises(ValueError, match="reward.fallback must be one of none|last_number"):
        load_config(None, ["--reward.fallback=first_number"])
    with pytest.raises(ValueError, match="reward.timeout_s"):
        load_config(None, ["--reward.timeout_s=0"])


def test_removed_kl_coef_is_an_unknown_key():
    with pytest.raises(ValueError, match="unknown config key 'loss.kl_coef'"):
        load_config(None, ["--loss.kl_coef=0.01"])


def test_cli_epilog_lists_every_config_section():
    line = next(ln for ln in cli.TRAIN_EPILOG.splitlines() if "Sections:" in ln)
    assert line.split("Sections:")[1].split() == list(SECTIONS)
