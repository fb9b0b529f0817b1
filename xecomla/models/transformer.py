"""The decoder: embeddings, a stack of (norm, attention, norm, SwiGLU) blocks, final norm, logits.

One class serves teacher and student: a `LlamaConfig` builds Llama attention, an `MLAConfig` builds
the teacher's architecture with every attention block replaced by Multi-head Latent Attention.

Blocks whose shapes all agree (every Llama; an MLA student with the same ranks and RoPE pairs in
every layer) can run under one `lax.scan`, so the block is traced and compiled once instead of once
per layer. The parameter tree stays per layer (`params['layers'][l]`, what checkpoints, conversion,
export and sharding rules read): the forward pass stacks the layers' weights leafwise and scans a
pure block function over them. That stacked copy (and the stacked gradient) is the price, in
temporaries and copies each step; `benchmarks/compile_time.py` measures whether the shorter
trace pays for it.
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

# Rematerialisation of each block in the backward pass, by name (config `train.remat`).
# 'full' keeps only the block's inputs and recomputes everything. 'dots_saveable' keeps the outputs
# of the matmuls without batch dimensions, i.e. every product with a weight (x W: [B, T, D],
# [B, T, N, H], [B, T, F]), and recomputes the batched ones, the attention scores and P V
# ([B, N, T, S], batch dims B and the heads): jax's `dots_saveable` would keep those too, and they
# are the part of a block's activations that grows with the sequence squared.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def uniform_layers(config: LlamaConfig | MLAConfig) -> bool:
  """Whether every block has the same parameter shapes and RoPE frequencies (so one traced block
  serves all): always for a Llama; for MLA when r_kv, r_q and rope_pairs agree across layers."""
  if isinstance(config, MLAConfig):
    return all(len(set(getattr(config, f))) == 1 for f in ('r_kv', 'r_q', 'rope_pairs'))
  return True


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
  (`models.attention.IMPLEMENTATIONS`); scan_layers: run the blocks under one lax.scan when they
  share shapes (`uniform_layers`) and no cache is given (a decode step keeps the Python loop:
  it is cheap to trace and updates each layer's cache in place); otherwise a loop.
  """

  def __init__(self, config: LlamaConfig | MLAConfig, *, dtype=jnp.float32,
               rngs: nnx.Rngs | None = None, remat: bool | str = 'none', mla_mode: str = 'auto',
               attention: str = 'reference', scan_layers: bool = False):
    self.config = config
    self.dtype = dtype
    self.remat = {True: 'full', False: 'none'}.get(remat, remat)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={remat!r} is not one of {tuple(REMAT_POLICIES)}')
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
    index = None
    if cache is None:
      mask = attention_mask(positions, segment_ids, positions, segment_ids)
    else:
      kvcache.check_room(cache, t)
      index = cache.index
      cache = cache.extend(positions, segment_ids)
      mask = attention_mask(positions, segment_ids, cache.positions, cache.segment_ids)
    if cache is None and self.scan_layers and len(self.layers) > 1 and uniform_layers(self.config):
      x, hidden = self._scan_blocks(x, positions, mask, return_hidden)
    else:
      x, hidden, new_layers = self._loop_blocks(x, positions, mask, cache, index, return_hidden)
    x = self.final_norm(x)
    if cache is not None:
      cache = cache.replace(layers=tuple(new_layers), index=index + t)
    out = x
    if logits:
      out = self.head(x)
      chex.assert_shape(out, (b, t, self.llama.vocab_size))
    return (out, cache, hidden) if return_hidden else (out, cache)

  def _loop_blocks(self, x, positions, mask, cache, index, return_hidden):
    policy = REMAT_POLICIES[self.remat]
    call = Block.__call__ if self.remat == 'none' else nnx.remat(Block.__call__, policy=policy)
    hidden, new_layers = [], []
    for l, block in enumerate(self.layers):
      x, layer_cache = call(block, x, positions, mask,
                            None if cache is None else cache.layers[l], index)
      new_layers.append(layer_cache)
      if return_hidden:
        hidden.append(x)
    return x, hidden, new_layers

  def _scan_blocks(self, x, positions, mask, return_hidden):
    """The blocks under one lax.scan: block 0's structure merged with each layer's weights
    (stacked leafwise here, [L, ...]); per-layer outputs come back as the scan's ys."""
    graph = nnx.graphdef(self.layers[0])
    stacked = jax.tree.map(lambda *ws: jnp.stack([self._narrow(w) for w in ws]),
                           *(nnx.state(b) for b in self.layers))

    def body(h, weights):
      h, _ = nnx.merge(graph, weights)(h, positions, mask)
      return h, (h if return_hidden else None)

    if self.remat != 'none':  # prevent_cse is not needed under scan (jax.checkpoint's docs)
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    x, ys = jax.lax.scan(body, x, stacked)
    return x, ([ys[l] for l in range(len(self.layers))] if return_hidden else [])

  def _narrow(self, w: jax.Array) -> jax.Array:
    """A block weight in the compute dtype when that is narrower: blocks use every weight cast to
    it (`p[...].astype(dtype)`), so casting before the stack gives the same values and halves the
    stacked copy of float32 weights under bfloat16 compute."""
    return w.astype(self.dtype) if jnp.dtype(w.dtype).itemsize > jnp.dtype(self.dtype).itemsize else w

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
