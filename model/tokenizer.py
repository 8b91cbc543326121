"""Tokenizers in the Hugging Face file format (tokenizer.json + tokenizer_config.json), via the `tokenizers` library.

`load_tokenizer(dir)` reads any fast-tokenizer directory: special tokens (plain strings or AddedToken dicts) and
the Jinja chat template, rendered in a sandbox with the variables Hugging Face templates use. `build_char_tokenizer`
makes the character-level tokenizer of our tiny models; it saves in the same format, so a tiny model directory
looks like any other and transformers' AutoTokenizer reads it too.
"""

import json
import os
import unicodedata
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers versions keep the template
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")

CHAR_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, matching model/presets.py
# Plain "role: content" turns; assistant turns end with <eos> so a model learns to stop.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"  # written as an expression: trim_blocks would eat a literal newline after a tag
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template from tokenizer_config.json."""

    def __init__(self, backend: Backend, config: dict | None = None, chat_template: str | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template if chat_template is not None else _template_from_config(self.config)
        self._compiled_template = None
        self.special_tokens = {}  # role -> token text, for roles the config defines
        for role in SPECIAL_ROLES:
            token = _token_text(self.config.get(role))
            if token is not None:
                if backend.token_to_id(token) is None:
                    raise ValueError(f"{role} {token!r} from the tokenizer config is not in the vocabulary")
                self.special_tokens[role] = token

    def _id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """The pad token, or the eos token when the tokenizer defines no pad (padding is always masked anyway)."""
        pad = self._id("pad_token")
        return pad if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special tokens written in the text (e.g. a rendered chat template's <bos>) are
        recognised as such; add_special_tokens=True also applies the tokenizer's post-processor (e.g. a BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Renders messages ([{"role": ..., "content": ...}, ...]) with the chat template; extra kwargs reach the
        template as variables (e.g. enable_thinking)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json "
                             f"and no {TEMPLATE_FILE}); format prompts without one or add a template")
        import jinja2

        if self._compiled_template is None:
            try:
                self._compiled_template = _compile_template(self.chat_template)
            except jinja2.exceptions.TemplateSyntaxError as e:
                raise ValueError(f"the tokenizer's chat template is not valid Jinja (line {e.lineno}: {e.message})") \
                    from None
        variables = {role: token for role, token in self.special_tokens.items()}
        variables.update(tools=None, documents=None)  # transformers always defines these; templates test them
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        try:
            return self._compiled_template.render(**variables)
        except jinja2.exceptions.SecurityError as e:
            # The sandbox stopped it; a chat template only formats messages, so this one is malicious or broken.
            raise ValueError(f"the tokenizer's chat template tried something the sandbox forbids ({e}); it was "
                             "stopped and not run: use a trusted template") from None

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json (readable by load_tokenizer and by transformers)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE), pretty=True)
        config = {k: v for k, v in self.config.items() if k not in SPECIAL_ROLES}
        config.update(self.special_tokens)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)  # keeps decode(encode(text)) == text
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if (path / TEMPLATE_FILE).exists():  # it would shadow the template we just wrote
            (path / TEMPLATE_FILE).unlink()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Reads a directory with tokenizer.json (required), tokenizer_config.json and chat_template.jinja (optional)."""
    path = Path(path)
    if not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE}; only fast (tokenizers-library) tokenizers are supported")
    try:
        backend = Backend.from_file(str(path / TOKENIZER_FILE))
    except Exception as e:  # noqa: BLE001 (the tokenizers library raises plain Exceptions)
        raise ValueError(f"{path / TOKENIZER_FILE}: cannot parse tokenizer ({e})") from None
    config = {}
    if (path / CONFIG_FILE).is_file():
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / CONFIG_FILE}: invalid JSON ({e})") from None
    if (path / "special_tokens_map.json").is_file():  # older layout: special tokens kept in their own file
        for role, token in json.loads((path / "special_tokens_map.json").read_text()).items():
            if role in SPECIAL_ROLES:
                config.setdefault(role, token)
    template = None
    if (path / TEMPLATE_FILE).is_file():
        template = (path / TEMPLATE_FILE).read_text()
    try:
        return Tokenizer(backend, config, template)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def build_char_tokenizer(vocab_size: int | None = None, chat_template: str | None = CHAR_CHAT_TEMPLATE) -> Tokenizer:
    """Character-level tokenizer: <pad> <bos> <eos> <unk>, newline, tab and printable ASCII (101 tokens).

    vocab_size pads the vocabulary with further printable Unicode characters (Latin-1, Greek, ...), so every id
    of a model's embedding is a real character. Text made of vocabulary characters decodes back exactly.
    """
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    base = len(CHAR_SPECIAL_TOKENS) + len(chars)
    if vocab_size is not None and vocab_size < base:
        raise ValueError(f"a character tokenizer needs vocab_size >= {base}, got {vocab_size}")
    code = 0xA1
    while vocab_size is not None and len(CHAR_SPECIAL_TOKENS) + len(chars) < vocab_size:
        c = chr(code)
        if unicodedata.category(c)[0] in "LNPS":  # letters, digits, punctuation, symbols: no combining marks
            chars.append(c)
        code += 1
    vocab = {token: i for i, token in enumerate([*CHAR_SPECIAL_TOKENS, *chars])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join tokens without separators
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAR_SPECIAL_TOKENS])
    config = dict(zip(SPECIAL_ROLES, ("<bos>", "<eos>", "<pad>", "<unk>")), model_max_length=1 << 20)
    return Tokenizer(backend, config, chat_template)


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read special token {value!r}; expected a string or {{'content': ...}}")


def _template_from_config(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _compile_template(source: str):
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("rendering chat templates needs jinja2 (installed with torch)") from e
    import jinja2

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)
