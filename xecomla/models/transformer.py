"""The decoder: embeddings, a stack of (norm, attention, norm, SwiGLU) blocks, final norm, logits.

One class serves teacher and student: a `LlamaConfig` builds Llama attention, an `MLAConfig` builds
the teacher's architecture with every attention block replaced by Multi-head Latent Attention.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from xecomla.models import kvcache
from xecomla.models.attention import attention_mask
from xecomla.models.config import LlamaConfig, MLAConfig
from xecomla.models.layers import MLP, Embed, RMSNorm, param
from xecomla.models.llama import Attention
from xecomla.models.mla import MLAAttention


class Block(nnx.Module):

  def __init__(self, config: LlamaConfig | MLAConfig, layer: int, *, dtype, rngs, mla_mode='auto',
               attention: str = 'reference'):
    llama = config.llama if isinstance(config, MLAConfig) else config
    self.attn_norm = RMSNorm(llama.dim, llama.norm_eps, rngs=rngs)
    if isinstance(config, MLAConfig):
      self.attn = MLAAttention(config, layer, dtype=dtype, rngs=rngs, mode=mla_mode,
                               attention=attention)
    else:
      self.attn = Attention(config, dtype=dtype, rngs=rngs, attention=attention)
    self.mlp_norm = RMSNorm(llama.dim, llama.norm_eps, rngs=rngs)
    self.mlp = MLP(llama.dim, llama.hidden_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, positions, mask, cache=None, index=None):
    h, cache = self.attn(self.attn_norm(x), positions, mask, cache, index)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
  """Decoder-only LM. Parameters are float32 (`param_dtype`); compute runs in `dtype`.

  remat: rematerialisation policy of each block in the backward pass ('none', 'full',
  'dots_saveable'; True = 'full'); attention: the attention implementation
  (`models.attention.IMPLEMENTATIONS`); scan_layers: run identical blocks under one scan.
  """

  def __init__(self, config: LlamaConfig | MLAConfig, *, dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: bool | str = 'none', mla_mode: str = 'auto',
               attention: str = 'reference', scan_layers: bool = False):
    self.config = config
    self.dtype = dtype
    self.remat = {True: 'full', False: 'none'}.get(remat, remat)
    self.attention = attention
    self.scan_layers = scan_layers
    llama = config.llama if isinstance(config, MLAConfig) else config
    self.llama = llama
    self.embed = Embed(llama.vocab_size, llama.dim, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Block(config, l, dtype=dtype, rngs=rngs, mla_mode=mla_mode,
                                  attention=attention) for l in range(llama.n_layers)])
    self.final_norm = RMSNorm(llama.dim, llama.norm_eps, rngs=rngs)
    if not llama.tie_embeddings:
      self.lm_head = param(rngs, (llama.dim, llama.vocab_size), ('embed', 'vocab'))

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: kvcache.Cache | None = None,
               *, return_hidden: bool = False, logits: bool = True):
    """tokens [B, T] -> float32 logits [B, T, V], the updated cache (None without one) and, with
    return_hidden, the residual stream after each block ([B, T, D] per layer). With
    logits=False the first output is the final-normed hidden state [B, T, D] in the compute dtype
    instead (`head` turns it into logits, e.g. a chunk of the sequence at a time).

    positions default to 0..T-1, segment_ids to 1; segment 0 marks padding. With a cache the T
    tokens are written at the cache's next slots and attend to everything cached so far.
    """
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    chex.assert_shape([positions, segment_ids], (b, t))
    x = self.embed(tokens)
    if cache is None:
      mask = attention_mask(positions, segment_ids, positions, segment_ids)
    else:
      index = cache.index
      cache = cache.extend(positions, segment_ids)
      mask = attention_mask(positions, segment_ids, cache.positions, cache.segment_ids)
    hidden, new_layers = [], []
    for l, block in enumerate(self.layers):
      call = nnx.remat(block.__class__.__call__) if self.remat != 'none' else block.__class__.__call__
      x, layer_cache = call(block, x, positions, mask,
                            None if cache is None else cache.layers[l],
                            None if cache is None else index)
      new_layers.append(layer_cache)
      if return_hidden:
        hidden.append(x)
    x = self.final_norm(x)
    if cache is not None:
      cache = cache.replace(layers=tuple(new_layers), index=index + t)
    out = x
    if logits:
      out = self.head(x)
      chex.assert_shape(out, (b, t, self.llama.vocab_size))
    return (out, cache, hidden) if return_hidden else (out, cache)

  def head(self, x: jax.Array) -> jax.Array:
    """Final-normed hidden states [..., T, D] -> float32 logits [..., T, V]."""
    if self.llama.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum('...TD,DV->...TV', x, self.lm_head[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
    return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Parameter trees (plain nested dicts, layers keyed by int) <-> models
# ----------------------------------------------------------------------------------------------

def init_params(config: LlamaConfig | MLAConfig, seed: int = 0) -> dict:
  """Random float32 parameters of a fresh model (a plain nested dict)."""
  return params_of(Transformer(config, rngs=nnx.Rngs(seed)))


def params_of(model: Transformer) -> dict:
  return nnx.state(model, nnx.Param).to_pure_dict()


def _abstract_state(config: LlamaConfig | MLAConfig):
  return nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)


def param_axes(config: LlamaConfig | MLAConfig) -> dict:
  """The logical axis names of every parameter, in the same tree layout as the parameters."""
  axes: dict = {}
  for path, var in nnx.to_flat_state(_abstract_state(config)):
    node = axes
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = var.get_metadata()['axes']
  return axes


def abstract_params(config: LlamaConfig | MLAConfig) -> dict:
  """jax.ShapeDtypeStruct of every parameter (nothing is allocated)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      _abstract_state(config).to_pure_dict())


def from_params(config: LlamaConfig | MLAConfig, params: dict, **kwargs) -> Transformer:
  """A model holding `params` (checked against the config's shapes; no random initialisation)."""
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), **kwargs))
  graphdef, state = nnx.split(abstract)
  expected = jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]
  given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, leaf in expected:
    if path not in given:
      raise ValueError(f'parameter {jax.tree_util.keystr(path)} is missing')
    if tuple(given[path].shape) != tuple(leaf.shape):
      raise ValueError(f'parameter {jax.tree_util.keystr(path)} has shape {tuple(given[path].shape)}, '
                       f'the config implies {tuple(leaf.shape)}')
  extra = set(given) - {p for p, _ in expected}
  if extra:
    raise ValueError(f'unexpected parameter {jax.tree_util.keystr(sorted(extra, key=str)[0])}')
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def graphdef(config: LlamaConfig | MLAConfig, **kwargs) -> nnx.GraphDef:
  """The model's structure (no parameters allocated), for nnx.merge(graphdef, params)."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), **kwargs)))[0]
