"""Recipe loading: overrides, type checks, unknown keys, cross-field validation, secrets."""

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from thinkzero.rl.config import (
    Config,
    ConfigError,
    check_world_size,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    is_secret_key,
    load_config,
    load_recipe,
)
from thinkzero.rl.sft import SFTConfig

BASE = ["model.name_or_path=org/model", "data.source=openai/gsm8k"]  # hub-looking ids: no path checks


def _load(*overrides, path=None, **kw):
    return load_config(path, [*BASE, *overrides], **kw)


def test_recipe_file_and_overrides(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "data": {"source": str(data), "template": "Q: {prompt}\nA:"},
        "rollout": {"num_generations": 4, "prompts_per_step": 2},
        "algorithm": {"loss_type": "gspo", "epsilon": 3e-4, "epsilon_high": 4e-4, "moe": {"routing_replay": True}},
        "rewards": {"functions": [{"name": "math_accuracy"}, {"name": "format", "weight": 0.1,
                                                              "params": {"strict": True}}]},
        "train": {"output_dir": str(tmp_path / "out")},
    }))
    cfg = load_config(recipe, ["train.max_steps=3", "optim.lr=1e-5", "rewards.functions.1.weight=0.5",
                               "logging.tags=[a, b]", "algorithm.epsilon_high=null",
                               "data.system_prompt=null", "logging.run_name=run: 1 {x}"])
    assert cfg.model.dtype == "float32"
    assert cfg.rollout.batch_size == 8  # derived: 2 prompts * 4 generations
    assert cfg.algorithm.loss_type == "gspo" and cfg.algorithm.moe.routing_replay is True
    assert cfg.algorithm.epsilon_high is None
    assert cfg.train.max_steps == 3
    assert cfg.optim.lr == 1e-5  # "1e-5" is a string to YAML 1.1; float fields accept it
    assert cfg.rewards.functions[1].weight == 0.5 and cfg.rewards.functions[1].params == {"strict": True}
    assert cfg.logging.tags == ["a", "b"]
    assert cfg.logging.run_name == "run: 1 {x}"  # str fields take the override text verbatim
    assert cfg.data.template == "Q: {prompt}\nA:" and cfg.data.system_prompt is None


