"""Latent KV cache for MLA decoding: per layer and token, only the normalised latent and the roped shared key.

One preallocated buffer (L, B, S_cap, kv_lora_rank + qk_rope_head_dim) holds every layer; `kv[i]` and
`k_pe[i]` are views of its two parts, so the absorbed attention scores against both with a single matmul.
Rows are sequences; all rows share `length` (left padding is expressed by the attention mask, not by per-row
lengths).

Use: for each layer `update_latent(i, kv, k_pe)` during a forward, then `advance(t)` once all layers have
written.
"""

import torch


class LatentCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        capacity: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        *,
        buffer: torch.Tensor | None = None,
        length: int = 0,
    ):
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        if buffer is None:
            buffer = torch.zeros(
                num_layers, batch_size, capacity, kv_lora_rank + rope_dim, dtype=dtype, device=device
            )
        self.buffer = buffer  # (L, B, S_cap, C + R)
        self.length = length
        self.kv = [buffer[i, :, :, :kv_lora_rank] for i in range(num_layers)]  # each (B, S_cap, C)
        self.k_pe = [buffer[i, :, :, kv_lora_rank:] for i in range(num_layers)]  # each (B, S_cap, R)

    @classmethod
    def for_model(cls, cfg, batch_size: int, capacity: int, dtype: torch.dtype = torch.float32, device=None):
        return cls(
            cfg.num_hidden_layers, batch_size, capacity, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device
        )

    @property
    def num_layers(self) -> int:
        return self.buffer.shape[0]

    @property
    def batch_size(self) -> int:
        return self.buffer.shape[1]

    @property
    def capacity(self) -> int:
        return self.buffer.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def update_latent(self, layer_idx: int, kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Writes kv (B, t, C), k_pe (B, t, R) after the filled part; returns (B, length + t, C + R)."""
        B, t, _ = kv.shape
        end = self.length + t
        if end > self.capacity:
            raise ValueError(
                f"LatentCache is full: {self.length} cached + {t} new tokens > capacity {self.capacity}; "
                "allocate a larger cache (prompt length + max_new_tokens)"
            )
        if B != self.batch_size:
            raise ValueError(f"LatentCache holds {self.batch_size} rows, got a batch of {B}")
        layer = self.buffer[layer_idx]  # (B, S_cap, C + R)
        layer[:, self.length : end, : self.kv_lora_rank] = kv
        layer[:, self.length : end, self.kv_lora_rank :] = k_pe
        return layer[:, :end]

    def advance(self, t: int) -> None:
        if self.length + t > self.capacity:
            raise ValueError(
                f"cannot advance LatentCache by {t}: {self.length} + {t} > capacity {self.capacity}"
            )
        self.length += t

    def repeat_interleave(self, repeats: int) -> "LatentCache":
        """Row p becomes rows p*G .. p*G+G-1 (a prompt's cache shared by its G generations)."""
        return self._with_buffer(self.buffer.repeat_interleave(repeats, dim=1))

    def index_select(self, rows: torch.Tensor) -> "LatentCache":
        """Keeps only `rows` (shrinks the active batch when sequences finish)."""
        return self._with_buffer(self.buffer.index_select(1, rows.to(self.buffer.device)))

    def _with_buffer(self, buffer: torch.Tensor) -> "LatentCache":
        return LatentCache(
            buffer.shape[0],
            buffer.shape[1],
            buffer.shape[2],
            self.kv_lora_rank,
            self.rope_dim,
            buffer=buffer,
            length=self.length,
        )

    def nbytes(self) -> int:
        """Bytes allocated: num_layers * B * capacity * (kv_lora_rank + rope_dim) * element size."""
        return self.buffer.numel() * self.buffer.element_size()

    def __repr__(self) -> str:
        L, B, S, _ = self.buffer.shape
        dims = f"{self.kv_lora_rank}+{self.rope_dim}"
        return f"LatentCache(layers={L}, batch={B}, length={self.length}/{S}, dim={dims})"
