"""Any Hugging Face causal LM as the policy: a transformers model behind the forward our trainer calls.

`HFCausalLM` wraps a `transformers.AutoModelForCausalLM` and answers the same forward as model.DeepseekForCausalLM
for what the trainer uses: log-probs of target tokens chunked over the target positions only (never a (B, T, V)
float32 log-softmax), entropy, and a shared prefix computed once per group: one forward over the prompt into a
DynamicCache, the cache expanded G ways, then the completions on top of it. Gradients flow through the prompt's keys
and values, so the result and its gradients are the plain forward's. For MoE models (Qwen3-MoE, Mixtral) the
experts each token picked come from transformers' router logits; routing replay and router-bias updates need our
own MoE and are refused.

`load_policy` picks the implementation from the checkpoint's model_type: ours for DeepSeek-V2/V3, transformers
for everything else. transformers is imported only when a transformers policy is used (model/ stays torch-only).
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from thinkzero.model.transformer import CausalLMOutput, DeepseekForCausalLM, _check_shared_prefix, _positions

OUR_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
PolicyKind = Literal["auto", "thinkzero", "transformers"]


class PolicyError(ValueError):
    """A model directory or policy choice that cannot be loaded as asked."""


class HFCausalLM(nn.Module):
    """A transformers causal LM with DeepseekForCausalLM's forward contract (see its forward for the arguments).

    Built from a transformers config (random init, as `type(module)(module.config)` does for ZeRO-3's sampling
    twin) or around an already loaded transformers model.
    """

    # Target log-probs are computed over chunks of the sequence holding about this many logits each.
    logprob_chunk_elems: int = 1 << 24
    # The output head is ours, so chunking and entropy are the same code for both policies.
    _head = DeepseekForCausalLM._head
    target_logprobs = DeepseekForCausalLM.target_logprobs

    def __init__(self, config, model: nn.Module | None = None):
        super().__init__()
        if model is None:
            model = _causal_lm_class(config)(config)
        self.hf = model
        self.config = model.config
        self.gradient_checkpointing = False
        if getattr(self.config, "final_logit_softcapping", None):
            raise PolicyError(f"{self.config.model_type}: final_logit_softcapping is applied outside lm_head, "
                              "which the chunked log-probs do not reproduce; this model type is not supported")
        # transformers 5 renamed forward's past_key_values to cache.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_moe = bool(self.moe_layers)  # then each forward asks for the router logits

    @property
    def model(self) -> nn.Module:
        """The decoder (embeddings, layers, final norm): the `model.` prefix of the checkpoint names, as
        DeepseekForCausalLM.model is for ours."""
        return self.hf.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def moe_layers(self) -> list[nn.Module]:
        """The sparse MoE blocks (a router `gate` and `experts`), in layer order; [] for a dense model."""
        return [m for m in self.hf.modules() if hasattr(m, "gate") and hasattr(m, "experts")]

    @property
    def num_experts(self) -> int | None:
        cfg = self.config
        return getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True
        kwargs = {"use_reentrant": False}
        if hasattr(self.hf, "activation_checkpointing_enable"):  # transformers >= 5.2x's name for it
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def update_router_bias(self, expert_counts, gamma: float) -> None:
        raise PolicyError(f"router-bias updates need DeepSeek-V3's router; {self.config.model_type} runs through "
                          "transformers: set algorithm.moe.router_bias_update_gamma to 0")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.hf.save_pretrained(path, safe_serialization=True)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        *,
        target_ids: torch.Tensor | None = None,
        target_start: int = 0,
        temperature: float = 1.0,
        routing: list[torch.Tensor] | None = None,
        return_routing: bool = False,
        compute_entropy: bool = False,
        absorb: bool | None = None,
        shared_prefix: int = 0,
        group_size: int = 1,
    ) -> CausalLMOutput:
        """As DeepseekForCausalLM.forward. `absorb` (an MLA path) is ignored; a cache and routing are refused."""
        if routing is not None:
            raise PolicyError(f"routing replay needs our own MoE; {self.config.model_type} runs through "
                              "transformers: set algorithm.moe.routing_replay to false")
        if cache is not None:
            raise PolicyError("HFCausalLM takes no cache: sample with rollout.engine vllm or transformers")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(input_ids.device)
        positions = _positions(attention_mask, 0, B, T, input_ids.device)  # (B, T) real tokens only, as ours
        share = group_size > 1 and shared_prefix > 0
        if share:
            _check_shared_prefix(input_ids, attention_mask, None, shared_prefix, group_size)
            # A checkpointed layer runs twice and would append its keys to the cache a second time.
            share = not (self.gradient_checkpointing and self.training and torch.is_grad_enabled())
        if share:
            h, router_logits = self._shared(input_ids, attention_mask, positions, shared_prefix, group_size)
        else:
            out = self._decode(input_ids, attention_mask, positions, None)
            h, router_logits = out.last_hidden_state, out.router_logits if self._has_moe else ()
        topk = [r.topk(self.config.num_experts_per_tok, dim=-1).indices.view(B, T, -1) for r in router_logits]
        result = CausalLMOutput(
            routing=topk if return_routing else None,
            aux_loss=h.new_zeros((), dtype=torch.float32),
            expert_counts=[torch.bincount(t.flatten(), minlength=self.num_experts) for t in topk],
        )
        result.logits, result.logprobs, result.entropy = self._head(h, target_ids, target_start, temperature,
                                                                    compute_entropy)
        return result

    def _decode(self, input_ids, attention_mask, positions, cache):
        """One call of the transformers decoder (embeddings -> layers -> final norm), on `cache` if given."""
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        if self._has_moe:
            kwargs["output_router_logits"] = True
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)

    def _shared(self, input_ids, attention_mask, positions, Tp: int, G: int):
        """The first Tp columns once per group of G rows into a cache, expanded G ways, then each row's own columns.
        Returns the final hidden states of the full rows (B, T, D) and per MoE layer router logits (B*T, E)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        prefix = self._decode(input_ids[::G, :Tp], attention_mask[::G, :Tp], positions[::G, :Tp], cache)
        cache.batch_repeat_interleave(G)  # (P, H, Tp, D) -> (P*G, H, Tp, D) per layer; autograd sees the copy
        own = self._decode(input_ids[:, Tp:], attention_mask, positions[:, Tp:], cache)
        h = torch.cat((prefix.last_hidden_state.repeat_interleave(G, dim=0), own.last_hidden_state), dim=1)
        router_logits = []
        if self._has_moe:
            (B, T), E = input_ids.shape, self.num_experts
            for lp, lo in zip(prefix.router_logits, own.router_logits):
                lp = lp.view(B // G, Tp, E).repeat_interleave(G, dim=0)  # (B, Tp, E)
                router_logits.append(torch.cat((lp, lo.view(B, T - Tp, E)), dim=1).view(B * T, E))
        return h, router_logits


def _causal_lm_class(config) -> type:
    """The transformers class for `config`. The model is then built by its plain constructor, not from_config: that
    one partitions a new model with DeepSpeed's zero.Init whenever ZeRO-3 is active, which breaks the sampling twin
    that rl.rollout builds on the meta device to share the gathered parameters."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # A config class transformers does not ship exists only because the checkpoint's own code was already loaded
    # (model.trust_remote_code); its model class comes from the same local code.
    return get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], config._name_or_path,
                                         local_files_only=True)


# ---- loading ------------------------------------------------------------------------------------------------------


def policy_kind(path: str | os.PathLike, policy: PolicyKind = "auto") -> str:
    """'thinkzero' or 'transformers': who implements the model in `path` (from its config.json's model_type)."""
    if policy not in ("auto", "thinkzero", "transformers"):
        raise PolicyError(f"model.policy must be auto, thinkzero or transformers; got {policy!r}")
    model_type = read_model_type(path)
    if policy == "auto":
        return "thinkzero" if model_type in OUR_MODEL_TYPES else "transformers"
    if policy == "thinkzero" and model_type not in OUR_MODEL_TYPES:
        raise PolicyError(f"{path}: model.policy 'thinkzero' implements {', '.join(OUR_MODEL_TYPES)} only; this "
                          f"model is {model_type!r}: use model.policy auto or transformers")
    return policy


def read_model_type(path: str | os.PathLike) -> str:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise PolicyError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PolicyError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise PolicyError(f"{file}: no model_type; cannot tell which model this is")
    return config["model_type"]


def load_policy(path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                policy: PolicyKind = "auto", trust_remote_code: bool = False) -> nn.Module:
    """The model in `path` in eval mode: our DeepseekForCausalLM for DeepSeek-V2/V3 (unless policy forces
    transformers), else an HFCausalLM around transformers' AutoModelForCausalLM. trust_remote_code lets a checkpoint
    run the Python code it ships (only when the recipe opts in; a warning says so)."""
    if policy_kind(path, policy) == "thinkzero":
        from thinkzero.model.checkpoint import load_model

        return load_model(path, dtype=dtype, device=device)
    remote = _check_transformers_type(path, trust_remote_code)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=remote)
    return HFCausalLM(model.config, model).to(device or "cpu").eval()


def _check_transformers_type(path, trust_remote_code: bool) -> bool:
    """Whether loading runs the checkpoint's own code; one clear error when transformers cannot build the model."""
    model_type = read_model_type(path)
    try:
        import transformers
    except ImportError:
        raise PolicyError(f"{path}: model_type {model_type!r} trains through transformers, which is not installed: "
                          "pip install -e '.[hf]' (or pip install transformers)") from None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = json.loads((Path(path) / "config.json").read_text())
    ships_code = "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if model_type not in CONFIG_MAPPING and not ships_code:
        raise PolicyError(f"{path}: model_type {model_type!r} is not known to transformers {transformers.__version__} "
                          "and the checkpoint ships no code for it (no auto_map in config.json): upgrade "
                          "transformers or check the model directory")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise PolicyError(f"{path}: model_type {model_type!r} is implemented by Python code shipped with the "
                          "checkpoint; running it needs model.trust_remote_code: true (only for code you trust)")
    if ships_code and trust_remote_code:
        warnings.warn(f"{path}: running the model code shipped with the checkpoint (model.trust_remote_code)",
                      stacklevel=2)
    return ships_code and trust_remote_code


def save_policy(module: nn.Module, path: str | os.PathLike) -> None:
    """A Hugging Face model directory of either policy (DDP / DeepSpeed wrappers unwrapped): save_pretrained for a
    transformers one, so it opens in transformers and vLLM; model.save_model for ours."""
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    if isinstance(module, HFCausalLM):
        module.save_pretrained(path)
        return
    from thinkzero.model.checkpoint import save_model

    save_model(module, path)


def num_routed_experts(policy: nn.Module) -> int:
    """Routed experts per MoE layer of either kind of policy (1 for a dense model)."""
    if isinstance(policy, HFCausalLM):
        return policy.num_experts or 1
    return policy.config.n_routed_experts or 1


def moe_classes(policy: nn.Module) -> list[type]:
    """The classes of the policy's MoE blocks (ZeRO-3 gathers each such block whole); [] for a dense model."""
    return sorted({type(m) for m in policy.moe_layers}, key=lambda c: c.__qualname__)


def check_engine(kind: str, engine: str) -> None:
    """One clear error when the rollout engine cannot sample this kind of policy."""
    if kind == "transformers" and engine == "thinkzero":
        raise PolicyError("rollout.engine 'thinkzero' samples DeepSeek-V2/V3 models only (its cache is MLA's latent "
                          "cache); this model runs through transformers: set rollout.engine to vllm, or to "
                          "transformers (transformers' generate: the slow path, for CPU runs without vLLM)")
    if kind == "thinkzero" and engine == "transformers":
        raise PolicyError("rollout.engine 'transformers' samples transformers policies; this is a DeepSeek model "
                          "on our own implementation: set rollout.engine to thinkzero or vllm")


def check_moe_options(policy: nn.Module, aux_loss_coef: float, router_bias_update_gamma: float,
                      routing_replay: bool) -> None:
    """A transformers MoE policy trains with its router as transformers computes it: the options that need our own
    MoE (a balance loss in our forward, DeepSeek-V3's router bias, replaying the rollout's experts) are refused."""
    if not isinstance(policy, HFCausalLM) or not policy.moe_layers:
        return
    asked = [name for name, on in (("algorithm.moe.aux_loss_coef", aux_loss_coef > 0),
                                   ("algorithm.moe.router_bias_update_gamma", router_bias_update_gamma > 0),
                                   ("algorithm.moe.routing_replay", routing_replay)) if on]
    if asked:
        raise PolicyError(f"{' and '.join(asked)}: supported for our DeepSeek MoE only; this "
                          f"{policy.config.model_type} model trains through transformers: turn them off (0 / false)")


class HFTokenizer:
    """transformers' AutoTokenizer behind the interface of model.Tokenizer that the trainer uses (encode without
    added special tokens, decode, the chat template rendered to text, eos / pad ids, save)."""

    def __init__(self, tokenizer):
        self.hf = tokenizer

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, trust_remote_code: bool = False) -> HFTokenizer:
        """A tokenizer.json is read as written (PreTrainedTokenizerFast): transformers 5's AutoTokenizer rebuilds
        some model types' tokenizers from the vocabulary with that family's rules, which breaks any other
        tokenizer saved under such a config (our character tokenizer in a qwen2 directory). Without one,
        AutoTokenizer picks the (slow) class the directory names."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if (Path(path) / "tokenizer.json").is_file():
            return cls(PreTrainedTokenizerFast.from_pretrained(path))
        return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The pad token, or the eos token when the tokenizer defines no pad (padding is always masked anyway)."""
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                           **kwargs)

    def save(self, path: str | os.PathLike) -> None:
        self.hf.save_pretrained(path)