def test_defaults_and_batch_size_alternative():
    cfg = _load()
    assert cfg.rollout.prompts_per_step == 4 and cfg.rollout.batch_size == 32
    cfg = _load("rollout.batch_size=16", "rollout.num_generations=4")
    assert cfg.rollout.prompts_per_step == 4 and cfg.rollout.batch_size == 16


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.num_generatons=4", "unknown config key 'rollout.num_generatons'; did you mean 'rollout.num_generations'?"),
        ("rollout.beta=0.1", "unknown config key 'rollout.beta'; did you mean 'algorithm.beta'?"),
        ("algorithm.moe.routing_replya=true", "did you mean 'algorithm.moe.routing_replay'?"),
        ("trian.max_steps=3", "unknown config key 'trian'; did you mean 'train'?"),
        ("train.zzz=3", "unknown config key 'train.zzz'; valid keys here: max_steps, seed"),
        ("logging.wandb_api_key=abc", "secrets are never read from recipes"),
        ("model.hf_token=abc", "secrets are never read from recipes"),
    ],
)
def test_unknown_keys_name_the_closest(override, message):
    with pytest.raises(ConfigError, match=_re(message)):
        _load(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=three", "config 'train.max_steps' expects int; got 'three' (str)"),
        ("train.max_steps=2.5", "config 'train.max_steps' expects int; got 2.5 (float)"),
        ("model.gradient_checkpointing=1", "config 'model.gradient_checkpointing' expects bool; got 1 (int)"),
        ("optim.lr=fast", "config 'optim.lr' expects float; got 'fast'"),
        ("rollout.stop_strings=</answer>", "config 'rollout.stop_strings' expects a list of str"),
        ("rollout.prompts_per_step=[1]", "config 'rollout.prompts_per_step' expects int | null"),
        ("rewards.functions=[{nam: x}]", "unknown config key 'rewards.functions.0.nam'; did you mean 'rewards.functions.0.name'?"),
        ("algorithm=3", "config 'algorithm' must be a mapping"),
    ],
)
def test_wrong_types(override, message):
    with pytest.raises(ConfigError, match=_re(message)):
        _load(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.loss_type=ppo", "config 'algorithm.loss_type' must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'gspo'; got 'ppo'"),
        ("algorithm.scale_rewards=std", "must be one of 'group', 'batch', 'none'"),
        ("algorithm.kl_estimator=k4", "must be one of 'k1', 'k2', 'k3'"),
        ("logging.mode=quiet", "must be one of 'online', 'offline', 'disabled'"),
        ("optim.schedule=linear", "must be one of 'constant', 'cosine'"),
    ],
)
def test_invalid_choices_list_the_choices(override, message):
    with pytest.raises(ConfigError, match=_re(message)):
        _load(override)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.num_generations=1"], "rollout.num_generations must be >= 2"),
        (["rollout.batch_size=30", "rollout.num_generations=8"],
         "rollout.batch_size (30) must be divisible by rollout.num_generations (8)"),
        (["rollout.batch_size=32", "rollout.prompts_per_step=2"], "disagrees with rollout.batch_size"),
        (["algorithm.epsilon=1.5"], "algorithm.epsilon must be in (0, 1)"),
        (["algorithm.epsilon=0"], "algorithm.epsilon must be in (0, 1)"),
        (["algorithm.epsilon_high=-0.1"], "algorithm.epsilon_high must be > 0"),
        (["algorithm.beta=-0.01"], "algorithm.beta must be >= 0"),
        (["algorithm.mini_batch_size=5"], "algorithm.mini_batch_size (5) must divide the step's batch"),
        (["algorithm.num_iterations=0"], "algorithm.num_iterations must be >= 1"),
        (["data.template=Question: {question}"], "data.template must be one of r1_zero, chat or a string containing {prompt}"),
        (["data.system_prompt=be brief"], "data.system_prompt is only used with data.template: chat"),
        (["rewards.functions=[]"], "rewards.functions must list at least one"),
        (["rewards.max_consecutive_timeouts=0"], "rewards.max_consecutive_timeouts must be >= 1; got 0"),
        (["rewards.functions=[{name: format, params: {api_key: sk-123}}]"],
         "rewards.functions.0.params.api_key: looks like a secret, and secrets are never read from recipes"),
        (["optim.betas=[0.9]"], "optim.betas must be two numbers in [0, 1)"),
        (["train.eval_every=10"], "train.eval_every > 0 needs data.eval_split"),
        (["train.dist_timeout_s=0"], "train.dist_timeout_s must be > 0 seconds; got 0"),
        (["model.name_or_path=./no/such/model"], "model.name_or_path: path './no/such/model' does not exist"),
        (["data.source=/no/such/train.jsonl"], "data.source: path '/no/such/train.jsonl' does not exist"),
        (["model.name_or_path="], "model.name_or_path is required"),
        (["train.resume=/no/such/checkpoint"], "train.resume must be 'none', 'auto' or an existing checkpoint"),
    ],
)
def test_cross_field_validation(overrides, message):
    with pytest.raises(ConfigError, match=_re(message)):
        _load(*overrides)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        _load("rollout.num_generations=1", "algorithm.beta=-1", "optim.lr=0")
    text = str(e.value)
    assert "num_generations" in text and "algorithm.beta" in text and "optim.lr" in text


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(ConfigError, match=_re(f"train.output_dir {str(f)!r} is an existing file")):
        _load(f"train.output_dir={f}")


def test_check_paths_off_allows_missing_local_paths():
    cfg = _load("model.name_or_path=./to/be/built", check_paths=False)
    assert cfg.model.name_or_path == "./to/be/built"


def test_bad_override_and_recipe(tmp_path):
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        _load("train.max_steps")
    with pytest.raises(ConfigError, match="rewards.functions is a list the recipe does not define; set it whole"):
        _load("rewards.functions.0.weight=1")
    with pytest.raises(ConfigError, match="needs an index 0..0"):
        _load("rewards.functions=[{name: a}]", "rewards.functions.3.weight=1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(bad, BASE)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")


def test_world_size_checks():
    cfg = _load("rollout.prompts_per_step=4", "rollout.num_generations=2", "algorithm.micro_batch_size=3")
    with pytest.raises(ConfigError, match=_re("rollout.prompts_per_step (4) must be divisible by the number of "
                                              "processes (3)")):
        check_world_size(cfg, 3)
    with pytest.raises(ConfigError, match="micro_batch_size .3. must divide the per-process mini-batch of 4"):
        check_world_size(cfg, 2)
    cfg.algorithm.micro_batch_size = 2
    check_world_size(cfg, 2)


def test_round_trip_and_no_secrets():
    cfg = _load("logging.tags=[x]", "rollout.max_new_tokens=64")
    d = config_to_dict(cfg)
    assert d["rollout"]["max_new_tokens"] == 64 and d["logging"]["tags"] == ["x"]
    assert config_from_dict(d) == cfg
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg
    # no field of the config is a secret, and the dict has all sections
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert not any(is_secret_key(k) for k in _all_keys(d))


def test_is_secret_key():
    for k in ("api_key", "WANDB_API_KEY", "apikey", "hf_token", "token", "client_secret", "password"):
        assert is_secret_key(k), k
    for k in ("max_new_tokens", "pad_token_id", "max_prompt_length", "num_items_in_batch", "tokenizer"):
        assert not is_secret_key(k), k


def _all_keys(d):
    for k, v in d.items():
        yield k
        if isinstance(v, dict):
            yield from _all_keys(v)


