"""rewards/registry.py's loading rules, called directly: names, paths, re-registration, and the messages people see.

The registry is process-wide, so every name registered here starts with `test_registry_` and every user module gets a
name of its own."""

import importlib.util
import os
import sys

import pytest

from thinkzero.rewards import registry, reward


def _write(path, text):
    path.write_text(text)
    return path


# --- names ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "a:b", None, 3])
def test_reward_name_must_be_a_plain_string(name):
    with pytest.raises(ValueError, match=f"reward name must be a non-empty string without ':', got {name!r}"):
        reward(name)


def test_registering_marks_the_function_and_lists_it():
    @reward("test_registry_marked", batched=True)
    def marked(completions):
        return [0.0] * len(completions)

    assert marked.__reward_name__ == "test_registry_marked" and marked.__reward_batched__ is True
    entry = registry.get("test_registry_marked")
    assert entry.fn is marked and entry.batched
    assert entry.where == f"{__name__}:test_registering_marks_the_function_and_lists_it.<locals>.marked"
    assert entry.file == os.path.abspath(__file__)
    names = registry.list_rewards()
    assert names == sorted(names) and {"test_registry_marked", "math_accuracy", "format"} <= set(names)


def test_a_second_function_under_a_taken_name_is_refused():
    @reward("test_registry_taken")
    def first(completion):
        return 1.0

    def second(completion):
        return 2.0

    where = f"{__name__}:test_a_second_function_under_a_taken_name_is_refused.<locals>"
    with pytest.raises(ValueError) as err:
        reward("test_registry_taken")(second)
    assert str(err.value) == (f"reward name 'test_registry_taken' is already registered by {where}.first; "
                              f"pick another name for {where}.second")
    assert registry.get("test_registry_taken").fn is first


def test_the_same_definition_imported_again_re_registers(tmp_path):
    # A script run as __main__ and imported again by a worker: same file and qualname, another module name.
    path = _write(tmp_path / "twice_rewards.py", "from thinkzero.rewards import reward\n"
                                                 "@reward('test_registry_twice')\n"
                                                 "def twice(completion):\n"
                                                 "    return 1.0\n")
    registry.load_module(str(path))
    first = registry.get("test_registry_twice")
    spec = importlib.util.spec_from_file_location("test_registry_twice_again", path)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)
    second = registry.get("test_registry_twice")
    assert second.fn is again.twice and second.fn is not first.fn
    assert (second.module, first.module) == ("test_registry_twice_again", first.module)
    assert second.file == first.file == str(path)


def test_unknown_name_hints_the_closest_one_and_how_to_load_by_path():
    with pytest.raises(KeyError) as err:
        registry.get("tag_cuont")
    message = err.value.args[0]
    assert message.startswith("unknown reward 'tag_cuont'. Did you mean 'tag_count'? Registered rewards: ")
    assert message.endswith("A function of your own loads by path: 'package.module:function' or "
                            "'/path/to/file.py:function'.")
    with pytest.raises(KeyError) as err:
        registry.get("zzzzzzzz")
    assert "Did you mean" not in err.value.args[0]


# --- paths ----------------------------------------------------------------------------------------------------------

def test_resolve_tells_names_from_paths():
    assert registry.resolve("math_accuracy") is registry.get("math_accuracy")
    # A decorated function loaded by path is its registered entry.
    assert registry.resolve("thinkzero.rewards.format:format_reward") is registry.get("format")
    # A bare Windows drive ('C:') is a name, not a module path: it fails as an unknown name.
    with pytest.raises(KeyError, match="unknown reward 'C:'"):
        registry.resolve("C:")


@pytest.mark.parametrize("path", [":fn", "some.module:"])
def test_bad_path_spec(path):
    with pytest.raises(ValueError) as err:
        registry.load_function(path)
    assert str(err.value) == (f"reward path {path!r} must look like 'package.module:function' or "
                              "'/path/file.py:function'")


