"""The scorer: weighting, None, isolation of broken functions in worker processes, loading user functions."""

import math
import os
import pathlib
import subprocess
import sys
import threading
import time
import warnings

import pytest

from thinkzero.rewards import RewardSpec, RewardWarning, Scorer, registry, reward


@reward("test_exact")
def exact(completion: str, answer: str) -> float:
    return float(completion == answer)


@reward("test_unsure")
def unsure(completion: str) -> float | None:
    return None if completion == "?" else 0.5


@reward("test_raises")
def raises(completion: str) -> float:
    if "boom" in completion:
        raise ValueError("boom happened")
    return 1.0


@reward("test_sleeps")
def sleeps(completion: str) -> float:
    if "hang" in completion:
        time.sleep(3600)
    return 1.0


@reward("test_bad_values")
def bad_values(completion: str):
    return {"nan": math.nan, "inf": math.inf, "text": "high", "list": [1.0]}.get(completion, 1.0)


@reward("test_dies")
def dies(completion: str) -> float:
    if completion == "die":
        os._exit(3)
    return 1.0


@reward("test_short_batch", batched=True)
def short_batch(completions: list[str], **kwargs) -> list[float]:
    return [1.0] * (len(completions) - 1)


@reward("test_batch", batched=True)
def batch(completions: list[str], answer: list[str], prompts: list[str]) -> list[float]:
    return [float(c == a) + 0.25 * (p == "P") for c, a, p in zip(completions, answer, prompts)]


@reward("test_facts")
def facts(completion: str, num_tokens: int, finish_reason: str, scale: float = 1.0) -> float:
    return scale * num_tokens + (100.0 if finish_reason == "length" else 0.0)


def undecorated_batched(completions, answer):
    return [float(len(c) == len(a)) for c, a in zip(completions, answer)]


def undecorated(completion, answer):
    return 2.0


BROKEN = ["test_raises", "test_sleeps", "test_bad_values", "test_dies", "test_short_batch"]


@pytest.fixture(scope="module")
def scorer():
    specs = [RewardSpec("test_exact", weight=2.0), RewardSpec("test_unsure", weight=1.0)]
    specs += [RewardSpec(name, weight=1.0) for name in BROKEN]
    s = Scorer(specs, num_workers=2, timeout_s=1.0, fallback=-1.0, columns=["answer"])
    yield s
    s.close()