def _re(text):
    import re
    return re.escape(text) if "(" in text or "[" in text or "{" in text else text


def test_recipe_paths_resolve_next_to_the_recipe_then_the_current_dir(tmp_path, monkeypatch, capsys):
    recipe_dir = tmp_path / "recipes"
    (recipe_dir / "data").mkdir(parents=True)
    (recipe_dir / "data" / "train.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    (tmp_path / "data.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    recipe = recipe_dir / "r.yaml"
    recipe.write_text("model: {name_or_path: org/model}\n"
                      "data: {source: data/train.jsonl, eval_source: data.jsonl}\n"  # next to recipe; in cwd
                      "train: {output_dir: runs/x}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither path exists here
    with pytest.raises(ConfigError, match="data.eval_source: path 'data.jsonl' does not exist"):
        load_config(recipe)
    cfg = load_config(recipe, ["data.eval_source=null"])
    assert cfg.data.source == str(recipe_dir / "data" / "train.jsonl")
    assert cfg.train.output_dir == "runs/x"  # outputs stay relative to the current directory
    assert "data.source 'data/train.jsonl' found next to the recipe" in capsys.readouterr().err

    monkeypatch.chdir(tmp_path)  # the repo-root case: a path given relative to the current directory still works
    cfg = load_config("recipes/r.yaml")
    assert cfg.data.source == "recipes/data/train.jsonl" and cfg.data.eval_source == "data.jsonl"
    assert "data.eval_source 'data.jsonl' not found next to the recipe (recipes); using it from the current " \
           "directory" in capsys.readouterr().err


def test_duplicated_recipe_key_is_an_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: org/model}\ndata: {source: openai/gsm8k}\n"
                      "train:\n  max_steps: 3\noptim:\n  lr: 1.0e-5\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=_re("key 'train' appears twice (lines 3 and 7)")):
        load_config(recipe)
    recipe.write_text("model: {name_or_path: org/model}\ndata: {source: openai/gsm8k}\n"
                      "optim:\n  lr: 1.0e-5\n  warmup_steps: 2\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match=_re("key 'lr' appears twice (lines 4 and 6)")):
        load_config(recipe)


def _script_help(name: str, capsys) -> str:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"thinkzero_{name}_help", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--help"]) == 0
    return capsys.readouterr().out


def test_train_help_shows_types_defaults_and_comments(capsys):
    out = _script_help("train", capsys)
    assert "\ntrain:\n" in out and "\n  max_steps: 100  (int)\n" in out
    assert "\n  moe:\n    router_bias_update_gamma: 0.0  (float)" in out  # a nested section
    assert "    routing_replay: false  (bool)  # reuse the rollout's experts" in out  # the field's comment
    assert "  loss_type: dapo  ('grpo' | 'bnpo' | 'dr_grpo' | 'dapo' | 'gspo')" in out


def test_sft_help_shows_sft_defaults(capsys):
    out = _script_help("sft", capsys)
    assert "\ntrain:\n  epochs: 1  (int)\n" in out
    assert "\n  lr: 0.0001  (float)\n" in out  # SFT's own optim default, not GRPO's 1e-6
    assert "  completion_column: completion  (str)  # the worked solution the model learns to write" in out


@pytest.mark.parametrize("name, root", [("train", Config), ("sft", SFTConfig)])
def test_script_help_lists_every_recipe_key(capsys, name, root):
    out = _script_help(name, capsys)
    for section in dataclasses.fields(root):
        for f in dataclasses.fields(getattr(root(), section.name)):
            assert f"  {f.name}:" in out, f"{section.name}.{f.name} missing from {name}.py --help"

@dataclass
class _Steps:
    steps: int = 1
    note: str = ""


@dataclass
class _Root:
    run: _Steps = field(default_factory=_Steps)
    extra: _Steps = field(default_factory=_Steps)


def test_load_recipe_builds_any_root_dataclass(tmp_path):
    """The loader GRPO and SFT share: YAML + overrides onto the root it is given, whose keys the hints name."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {steps: 2}\n")
    cfg = load_recipe(_Root, recipe, ["run.note=a: {b}", "extra.steps=3"])
    assert cfg == _Root(run=_Steps(steps=2, note="a: {b}"), extra=_Steps(steps=3))  # text verbatim, ints parsed
    with pytest.raises(ConfigError, match=_re("unknown config key 'run.step'; did you mean 'run.steps'?")):
        load_recipe(_Root, recipe, ["run.step=3"])
    # Config has optim.lr, but this root does not: the hint lists this root's keys
    with pytest.raises(ConfigError, match=_re("unknown config key 'run.lr'; valid keys here: steps, note")):
        load_recipe(_Root, recipe, ["run.lr=3"])
    with pytest.raises(ConfigError, match=_re("config 'extra.steps' expects int; got 'many' (str)")):
        load_recipe(_Root, None, ["extra.steps=many"])
