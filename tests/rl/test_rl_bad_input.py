"""Bad input reaching scripts/train.py: each mistake ends the run with exit status 2 and one clear paragraph on
stderr — what was wrong, where, what would be right — and no traceback.

The checks themselves are unit-tested where they live (tests/rl/test_rl_config.py, test_rl_data.py,
tests/model/test_model_checkpoint.py, test_model_config.py, tests/rewards/test_rewards_scorer.py); here they go through
the script a user runs, including the ones only the trainer can make (tokenizer vs model vocabulary)."""

import importlib.util
import json
from pathlib import Path

import pytest

from thinkzero.model.presets import write_random_model
from thinkzero.model.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _train_script():
    spec = importlib.util.spec_from_file_location("thinkzero_train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A valid tiny model, data file, reward module and recipe; each test breaks one thing."""
    root = tmp_path_factory.mktemp("bad_input")
    write_random_model("tiny", root / "model", seed=0)
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"name_or_path": str(root / "model"), "dtype": "float32"},
        "data": {"source": str(root / "train.jsonl"), "prompt_column": "question", "answer_column": "answer",
                 "template": "{prompt}\n", "max_prompt_length": 64},
        "rollout": {"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 4},
        "rewards": {"functions": [{"name": "math_accuracy"}], "num_workers": 0},
        "algorithm": {"beta": 0.0},
        "train": {"max_steps": 1, "output_dir": str(root / "out")},
        "logging": {"mode": "disabled", "console": False},
    }
    path = root / "recipe.json"
    path.write_text(json.dumps(recipe))
    return root, path, _train_script()


def _run(setup, capsys, *overrides):
    _, recipe, script = setup
    code = script.main([str(recipe), *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.num_generatons=4"], "did you mean 'rollout.num_generations'?"),
        (["train.max_steps=many"], "config 'train.max_steps' expects int; got 'many' (str)"),
        (["algorithm.loss_type=ppo"], "must be one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'gspo'; got 'ppo'"),
        (["rollout.num_generations=1"], "rollout.num_generations must be >= 2"),
        (["rollout.batch_size=5"], "rollout.batch_size (5) must be divisible by rollout.num_generations (2)"),
        (["model.name_or_path=./no/such/model"], "model.name_or_path: path './no/such/model' does not exist"),
    ],
)
def test_recipe_mistakes(setup, capsys, overrides, message):
    code, err = _run(setup, capsys, *overrides, "rollout.prompts_per_step=null")
    assert code == 2 and err.startswith("error: ") and message in err, err


def test_output_dir_that_is_a_file(setup, capsys):
    root = setup[0]
    (root / "a_file").write_text("not a directory")
    code, err = _run(setup, capsys, f"train.output_dir={root / 'a_file'}")
    assert code == 2 and "is an existing file; it must be a directory" in err, err


def test_data_mistakes(setup, capsys):
    code, err = _run(setup, capsys, "data.prompt_column=problem")
    assert code == 2 and "prompt column 'problem' not found; the dataset has columns: question, answer" in err, err
    code, err = _run(setup, capsys, "data.max_prompt_length=3")
    assert code == 2 and "all 8 prompts are longer than max_prompt_length=3" in err, err
    root = setup[0]
    (root / "empty.jsonl").write_text("")
    code, err = _run(setup, capsys, f"data.source={root / 'empty.jsonl'}")
    assert code == 2 and "empty" in err, err


def test_tokenizer_larger_than_the_model(setup, capsys):
    root = setup[0]
    build_char_tokenizer(vocab_size=200).save(root / "big_tokenizer")
    code, err = _run(setup, capsys, f"model.tokenizer={root / 'big_tokenizer'}")
    assert code == 2 and "the tokenizer has 200 tokens but the model's vocab_size is 128" in err, err


def test_unsupported_architecture(setup, capsys):
    root = setup[0]
    llama = root / "llama"
    write_random_model("tiny", llama, seed=0)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    # A non-DeepSeek model trains through transformers; our engine cannot sample it, and the recipe error says so.
    code, err = _run(setup, capsys, f"model.name_or_path={llama}")
    assert code == 2 and "rollout.engine 'thinkzero' samples DeepSeek-V2/V3 models only" in err, err
    # Forcing our implementation on it names the model_type it cannot build.
    code, err = _run(setup, capsys, f"model.name_or_path={llama}", "model.policy=thinkzero",
                     "rollout.engine=transformers")
    assert code == 2 and "llama" in err and "Traceback" not in err, err


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_weights(setup, capsys, damage):
    root = setup[0]
    broken = root / f"{damage}_model"
    write_random_model("tiny", broken, seed=0)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
    code, err = _run(setup, capsys, f"model.name_or_path={broken}")
    assert code == 2 and str(weights) in err, err


def test_reward_mistakes(setup, capsys):
    root = setup[0]
    code, err = _run(setup, capsys, "rewards.functions=[{name: math_acuracy}]")
    assert code == 2 and "unknown reward 'math_acuracy'" in err and "math_accuracy" in err, err
    assert "format" in err  # the registered rewards are listed
    (root / "broken_rewards.py").write_text("import no_such_module_anywhere\n")
    code, err = _run(setup, capsys, f"rewards.modules=[{root / 'broken_rewards.py'}]")
    assert code == 2 and "no_such_module_anywhere" in err, err
    (root / "odd_rewards.py").write_text("def odd(text):\n    return 1.0\n")
    code, err = _run(setup, capsys, f"rewards.functions=[{{name: '{root / 'odd_rewards.py'}:odd'}}]")
    assert code == 2 and "has no `completion` parameter" in err, err


