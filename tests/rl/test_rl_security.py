"""Security: nothing the project ships evaluates text as code or unpickles files, weights come only from safetensors,
and secrets from the environment never reach the output directory or the console.

The source scan reads model/, rewards/, rl/ and scripts/ (not tests/, which may use transformers as a reference).
It parses the code rather than grepping it, so `model.eval()` or our own parser's `self.parse_expr()` are not
mistaken for `eval(...)` / sympy's `parse_expr(...)`.
"""

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "rewards", "rl", "scripts")
SENTINEL = "tz-sentinel-7f3a9c1e5b"

# Called by a bare name: runs text as code (eval/exec/compile), imports by a computed name, or hands text to sympy's
# parser (which evaluates it with eval).
FORBIDDEN_NAMES = {"eval", "exec", "compile", "__import__", "sympify", "parse_expr", "parse_latex", "input"}
# module.function calls that load pickles or run shell text.
FORBIDDEN_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
                   ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("marshal", "load"),
                   ("marshal", "loads"), ("shelve", "open"), ("os", "system"), ("os", "popen"),
                   ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("sympy", "sympify"),
                   ("sympy", "parse_expr")}
# Precise exceptions: (file, line text) that is allowed, with the reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("rl/checkpoint.py", "from pickle import UnpicklingError  # allowed by the security scan (tests/rl/test_rl_security.py)"):
        "the exception class a refused file raises",
    # The recipe's model.trust_remote_code opt-in (default false; loading warns when the checkpoint's code runs).
    ("rl/hf_policy.py", "model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote)"):
        "true only when the recipe opts in and the checkpoint ships code",
    ("rl/hf_policy.py", "return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))"):
        "the recipe's opt-in",
    ("rl/hf_policy.py", "return HFTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)"):
        "the recipe's opt-in",
}


def _sources():
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = path.read_text().splitlines()
    found = []

    def report(node: ast.AST, what: str) -> None:
        rel = str(path.relative_to(ROOT))
        if (rel, lines[node.lineno - 1].strip()) not in ALLOWED:
            found.append(f"{rel}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve"):
                    report(node, f"imports {name}")
            if isinstance(node, ast.ImportFrom) and {a.name for a in node.names} & FORBIDDEN_NAMES:
                report(node, f"imports {', '.join(sorted({a.name for a in node.names} & FORBIDDEN_NAMES))}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = _dotted(func)
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_NAMES:
            report(node, f"calls {func.id}()")
        if isinstance(func, ast.Attribute) and tuple(name.rsplit(".", 1)[-2:]) in FORBIDDEN_ATTRS:
            report(node, f"calls {name}()")
        if name.endswith("torch.load") or name == "load" and isinstance(func, ast.Name):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                report(node, f"{name}() without weights_only=True")
        if name.endswith(("np.load", "numpy.load")):
            flag = keywords.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                report(node, f"{name}(allow_pickle=True)")
        flag = keywords.get("trust_remote_code")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            report(node, f"{name}(trust_remote_code=...)")
        flag = keywords.get("shell")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            report(node, f"{name}(shell=...)")
    return found


def test_no_code_evaluation_no_pickle_no_remote_code():
    files = list(_sources())
    assert len(files) > 20, "the scan found too few files to mean anything"
    problems = [p for path in files for p in _problems(path)]
    assert not problems, "forbidden calls:\n" + "\n".join(problems)


def test_the_scan_catches_what_it_forbids(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch, sympy\nfrom sympy.parsing.sympy_parser import parse_expr\n"
                   "eval('1+1')\nexec('x = 1')\nsympy.sympify('x')\nparse_expr('x')\ntorch.load('f')\n"
                   "torch.load('f', weights_only=False)\nAutoModel.from_pretrained('m', trust_remote_code=True)\n"
                   "yaml.load(text)\nsubprocess.run(cmd, shell=True)\nmodel.eval()\nself.parse_expr()\n"
                   "torch.load('f', weights_only=True)\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = _problems(bad)
    assert [line.split(":")[1] for line in found] == ["1", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12"], found


def test_weights_load_only_from_safetensors(tmp_path):
    from thinkzero.model import load_model
    from thinkzero.model.checkpoint import CheckpointError
    from thinkzero.model.presets import write_random_model

    write_random_model("tiny", tmp_path, seed=0)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # a pickle file by its name
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(tmp_path)


def test_secrets_never_reach_the_output_dir_or_the_console(tmp_path, monkeypatch, capfd):
    """A short run with W&B offline and every secret-bearing variable set to a sentinel: no file written anywhere
    under the output dir (config.yaml, metrics, completions, checkpoints, the W&B run) and nothing printed holds it."""
    from tiny_recipes import arithmetic_recipe, write_recipe

    from thinkzero.rl.config import ConfigError, load_config
    from thinkzero.rl.trainer import train

    for var in ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.setenv(var, SENTINEL)
    monkeypatch.setenv("WANDB_MODE", "offline")
    path = write_recipe(arithmetic_recipe(
        tmp_path, 16, "d.jsonl",
        rollout={"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 4},
        rewards={"functions": [{"name": "math_accuracy"}], "num_workers": 0},
        algorithm={"beta": 0.0},
        train={"max_steps": 1, "output_dir": str(tmp_path / "out")},
        logging={"mode": "offline", "completions_every": 1},
    ), tmp_path / "recipe.json")
    with pytest.raises(ConfigError) as refused:  # a secret in the recipe is refused, and not echoed
        load_config(path, [f"logging.wandb_api_key={SENTINEL}"])
    assert SENTINEL not in str(refused.value)

    train(load_config(path))
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and (out / "checkpoint-000001" / "trainer_state.pt").is_file()
    leaks = [str(p.relative_to(out)) for p in files if SENTINEL.encode() in p.read_bytes()]
    assert not leaks, f"the secret was written to {leaks}"
    printed = capfd.readouterr()
    assert SENTINEL not in printed.out and SENTINEL not in printed.err
    assert os.environ["WANDB_API_KEY"] == SENTINEL  # the run did not need to touch the environment
