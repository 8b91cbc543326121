"""Tokenizer: char-level round trips, files on disk, special tokens, chat templates (ours vs transformers')."""

import json

import pytest

from thinkzero.model.tokenizer import build_char_tokenizer, load_tokenizer

TEXT = "Question: 12 * (3 + 4) = ?\n\tAnswer:  <think>84</think>  \n\n~`{}|\\'\"end "


def test_char_round_trip_exact_including_whitespace():
    tok = build_char_tokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT)  # one id per character
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == 101
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_char_vocab_padded_with_real_characters():
    tok = build_char_tokenizer(vocab_size=300)
    assert tok.vocab_size == 300
    extra = "".join(tok.backend.id_to_token(i) for i in range(101, 300))
    assert len(extra) == 199  # every padded id is one printable character
    assert tok.decode(tok.encode(extra)) == extra
    with pytest.raises(ValueError, match="needs vocab_size >= 101, got 50"):
        build_char_tokenizer(vocab_size=50)


def test_special_tokens_in_text_and_skipping_them():
    tok = build_char_tokenizer()
    ids = tok.encode("<bos>hi<eos>")
    assert ids == [1, tok.encode("h")[0], tok.encode("i")[0], 2]
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(tok.encode("é")) == "<unk>"  # outside the vocabulary


def test_save_and_load_round_trip(tmp_path):
    tok = build_char_tokenizer(vocab_size=128)
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TEXT) == tok.encode(TEXT)
    assert loaded.decode(loaded.encode(TEXT)) == TEXT
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id, loaded.vocab_size) == (2, 0, 1, 128)
    messages = [{"role": "user", "content": "1+1?"}]
    assert loaded.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_char_chat_template_rendering():
    tok = build_char_tokenizer()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}]
    assert tok.apply_chat_template(messages) == "<bos>user: 2+2?\nassistant: 4<eos>\nuser: 3+3?\nassistant: "
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=False) == "<bos>user: 2+2?\n"


# A template in the style of Hugging Face chat templates: namespace, loop controls, raise_exception, tojson.
TEMPLATE = """{% set ns = namespace(system='') %}
{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endif %}{% endfor %}
{{ bos_token }}{{ ns.system }}
{% for m in messages %}
{% if m['role'] == 'system' %}{% continue %}{% endif %}
{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}
{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}{{ eos_token }}
{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson }}{% endif %}
{% if add_generation_prompt %}<|Assistant|><think>
{% endif %}"""


def write_hf_style_dir(path):
    """A tokenizer directory as Hugging Face writes it: AddedToken dicts, a chat template, added tokens."""
    tok = build_char_tokenizer()
    from tokenizers import AddedToken

    tok.backend.add_special_tokens([AddedToken("<|User|>", special=True), AddedToken("<|Assistant|>", special=True)])
    tok.save(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<bos>", "lstrip": False, "normalized": True,
                           "rstrip": False, "single_word": False}
    config["eos_token"] = {"__type": "AddedToken", "content": "<eos>"}
    del config["pad_token"]
    config["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_hf_style_directory_added_token_dicts_and_no_pad(tmp_path):
    write_hf_style_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.pad_token_id == 2  # no pad token: falls back to eos
    assert tok.vocab_size == 103
    assert tok.encode("<|User|>")[0] == 101


def test_template_rendering_and_errors(tmp_path):
    write_hf_style_dir(tmp_path)
    tok = load_tokenizer(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(messages) == (
        "<bos>Be brief.\n<|User|>hi\n<|Assistant|>hello<eos>\n<|User|>2+2?\n<|Assistant|><think>\n"
    )
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=False, tools=[{"name": "é"}]) == (
        '<bos>Be brief.\n<|User|>hi\n[{"name": "é"}]'
    )
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="sandbox forbids"):  # sandboxed: templates cannot mutate their inputs
        tok.chat_template = "{{ messages.append(1) }}"
        tok._compiled_template = None
        tok.apply_chat_template(messages)


def test_missing_template_and_bad_files(tmp_path):
    tok = build_char_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>"}))
    with pytest.raises(ValueError, match="eos_token '</s>' from the tokenizer config is not in the vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot parse tokenizer"):
        load_tokenizer(tmp_path)


def test_chat_template_jinja_file_is_read(tmp_path):
    build_char_tokenizer().save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "q"}]) == "<bos>q"


def test_same_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_style_dir(tmp_path)
    ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.encode(TEXT, add_special_tokens=False) == ours.encode(TEXT)
    assert theirs.decode(ours.encode(TEXT)) == TEXT
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a b"},
                {"role": "assistant", "content": "c\nd"}, {"role": "user", "content": "e"}]
    for add in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == theirs.apply_chat_template(
            messages, add_generation_prompt=add, tokenize=False)