def test_weighted_total_and_none(scorer):
    completions = ["a", "b", "?"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may fail
        with pytest.raises(RewardWarning):  # ...except the batched function that always returns one value short
            scorer.score(completions, {"answer": ["a", "x", "?"]})
    result = scorer.score(completions, {"answer": ["a", "x", "?"]})
    assert result.per_function["test_exact"] == [1.0, 0.0, 1.0]
    assert result.per_function["test_unsure"] == [0.5, 0.5, None]
    assert result.per_function["test_short_batch"] == [None, None, None]
    # total = 2*exact + unsure(None -> fallback -1) + raises 1 + sleeps 1 + bad 1 + dies 1 + short_batch(-1)
    assert result.total == [2 + 0.5 + 4 - 1, 0 + 0.5 + 4 - 1, 2 - 1 + 4 - 1]
    assert result.means()["test_unsure"] == 0.5
    assert result.failures["test_short_batch"] == {"wrong_length": 3}
    assert sum(result.failures["test_exact"].values()) == 0


def test_broken_functions_are_contained(scorer):
    completions = ["fine", "boom", "hang", "nan", "inf", "text", "list", "die", "fine"]
    answers = ["fine"] * len(completions)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = scorer.score(completions, {"answer": answers})
    elapsed = time.perf_counter() - start
    assert elapsed < 15
    f = result.failures
    assert f["test_raises"] == {"exception": 1}
    assert f["test_sleeps"] == {"timeout": 1}
    assert f["test_bad_values"] == {"non_finite": 2, "wrong_type": 2}
    assert f["test_dies"] == {"crash": 1}
    assert f["test_short_batch"] == {"wrong_length": len(completions)}
    assert result.per_function["test_raises"][1] is None
    assert result.per_function["test_sleeps"][2] is None
    assert result.per_function["test_sleeps"][0] == 1.0 and result.per_function["test_sleeps"][8] == 1.0
    assert result.per_function["test_exact"] == [1.0] + [0.0] * 7 + [1.0]
    messages = [str(w.message) for w in caught if issubclass(w.category, RewardWarning)]
    for name, kind in [("test_raises", "exception"), ("test_sleeps", "timeout"), ("test_bad_values", "non_finite"),
                       ("test_bad_values", "wrong_type"), ("test_dies", "crash")]:
        assert sum(f"'{name}': {kind}" in m for m in messages) == 1, (name, kind, messages)
    assert any("boom happened" in m for m in messages)
    # The hung sample: fallback -1 for sleeps, the others fine; exact 0 (answer 'fine' != 'hang').
    assert result.total[2] == 0 + 0.5 + 1 - 1 + 1 + 1 - 1

    # Once per (function, kind): a second round warns about nothing new, but still counts.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = scorer.score(["boom", "hang"], {"answer": ["x", "y"]})
    assert not [w for w in caught if issubclass(w.category, RewardWarning)]
    assert again.failures["test_raises"] == {"exception": 1}
    assert again.failures["test_sleeps"] == {"timeout": 1}


def test_timeout_works_off_the_main_thread(scorer):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", scorer.score(["hang", "ok"], {"answer": ["", ""]})))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        thread.start()
        thread.join(timeout=20)
    assert not thread.is_alive()
    assert out["r"].failures["test_sleeps"] == {"timeout": 1}
    assert out["r"].per_function["test_sleeps"][1] == 1.0


@reward("test_always_hangs")
def always_hangs(completion: str) -> float:
    time.sleep(3600)
    return 1.0


def test_a_function_that_always_hangs_costs_about_two_timeouts_per_call_then_is_disabled():
    # One worker, 8 samples, timeout 1 s: one call per sample would wait 8 s; the shared deadline ends it after ~2 s
    # (plus a worker restart). After max_consecutive_timeouts=2 all-timeout scorings the function is off.
    specs = [RewardSpec("test_always_hangs"), RewardSpec("test_exact")]
    completions, answers = ["a"] * 8, ["a"] * 8
    with Scorer(specs, num_workers=1, timeout_s=1.0, max_consecutive_timeouts=2, columns=["answer"]) as s:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                start = time.perf_counter()
                result = s.score(completions, {"answer": answers})
                assert time.perf_counter() - start < 2 * 1.0 + 3.0  # 2 x timeout_s + a worker restart or two
                assert result.failures["test_always_hangs"] == {"timeout": 8}
                assert result.per_function["test_exact"] == [1.0] * 8  # the healthy function still scores
        disabled = [w for w in caught if "DISABLED" in str(w.message)]
        assert len(disabled) == 1 and "'test_always_hangs'" in str(disabled[0].message)
        assert s.disabled == {"test_always_hangs"}
        start = time.perf_counter()
        result = s.score(completions, {"answer": answers})
        assert time.perf_counter() - start < 1.0  # the hung function is no longer called
        assert result.per_function["test_always_hangs"] == [None] * 8
        assert sum(result.failures["test_always_hangs"].values()) == 0
        assert result.total == [1.0] * 8  # fallback 0 + exact 1


def test_one_hung_sample_does_not_disable_or_cost_the_others(scorer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):  # more than max_consecutive_timeouts (3): one hang among finished calls resets the streak
            result = scorer.score(["hang", "ok", "ok", "ok"], {"answer": ["", "", "", ""]})
            assert result.failures["test_sleeps"] == {"timeout": 1}
            assert result.per_function["test_sleeps"][1:] == [1.0, 1.0, 1.0]
    assert not scorer.disabled


def test_many_samples_spread_over_workers(scorer):
    n = 256
    completions = [str(i) for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer.score(completions[:4], {"answer": completions[:4]})  # warm
        start = time.perf_counter()
        result = scorer.score(completions, {"answer": completions})
    assert result.per_function["test_exact"] == [1.0] * n
    assert time.perf_counter() - start < 2.0


def test_batched_facts_params_and_in_process_mode():
    specs = [RewardSpec("test_batch"), RewardSpec("test_facts", params={"scale": 2.0}),
             RewardSpec(f"{__name__}:undecorated_batched"), RewardSpec(f"{__name__}:undecorated", weight=0.5)]
    s = Scorer(specs, num_workers=0, timeout_s=1.0)
    r = s.score(["a", "bb"], {"answer": ["a", "cc"]},
                {"prompt": ["P", "Q"], "completion_ids": [[1, 2, 3], [4]], "finish_reason": ["stop", "length"]})
    assert r.per_function["test_batch"] == [1.25, 0.0]
    assert r.per_function["test_facts"] == [6.0, 102.0]  # num_tokens derived from completion_ids
    assert r.per_function["undecorated_batched"] == [1.0, 1.0]
    assert r.per_function["undecorated"] == [2.0, 2.0]
    assert r.total == [1.25 + 6 + 1 + 1, 0 + 102 + 1 + 1]
    with pytest.warns(RewardWarning, match="'test_raises': exception"):
        r = Scorer(["test_raises"] and [RewardSpec("test_raises")], num_workers=0).score(["boom"])
    assert r.failures["test_raises"] == {"exception": 1}


def test_user_file_loads_in_worker(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def shouting(completion):\n    return float(completion.isupper())\n")
    s = Scorer([{"name": f"{path}:shouting", "weight": 3.0}], num_workers=1, timeout_s=5.0)
    try:
        r = s.score(["HEY", "hey"])
    finally:
        s.close()
    assert r.per_function["shouting"] == [1.0, 0.0]
    assert r.total == [3.0, 0.0]


# --- errors people see -------------------------------------------------------------------------------------------

def test_unknown_reward_lists_registered():
    with pytest.raises(KeyError, match="unknown reward 'math_acuracy'.*Did you mean 'math_accuracy'.*format"):
        registry.get("math_acuracy")
    with pytest.raises(KeyError, match="Registered rewards: .*math_accuracy"):
        Scorer([RewardSpec("nope")], num_workers=0)


def test_bad_user_module_paths(tmp_path):
    with pytest.raises(ImportError, match="could not import the module of reward 'no_such_pkg.mod:fn'.*No module"):
        Scorer([RewardSpec("no_such_pkg.mod:fn")], num_workers=0)
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_module\n")
    with pytest.raises(ImportError, match="could not import.*broken.py:fn.*not_a_real_module"):
        Scorer([RewardSpec(f"{broken}:fn")], num_workers=0)
    with pytest.raises(ImportError, match="has no function 'missing'.*it defines: .*undecorated"):
        Scorer([RewardSpec(f"{__name__}:missing")], num_workers=0)
    with pytest.raises(ImportError, match="does not exist"):
        Scorer([RewardSpec(f"{tmp_path}/absent.py:fn")], num_workers=0)


def test_unusable_signatures():
    def no_completion(text, answer):
        return 1.0

    with pytest.raises(TypeError, match="has no `completion` parameter"):
        reward("test_no_completion")(no_completion)
    with pytest.raises(TypeError, match="has no `completions` parameter.*it has `completion`.*batched=False"):
        reward("test_wrong_batched", batched=True)(exact)
    with pytest.raises(TypeError, match=r"needs 'answer', which is not a dataset column \(columns: question\)"):
        Scorer([RewardSpec("test_exact")], num_workers=0, columns=["question"])
    with pytest.raises(TypeError, match="does not take param\\(s\\) 'strictt'; it takes: prompt_text, strict"):
        Scorer([RewardSpec("format", params={"strictt": True})], num_workers=0)
    with pytest.raises(TypeError, match="needs 'max_length'.*or a param of this reward"):
        Scorer([RewardSpec("soft_overlong", params={"buffer": 4})], num_workers=0, columns=["answer"])


def test_bad_specs_and_inputs():
    with pytest.raises(ValueError, match="unknown key 'wieght'.*did you mean 'weight'"):
        RewardSpec.from_dict({"name": "format", "wieght": 1.0})
    with pytest.raises(ValueError, match="listed more than once; give each an `alias`"):
        Scorer([RewardSpec("format"), RewardSpec("format", params={"strict": False})], num_workers=0)
    Scorer([RewardSpec("format"), RewardSpec("format", params={"strict": False}, alias="format_soft")],
           num_workers=0)
    s = Scorer([RewardSpec("test_exact")], num_workers=0)
    with pytest.raises(ValueError, match="needs column 'answer'; columns given: \\['question'\\]"):
        s.score(["a"], {"question": ["q"]})
    with pytest.raises(ValueError, match="has 2 values for 1 completions"):
        s.score(["a"], {"answer": ["a", "b"]})
    with pytest.raises(ValueError, match="needs rollout fact 'num_tokens'"):
        Scorer([RewardSpec("test_facts")], num_workers=0).score(["a"], facts={"finish_reason": ["stop"]})
    with pytest.raises(ValueError, match="'fork' is not allowed"):
        Scorer([RewardSpec("test_exact")], num_workers=1, start_method="fork")


def test_name_clash_is_an_error():
    def other(completion):
        return 0.0

    with pytest.raises(ValueError, match="'test_exact' is already registered by .*exact"):
        reward("test_exact")(other)


def test_reward_defined_in_a_script_runs_in_workers(tmp_path):
    script = tmp_path / "train_like.py"
    script.write_text(
        "from thinkzero.rewards import RewardSpec, Scorer, reward\n"
        "@reward('script_len')\n"
        "def script_len(completion):\n"
        "    return float(len(completion))\n"
        "if __name__ == '__main__':\n"
        "    with Scorer([RewardSpec('script_len')], num_workers=1, timeout_s=5.0) as s:\n"
        "        print(s.score(['abc', 'de']).total)\n"
    )
    repo = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(repo)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[3.0, 2.0]"


def test_empty_batch():
    r = Scorer([RewardSpec("test_exact")], num_workers=0).score([], {"answer": []})
    assert r.total == [] and r.per_function == {"test_exact": []}


def test_user_module_of_registered_rewards_loads_in_worker(tmp_path):
    path = tmp_path / "team_rewards.py"
    path.write_text("from thinkzero.rewards import reward\n"
                    "@reward('test_team_len')\n"
                    "def team_len(completion, answer):\n"
                    "    return float(len(completion) == len(answer))\n")
    registry.load_module(str(path))
    assert "test_team_len" in registry.list_rewards()
    with Scorer([RewardSpec("test_team_len")], num_workers=1, timeout_s=5.0) as s:
        assert s.score(["ab", "abc"], {"answer": ["xy", "x"]}).per_function["test_team_len"] == [1.0, 0.0]
    with pytest.raises(ImportError, match="could not import reward module 'no_such_team.rewards'"):
        registry.load_module("no_such_team.rewards")