def load_policy_tokenizer(path: str | os.PathLike, kind: str, trust_remote_code: bool = False):
    """The tokenizer for a policy of `kind` ('thinkzero': ours, 'transformers': AutoTokenizer)."""
    if kind == "thinkzero":
        from thinkzero.model.tokenizer import load_tokenizer

        return load_tokenizer(path)
    return HFTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


# ---- random-init models for tests and CPU recipes -----------------------------------------------------------------

# transformers config fields; ids 0..3 are the character tokenizer's <pad> <bos> <eos> <unk> (model/presets.py).
# Heads of 32 dims: the smallest vLLM's CPU attention takes.
_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6,
             rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# w1_qwen2: model/presets.py's w1 (vocab, width, depth, heads of 32 dims) as a dense Qwen2 whose MLP is w1's dense
# layer, for benchmarking a transformers policy against w1's workload.
_W1 = dict(_TINY, vocab_size=300, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8, max_position_embeddings=4096)
HF_PRESETS: dict[str, dict] = {
    "tiny_qwen2": dict(model_type="qwen2", **_TINY),
    "w1_qwen2": dict(model_type="qwen2", **_W1),
    "tiny_qwen3_moe": dict(model_type="qwen3_moe", moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                           norm_topk_prob=True, **_TINY),
}


