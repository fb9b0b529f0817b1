"""The transformers (PyTorch) rows of benchmarks.decode, on the same weights as the JAX rows.

hf_teacher: `LlamaForCausalLM` loaded from the teacher's Hugging Face directory (written by
xecomla.convert.hf.save_llama for random weights; the converted llama2c directory for stories260K)
with its default attention (sdpa). hf_absorbed: the student exported by xecomla.export.export_hf
and loaded with trust_remote_code, i.e. its own modeling_xecomla.py, which decodes absorbed over a
DynamicCache holding c_kv [B, 1, S, r_kv] and k_r [B, 1, S, d_r] per layer.

Both caches are transformers' DynamicCache (what `generate` uses by default: each step
concatenates the new token onto every layer's tensors, so it copies the cache), pre-filled to the
context with random normal values at the per-channel spread a short real prefill leaves there,
like the JAX rows. Each timed call runs --steps greedy steps (argmax of the last logits) under
torch.inference_mode, from a fresh copy of the pre-filled cache; the first call is a warm-up.
"""

from __future__ import annotations

import os
import time

import jax.numpy as jnp
import torch
import transformers
from transformers.cache_utils import DynamicCache

from benchmarks.roofline import cast, row
from benchmarks.flops import decode_step_flops
from xecomla.convert import hf
from xecomla.export import export_hf

_LOADED: dict = {}


def load(models: dict, work: str, dtype) -> dict:
  """{'hf_teacher': (torch model, JAX config, JAX params), 'hf_absorbed': ...} in `dtype`,
  exported once per work directory and loaded once per dtype."""
  key = (work, jnp.dtype(dtype).name)
  if key in _LOADED:
    return _LOADED[key]
  (t_cfg, t_params), (s_cfg, s_params) = models['teacher'], models['student']
  t_dir = models['hf_dir'] or os.path.join(work, 'teacher_hf')
  if not os.path.exists(os.path.join(t_dir, 'config.json')):
    hf.save_llama(t_dir, t_cfg, t_params)
  s_dir = os.path.join(work, 'student_hf')
  if not os.path.exists(os.path.join(s_dir, 'config.json')):
    export_hf(s_dir, s_cfg, s_params, models['hf_dir'])
  td = torch.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else torch.float32
  teacher = transformers.LlamaForCausalLM.from_pretrained(t_dir, dtype=td).eval()
  student = transformers.AutoModelForCausalLM.from_pretrained(s_dir, dtype=td,
                                                              trust_remote_code=True).eval()
  _LOADED[key] = {'hf_teacher': (teacher, t_cfg, t_params),
                  'hf_absorbed': (student, s_cfg, s_params)}
  return _LOADED[key]


@torch.inference_mode()
def filled(model, batch: int, context: int, vocab: int, tokens: int = 32, seed: int = 0) -> list:
  """Per layer the (keys, values) tensors [B, heads, context, dim] of a pre-filled cache."""
  gen = torch.Generator().manual_seed(seed)
  ids = torch.randint(0, vocab, (1, tokens), generator=gen)
  cache = DynamicCache()
  model(input_ids=ids, cache=cache, use_cache=True)
  out = []
  for layer in cache.layers:
    pair = []
    for t in (layer.keys, layer.values):  # per channel spread over the prefill's tokens
      std = t.float().std(dim=(0, 2), keepdim=True)
      pair.append((torch.randn((batch, t.shape[1], context, t.shape[3]), generator=gen) * std
                   ).to(t.dtype))
    out.append(tuple(pair))
  return out


@torch.inference_mode()
def time_hf(model, layers: list, *, steps: int, repeats: int, vocab: int) -> list[float]:
  """Seconds per call of `steps` greedy decode steps from the pre-filled cache (first call a
  warm-up, not returned)."""
  batch = layers[0][0].shape[0]
  times = []
  for _ in range(repeats + 1):
    cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers])
    token = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(3))
    t0 = time.perf_counter()
    for _ in range(steps):
      logits = model(input_ids=token, cache=cache, use_cache=True).logits
      token = logits[:, -1].argmax(-1, keepdim=True)
    times.append(time.perf_counter() - t0)
    if cache.get_seq_length() != layers[0][0].shape[2] + steps:  # the model decoded through it
      raise RuntimeError(f'{type(model).__name__} did not extend the pre-filled cache')
  return times[1:]


def rows(models: dict, work: str, *, dtype, batch: int, context: int, steps: int, repeats: int,
         roof: dict) -> list[dict]:
  """The hf_teacher and hf_absorbed rows at one (context, batch)."""
  out = []
  for name, (model, config, params) in load(models, work, dtype).items():
    vocab = model.config.vocab_size
    layers = filled(model, batch, context, vocab)
    held = sum(t.numel() * t.element_size() for pair in layers for t in pair)
    times = time_hf(model, layers, steps=steps, repeats=repeats, vocab=vocab)
    del layers
    r = row(name, config, cast(params, dtype), dtype=dtype, batch=batch, context=context,
            times=times, steps=steps, cache_bytes=held, roof=roof, cache_read=held,
            flops=decode_step_flops(config, batch, context, fused_sum=False))
    r['torch_threads'] = torch.get_num_threads()
    out.append(r)
  return out