def test_a_bug_in_setup_can_show_its_traceback(setup, capsys, monkeypatch):
    monkeypatch.setenv("THINKZERO_TRACEBACK", "1")
    with pytest.raises(Exception, match="did you mean 'rollout.num_generations'"):
        setup[2].main([str(setup[1]), "rollout.num_generatons=4"])


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"thinkzero_{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_and_evaluate_scripts_explain_bad_input_too(setup, capsys, tmp_path):
    root = setup[0]
    sft_recipe = tmp_path / "sft.json"
    sft_recipe.write_text(json.dumps({"model": {"name_or_path": str(root / "model")}, "trian": {}}))
    assert _script("sft").main([str(sft_recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trian" in err and "Traceback" not in err, err

    code = _script("evaluate").main([str(tmp_path / "no_model"), "--data", str(root / "train.jsonl"),
                                     "--prompt-column", "question", "--answer-column", "answer"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "no_model" in err and "Traceback" not in err, err


def _sft_recipe(setup, tmp_path) -> Path:
    root = setup[0]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps({
        "model": {"name_or_path": str(root / "model")},
        "data": {"source": str(root / "train.jsonl"), "prompt_column": "question", "completion_column": "answer"},
        "train": {"output_dir": str(tmp_path / "sft")},
        "logging": {"mode": "disabled", "console": False},
    }))
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs", "error: override 'train.epochs' must look like key.sub=value (e.g. train.max_steps=3)"),
        ("=3", "error: override '=3' must look like key.sub=value"),
        ("nosuchkey=1", "error: unknown config key 'nosuchkey'; valid keys here: model, data, optim, train, logging"),
        ("train.epochs=abc", "error: config 'train.epochs' expects int; got 'abc' (str)"),
        ("train.epochs=[1", "error: override 'train.epochs=[1': value is not valid YAML"),  # was yaml's traceback
        ("optim.weight_decay=-1", "  - optim.weight_decay must be >= 0; got -1.0"),  # was AdamW's, after loading
    ],
)
def test_sft_override_mistakes(setup, capsys, tmp_path, override, message):
    code = _script("sft").main([str(_sft_recipe(setup, tmp_path)), override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "sft").exists()  # refused before anything ran


@pytest.mark.parametrize("override", ["train.max_steps", "=3", "optim.lr=abc", "train.max_steps=[1",
                                      "optim.eps=0", "logging.completions_rows=0"])
def test_sft_and_train_word_a_mistake_alike(setup, capsys, tmp_path, override):
    """One loader and one checker per shared section: both scripts print the same paragraph (bar the heading)."""
    sft_code = _script("sft").main([str(_sft_recipe(setup, tmp_path)), override])
    sft_err = capsys.readouterr().err
    code, err = _run(setup, capsys, override)
    assert sft_code == code == 2
    assert sft_err.replace("invalid SFT config:", "invalid config:") == err, (sft_err, err)


@pytest.mark.parametrize("template", ["{{ messages.append('x') }}", "{{ ().__class__.__base__.__subclasses__() }}"])
def test_malicious_chat_template(setup, capsys, tmp_path, template):
    root = setup[0]
    tokenizer = build_char_tokenizer(vocab_size=128, chat_template=template)
    tokenizer.save(tmp_path / "evil_tokenizer")
    code, err = _run(setup, capsys, f"model.tokenizer={tmp_path / 'evil_tokenizer'}", "data.template=chat")
    assert code == 2 and "chat template tried something the sandbox forbids" in err, err
    assert err.rstrip().splitlines()[-1].startswith("error: the tokenizer's chat template"), err  # one line


def _run_unprivileged(args: list[str], cwd: Path) -> "subprocess.CompletedProcess":
    """Runs a script as a user that cannot write where the test made things read-only: as `nobody` when the tests run
    as root (root writes through chmod), else as ourselves."""
    import os
    import subprocess
    import sys

    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    env = {**os.environ, "HOME": str(cwd), "HF_HOME": str(cwd / "hf"), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*prefix, sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_evaluate_with_a_read_only_model_dir_writes_elsewhere_and_says_where(setup):
    import shutil
    import tempfile

    root = setup[0]
    shared = Path(tempfile.mkdtemp(prefix="thinkzero-ro-"))  # outside pytest's private tmp dir, which nobody can read
    try:
        shared.chmod(0o777)
        model = shared / "model"
        shutil.copytree(root / "model", model)
        shutil.copy(root / "train.jsonl", shared / "train.jsonl")
        work = shared / "work"
        work.mkdir()
        work.chmod(0o777)
        model.chmod(0o555)
        flags = ["--data", str(shared / "train.jsonl"), "--prompt-column", "question", "--answer-column", "answer",
                 "--num-samples", "0", "--max-examples", "2", "--max-new-tokens", "2", "--device", "cpu", "--quiet"]
        script = str(ROOT / "scripts" / "evaluate.py")

        done = _run_unprivileged([script, str(model), "--out", str(model / "sub" / "eval.json"), *flags], work)
        assert done.returncode == 2, done.stderr  # refused before evaluating, not after
        assert f"error: --out {model / 'sub' / 'eval.json'}: cannot write into {model / 'sub'}" in done.stderr

        done = _run_unprivileged([script, str(model), *flags], work)
        assert done.returncode == 0, done.stderr
        fallback = work / "eval-model.json"
        assert f"{model} is not writable; results will go to {fallback}" in done.stderr, done.stderr
        assert f"wrote {fallback}" in done.stdout
        assert json.loads(fallback.read_text())["summary"]["num_problems"] == 2
        assert not (model / "eval.json").exists()
    finally:
        (shared / "model").chmod(0o755)
        shutil.rmtree(shared)