def write_random_hf_model(name: str, out_dir: str | os.PathLike, seed: int = 0) -> HFCausalLM:
    """Writes a random-init transformers model of an HF_PRESETS entry (save_pretrained files + the character
    tokenizer) and returns it. config.json is moved into place last, so a directory holding one is complete."""
    import shutil

    from transformers import AutoConfig

    from thinkzero.model.tokenizer import build_char_tokenizer

    if name not in HF_PRESETS:
        raise PolicyError(f"unknown transformers preset {name!r}; choose one of {sorted(HF_PRESETS)}")
    fields = dict(HF_PRESETS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    model = HFCausalLM(config)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_char_tokenizer(vocab_size=config.vocab_size).save(tmp)
    model.save_pretrained(tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(file, out_dir / file.name)
    tmp.rmdir()
    return model


def preset_kind(name: str) -> str:
    """Who implements a random-init preset: 'transformers' for HF_PRESETS, 'thinkzero' for model/presets.py's."""
    return "transformers" if name in HF_PRESETS else "thinkzero"


def write_random_policy(name: str, out_dir: str | os.PathLike, seed: int = 0) -> None:
    """A random-init model directory of either kind of preset (model.init_preset)."""
    if preset_kind(name) == "transformers":
        write_random_hf_model(name, out_dir, seed)
        return
    from thinkzero.model.presets import write_random_model

    write_random_model(name, out_dir, seed=seed)


# ---- sampling through transformers' generate (the slow path) ------------------------------------------------------


class _SamplingLogprobs:
    """A logits processor, run after transformers' own: applies our temperature / top-k / top-p (the same rule as
    model.generate) and records log p of each drawn token under the distribution it was drawn from."""

    def __init__(self, params):
        self.params = params
        self.prev = None  # (G, V) log-probs of the last step's distribution
        self.logprobs: list[torch.Tensor] = []  # per drawn token (G,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from thinkzero.model.generate import filter_logits

        self.record(input_ids[:, -1])
        p = self.params
        scores = scores.float()
        if p.temperature > 0:
            scores = filter_logits(scores / p.temperature, p.top_k, p.top_p)
        self.prev = scores.log_softmax(dim=-1)
        return scores

    def record(self, tokens: torch.Tensor) -> None:
        if self.prev is not None:
            self.logprobs.append(self.prev.gather(-1, tokens[:, None])[:, 0])


class HFGenerateEngine:
    """A rollout engine (rl.engine) sampling with transformers' `generate` (see `generate`). The slow path: for CPU
    runs without vLLM; use rollout.engine vllm for real training."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def sample(self, prompts: list[list[int]], num_generations: int, params, seeds: list[int]):
        from thinkzero.rl.rollout import policy_for_sampling

        with policy_for_sampling(self.model) as policy:
            return generate(policy, prompts, num_generations, params, seeds, self.tokenizer.decode)

    def sync_weights(self, model: nn.Module) -> None:
        pass  # samples with the training policy itself

    def close(self) -> None:
        pass


def generate(policy: HFCausalLM, prompts: list[list[int]], num_generations: int, params, seeds: list[int] | None = None,
             decode=None):
    """model.generate's job for a transformers policy (bare, in eval mode), returned as a RolloutBatch: one
    transformers `generate` call per prompt under its own seed (so a prompt's completions do not depend on the batch,
    as with our engine; seeds None: 0 for each). `decode(ids) -> str` is needed only for stop strings."""
    from thinkzero.rl.batch import RolloutBatch

    if params.stop_strings and decode is None:
        raise ValueError("generate: params.stop_strings needs a `decode(ids) -> str` callable (e.g. tokenizer.decode)")
    seeds = [0] * len(prompts) if seeds is None else seeds
    completions = []
    for prompt, seed in zip(prompts, seeds):
        ids, logprobs = _generate_one(policy, prompt, num_generations, params, seed)
        completions += [_cut(ids[g].tolist(), logprobs[g].tolist(), params, decode) for g in range(num_generations)]
    rows = [p for p in prompts for _ in range(num_generations)]
    return RolloutBatch.from_rows(rows, completions, num_generations, params.pad_token_id).to(
        next(policy.parameters()).device)


def _generate_one(policy: HFCausalLM, prompt: list[int], G: int, params, seed: int):
    """G completions of one prompt, (G, t) ids and (G, t) sampling log-probs, before cutting at stops."""
    from transformers import GenerationConfig, LogitsProcessorList

    # Every sampling knob set here: a checkpoint's generation_config.json (e.g. Qwen's top_p 0.8,
    # repetition_penalty 1.05) must not change what the recipe asked for.
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=params.temperature > 0,
                              temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                              num_return_sequences=G, eos_token_id=list(params.eos_token_ids) or None,
                              pad_token_id=params.pad_token_id, return_dict_in_generate=True)
    recorder = _SamplingLogprobs(params)
    device = next(policy.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = policy.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 logits_processor=LogitsProcessorList([recorder]))
    completions = out.sequences[:, len(prompt):]  # (G, t)
    recorder.record(completions[:, -1])
    return completions, torch.stack(recorder.logprobs, dim=1)


def _cut(ids: list[int], logprobs: list[float], params, decode) -> tuple[list[int], list[float], str]:
    """One completion through its first EOS id or first completed stop string (as model.generate ends it), with
    its finish reason. transformers pads a row after its EOS; past a stop string it kept sampling."""
    from thinkzero.model.generate import StopStringChecker

    n, reason = len(ids), "length"
    eos = [j for j, tok in enumerate(ids) if tok in params.eos_token_ids]
    if eos:
        n, reason = eos[0] + 1, "stop"
    if params.stop_strings:
        cut = StopStringChecker(params.stop_strings, decode).cut(ids[:n])
        if cut is not None:
            n, reason = cut, "stop"
    return ids[:n], logprobs[:n], reason
