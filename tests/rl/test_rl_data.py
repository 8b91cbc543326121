"""Dataset loading from local sources, templates, tokenisation limits and the prompt sampler's exact resume."""

import json

import datasets
import pytest

from thinkzero.rl.data import (
    R1_ZERO_TEMPLATE,
    DataError,
    PromptSampler,
    load_rows,
    prepare_examples,
    render_prompt,
)

ROWS = [{"question": f"q{i}?", "answer": f"#### {i}", "level": i % 3} for i in range(10)]


class CharTokenizer:
    """One id per character; a chat template that marks roles."""

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def _write(tmp_path, fmt):
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_local_files_by_extension(tmp_path, fmt):
    rows = load_rows(str(_write(tmp_path, fmt)))
    assert len(rows) == 10
    assert rows[3]["question"] == "q3?" and rows[3]["answer"] == "#### 3"


def test_directory_glob_and_saved_dataset(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for k in range(2):
        (d / f"p{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[k * 5:(k + 1) * 5]))
    assert len(load_rows(str(d))) == 10
    assert len(load_rows(str(d / "p*.jsonl"))) == 10

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    assert len(load_rows(str(saved))) == 10
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(saved_dict))
    assert len(load_rows(str(saved_dict), split="test")) == 2
    with pytest.raises(DataError, match="has no split 'validation'; splits: train, test"):
        load_rows(str(saved_dict), split="validation")


def test_hub_name_goes_to_load_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "ds")
    assert load_rows("openai/gsm8k", "main", split="train") == "ds"
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"})]


def test_missing_local_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_rows("data/nope.parquet")


def test_templates():
    r1 = render_prompt("What is 2+2", "r1_zero")
    assert r1.startswith("A conversation between User and Assistant.")
    assert r1.endswith("User: What is 2+2. Assistant: <think>")
    assert "<think> </think> and <answer> </answer> tags" in R1_ZERO_TEMPLATE
    assert render_prompt("x", "Q: {prompt} {not_a_field}\nA:") == "Q: x {not_a_field}\nA:"
    tok = CharTokenizer()
    assert render_prompt("x", "chat", tok) == "<user>x</user><assistant>"
    assert render_prompt("x", "chat", tok, "be brief") == "<system>be brief</system><user>x</user><assistant>"
    with pytest.raises(DataError, match="needs a tokenizer with apply_chat_template"):
        render_prompt("x", "chat", object())
    with pytest.raises(DataError, match="containing {prompt}"):
        render_prompt("x", "no placeholder")


def test_prepare_examples_keeps_columns_and_drops_long_prompts(tmp_path):
    rows = load_rows(str(_write(tmp_path, "jsonl")))
    rows = rows.add_column("long", [i == 7 for i in range(10)])
    rows = rows.map(lambda r: {"question": r["question"] * (30 if r["long"] else 1)})
    examples, dropped = prepare_examples(rows, CharTokenizer(), prompt_column="question", answer_column="answer",
                                         template="Q: {prompt}", max_prompt_length=20)
    assert dropped == 1 and len(examples) == 9
    ex = examples[2]
    assert ex["prompt"] == "q2?" and ex["answer"] == "#### 2" and ex["level"] == 2 and ex["question"] == "q2?"
    assert ex["prompt_text"] == "Q: q2?"
    assert ex["prompt_ids"] == [ord(c) for c in "Q: q2?"]


def test_prepare_examples_errors():
    tok = CharTokenizer()
    with pytest.raises(DataError, match="prompt column 'prompt' not found; the dataset has columns: question, "
                                        "answer, level"):
        prepare_examples(ROWS, tok)
    with pytest.raises(DataError, match="answer column 'solution' not found"):
        prepare_examples(datasets.Dataset.from_list(ROWS), tok, prompt_column="question", answer_column="solution")
    with pytest.raises(DataError, match="the dataset is empty"):
        prepare_examples(datasets.Dataset.from_dict({"prompt": [], "answer": []}), tok)
    with pytest.raises(DataError, match="all 10 prompts are longer than max_prompt_length=5"):
        prepare_examples(ROWS, tok, prompt_column="question", max_prompt_length=5)
    # no answer column at all is allowed
    examples, _ = prepare_examples(ROWS, tok, prompt_column="question", answer_column=None)
    assert "answer" in examples[0]  # the dataset's own column, passed through


def test_sampler_epochs_cover_everything_and_reshuffle():
    sampler = PromptSampler(list(range(10)), 4, seed=1)
    drawn = [x for _ in range(5) for x in sampler.next_batch()]  # 20 = two epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]  # fresh permutation per epoch
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 10
    again = PromptSampler(list(range(10)), 4, seed=1)
    assert [x for _ in range(5) for x in again.next_batch()] == drawn  # seed alone fixes the order
    other = PromptSampler(list(range(10)), 4, seed=2)
    assert [x for _ in range(5) for x in other.next_batch()] != drawn
    assert PromptSampler(list(range(10)), 4, shuffle=False).next_batch() == [0, 1, 2, 3]


def test_sampler_resume_is_exact():
    straight = PromptSampler(list(range(7)), 3, seed=5)
    expected = [straight.next_batch() for _ in range(6)]
    first = PromptSampler(list(range(7)), 3, seed=5)
    got = [first.next_batch() for _ in range(2)]
    got.append(first.draw(2) + [None])  # dynamic sampling's extra draw moves the stream too
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = PromptSampler(list(range(7)), 3, seed=5)
    resumed.load_state_dict(state)
    rest = [resumed.next_batch() for _ in range(3)]
    flat_expected = [x for b in expected for x in b]
    flat_got = [x for b in got for x in b if x is not None] + [x for b in rest for x in b]
    assert flat_got == flat_expected[:len(flat_got)]
    with pytest.raises(ValueError, match="saved for 7 examples with seed 5; this run has 8 examples"):
        PromptSampler(list(range(8)), 3, seed=5).load_state_dict(state)


def test_sampler_shards_are_disjoint_slices_of_the_global_batch():
    data = list(range(12))
    single = PromptSampler(data, 4, seed=3)
    ranks = [PromptSampler(data, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        global_batch = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert parts[0] + parts[1] == global_batch  # rank 0 gets the first half, rank 1 the second
        assert not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="3 prompts cannot be split evenly over 2 processes"):
        ranks[0].draw(3)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        PromptSampler(data, 3, world_size=2)
