"""Architecture descriptions of the teacher (Llama) and the student (MLA).

Both are frozen dataclasses that round-trip through JSON (`to_dict` / `from_dict`): they are saved
with every checkpoint and export, so a directory alone says what model it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama decoder (MHA when n_kv_heads == n_heads, GQA when fewer, MQA when 1)."""

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  hidden_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # None, or the Hugging Face `rope_parameters` of a scaled RoPE, e.g.
  # {'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
  #  'original_max_position_embeddings': 8192}. Given as a dict, stored as sorted (key, value)
  # pairs so that the config stays hashable (it is static under jit); read it with `rope_scaling_dict`.
  rope_scaling: Any = None
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  bos_id: int | None = 1
  eos_id: int | None = 2
  # Every end-of-sequence id (generation_config.json's eos_token_id list, e.g. Llama-3.x Instruct's
  # 128001, 128008, 128009), which generation stops at; eos_id, the single id kept for
  # compatibility, is always among them (prepended when missing; the first one when not given).
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    ids = tuple(dict.fromkeys(int(i) for i in self.eos_ids))
    if self.eos_id is not None and self.eos_id not in ids:
      ids = (self.eos_id,) + ids
    object.__setattr__(self, 'eos_ids', ids)
    if self.eos_id is None and ids:
      object.__setattr__(self, 'eos_id', ids[0])
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f'n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: '
          'every query head must belong to exactly one KV group.')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for RoPE.')
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, 'rope_scaling', tuple(sorted(self.rope_scaling.items())))
    if self.rope_scaling is not None:
      kind = self.rope_scaling_dict.get('rope_type', 'default')
      if kind not in ('default', 'llama3'):
        raise ValueError(f"rope_type {kind!r} is not supported; use 'default' or 'llama3'.")

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def group_size(self) -> int:
    return self.n_heads // self.n_kv_heads

  def kv_values_per_token(self) -> int:
    """Cached values per token over all layers (K and V of every KV head)."""
    return self.n_layers * 2 * self.n_kv_heads * self.head_dim

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['rope_scaling'] = self.rope_scaling_dict
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'LlamaConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f'unknown LlamaConfig fields {sorted(unknown)}')
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """A student: the teacher's Llama with every attention block replaced by MLA.

  Per layer l: r_q[l] (None = uncompressed query), r_kv[l], and either `rope_pairs[l]`, the indices
  of the teacher's rotate-half pairs kept as RoPE dimensions (their original frequencies), or None
  for a fresh RoPE over d_r dimensions (DeepSeek style; the `paper` choice).
  """

  llama: LlamaConfig
  r_kv: tuple[int, ...]
  r_q: tuple[int | None, ...]
  d_r: int
  d_qk: int
  d_v: int
  rope_pairs: tuple[tuple[int, ...] | None, ...]
  latent_norm: bool = False
  latent_norm_eps: float = 1e-6

  def __post_init__(self):
    n = self.llama.n_layers
    for name in ('r_kv', 'r_q', 'rope_pairs'):
      if len(getattr(self, name)) != n:
        raise ValueError(f'{name} has {len(getattr(self, name))} entries for {n} layers.')
    if self.d_r % 2 or self.d_r < 2:
      raise ValueError(f'd_r={self.d_r} must be a positive even number (RoPE rotates pairs).')
    if self.d_qk + self.d_r != self.llama.head_dim:
      raise ValueError(
          f'd_qk + d_r = {self.d_qk} + {self.d_r} must equal the teacher head_dim '
          f'{self.llama.head_dim}: every head dimension is either RoPE or no-RoPE.')
    for l, pairs in enumerate(self.rope_pairs):
      if pairs is not None and len(pairs) != self.d_r // 2:
        raise ValueError(f'layer {l}: {len(pairs)} RoPE pairs for d_r={self.d_r}.')
    for l, (rkv, rq) in enumerate(zip(self.r_kv, self.r_q)):
      if rkv < 1 or (rq is not None and rq < 1):
        raise ValueError(f'layer {l}: ranks must be positive (r_kv={rkv}, r_q={rq}).')

  @property
  def n_layers(self) -> int:
    return self.llama.n_layers

  def layer_kv_values(self, layer: int) -> int:
    """Cached values per token in one layer: the latent c_KV and the shared rotated RoPE key."""
    return self.r_kv[layer] + self.d_r

  def kv_values_per_token(self) -> int:
    return sum(self.layer_kv_values(l) for l in range(self.n_layers))

  def kv_fraction(self) -> float:
    return self.kv_values_per_token() / self.llama.kv_values_per_token()

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['llama'] = self.llama.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'MLAConfig':
    d = dict(d)
    d['llama'] = LlamaConfig.from_dict(d['llama'])
    d['r_kv'] = tuple(int(x) for x in d['r_kv'])
    d['r_q'] = tuple(None if x is None else int(x) for x in d['r_q'])
    d['rope_pairs'] = tuple(None if p is None else tuple(int(i) for i in p) for p in d['rope_pairs'])
    return cls(**d)


def per_layer(value: int | None | Sequence[int | None], n_layers: int, name: str) -> tuple:
  """Broadcasts a scalar to one entry per layer; checks the length of a sequence."""
  if value is None or isinstance(value, int):
    return (value,) * n_layers
  value = tuple(value)
  if len(value) != n_layers:
    raise ValueError(f'{name} lists {len(value)} values for {n_layers} layers.')
  return value