def test_module_function_path_needs_no_registration(tmp_path, monkeypatch):
    package = tmp_path / "test_registry_pkg"
    package.mkdir()
    _write(package / "__init__.py", "")
    _write(package / "mod.py", "def per_sample(completion, answer):\n    return 1.0\n"
                               "def batch(completions, prompts):\n    return [1.0] * len(completions)\n"
                               "class Holder:\n    @staticmethod\n    def inner(completion):\n        return 0.0\n"
                               "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    one = registry.load_function("test_registry_pkg.mod:per_sample")
    assert (one.name, one.batched, one.module, one.qualname) == ("per_sample", False, "test_registry_pkg.mod",
                                                                 "per_sample")
    assert one.file == str(package / "mod.py")
    batch = registry.load_function("test_registry_pkg.mod:batch")
    assert batch.batched  # it has a `completions` parameter
    inner = registry.load_function("test_registry_pkg.mod:Holder.inner")
    assert inner.qualname == "Holder.inner" and inner.fn("x") == 0.0
    with pytest.raises(TypeError) as err:
        registry.load_function("test_registry_pkg.mod:NOT_A_FUNCTION")
    assert str(err.value) == "reward 'test_registry_pkg.mod:NOT_A_FUNCTION' is a int, not a function"
    with pytest.raises(ImportError) as err:
        registry.load_function("test_registry_pkg.mod:absent")
    assert str(err.value) == ("module 'test_registry_pkg.mod' has no function 'absent' (reward "
                              "'test_registry_pkg.mod:absent'); it defines: per_sample, batch, Holder")
    assert "test_registry_pkg.mod" not in registry.list_rewards()


def test_file_path_loads_under_a_private_module_name_once(tmp_path):
    path = _write(tmp_path / "rewards.py", "CALLS = []\nCALLS.append(1)\n"
                                           "def shout(completion):\n    return float(completion.isupper())\n")
    entry = registry.load_function(f"{path}:shout")
    assert entry.module.startswith("_thinkzero_reward_rewards_") and entry.module != "rewards"
    assert entry.file == str(path) and entry.where == f"{entry.module}:shout"
    again = registry.load_function(f"{path}:shout")
    assert again.fn is entry.fn and sys.modules[entry.module].CALLS == [1]  # imported once
    # The same stem in another folder is another module.
    (tmp_path / "sub").mkdir()
    other = _write(tmp_path / "sub" / "rewards.py", "def shout(completion):\n    return 0.0\n")
    assert registry.load_function(f"{other}:shout").module != entry.module


def test_a_file_that_fails_to_import_can_be_fixed_and_loaded(tmp_path):
    path = _write(tmp_path / "fixable.py", "raise RuntimeError('half written')\n")
    with pytest.raises(ImportError) as err:
        registry.load_function(f"{path}:fn")
    assert str(err.value) == (f"could not import the module of reward '{path}:fn': RuntimeError: half written")
    _write(path, "def fn(completion):\n    return 1.0\n")
    assert registry.load_function(f"{path}:fn").fn("x") == 1.0


def test_load_module_messages(tmp_path):
    with pytest.raises(ImportError) as err:
        registry.load_module(str(tmp_path / "absent.py"))
    assert str(err.value) == (f"could not import reward module '{tmp_path / 'absent.py'}': ImportError: "
                              f"reward file '{tmp_path / 'absent.py'}' does not exist")
    with pytest.raises(ImportError, match="could not import reward module 'test_registry_no_such_module': "
                                          "ModuleNotFoundError"):
        registry.load_module("test_registry_no_such_module")


def test_loaded_function_with_an_unusable_signature_is_refused(tmp_path):
    path = _write(tmp_path / "unusable.py", "def judge(text, answer):\n    return 1.0\n")
    with pytest.raises(TypeError) as err:
        registry.load_function(f"{path}:judge")
    assert str(err.value).startswith("reward 'judge' (")
    assert str(err.value).endswith(":judge) has no `completion` parameter. "
                                   "Expected e.g. def f(completion, answer) -> float | None")


# --- finding a function again in a worker ---------------------------------------------------------------------------

def test_load_in_worker_by_module_then_by_file(tmp_path):
    path = _write(tmp_path / "worker_rewards.py", "def fn(completion):\n    return 7.0\n")
    entry = registry.load_function(f"{path}:fn")
    # A private module name is never imported by name: the function comes from its file.
    assert registry.load_in_worker(entry.module, "fn", entry.file) is entry.fn
    # A module that cannot be imported by name falls back to the file.
    assert registry.load_in_worker("test_registry_gone_module", "fn", str(path))("x") == 7.0
    assert registry.load_in_worker("thinkzero.rewards.format", "format_reward", None) \
        is registry.get("format").fn
    with pytest.raises(ModuleNotFoundError):
        registry.load_in_worker("test_registry_gone_module", "fn", None)
    with pytest.raises(ImportError) as err:
        registry.load_in_worker("__main__", "fn", None)
    assert str(err.value) == "cannot load __main__:fn in a worker: its source file is unknown"


# --- binding --------------------------------------------------------------------------------------------------------

def test_bind_takes_params_then_facts_then_columns():
    @reward("test_registry_bind")
    def scored(completion, answer, num_tokens, weight, style="worked", **extra):
        return 0.0

    binding = registry.bind(registry.get("test_registry_bind"), {"weight": 2}, columns=["answer", "question"])
    assert binding.params == {"weight": 2}
    assert binding.facts == (("num_tokens", "num_tokens"),)
    assert binding.columns == (("answer", "answer", True),)  # `style` is no column and has a default
    assert binding.all_inputs


def test_bind_refuses_positional_only_parameters():
    @reward("test_registry_positional")
    def positional(completion, answer, /):
        return 0.0

    with pytest.raises(TypeError) as err:
        registry.bind(registry.get("test_registry_positional"), {})
    assert str(err.value).endswith("parameter 'answer' is positional-only; rewards are called with keyword arguments")
