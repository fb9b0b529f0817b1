"""PyTorch modeling of an xecomla MLA student (loaded with trust_remote_code=True).

Each layer is the teacher's Llama block with Multi-head Latent Attention:
  C^Q = norm?(H W^DQ)            (q_a_proj; q_proj when the query is uncompressed)
  [Q^C_i, Q^R_i] = C^Q W^UQR      (q_b_proj; per head: d_qk no-RoPE then d_r RoPE dims)
  [C^KV, K^R] = H [W^DKV, W^KR]   (kv_a_proj_with_mqa), C^KV = norm?(C^KV), K^R rotated, shared
  [W^UK_i, W^UV_i]                (kv_b_proj; per head: d_qk key rows then d_v value rows)
  head i: softmax((Q^C_i W^UK_i^T C^KV^T + Q^R_i K^R^T) / sqrt(d_qk + d_r)) C^KV W^UV_i, then o_proj.
The up-projections are absorbed: the cache (a standard transformers Cache) holds per layer only
C^KV [B, 1, S, r_kv] and the rotated K^R [B, 1, S, d_r]. RoPE is rotate-half; kept teacher pairs
use the teacher's frequencies, `rope_pairs[l] = None` a fresh RoPE over d_r dimensions.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
  from .configuration_xecomla import XEcoMLAConfig
except ImportError:  # loaded as a plain module
  from configuration_xecomla import XEcoMLAConfig


def rope_inv_freq(dim, theta, scaling):
  inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
  if not scaling or scaling.get('rope_type', 'default') == 'default':
    return inv_freq
  if scaling['rope_type'] != 'llama3':
    raise ValueError(f"rope_type {scaling['rope_type']!r} is not supported")
  factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
  old_len = scaling['original_max_position_embeddings']
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv_freq
  scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
  return torch.where(medium, smoothed, scaled)


def rotate_half(x):
  half = x.shape[-1] // 2
  return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, positions, inv_freq):
  """x [B, H, T, D] (or [B, 1, T, D]), positions [B, T]."""
  freqs = positions[..., None].float() * inv_freq.float()
  emb = torch.cat((freqs, freqs), dim=-1)[:, None]
  return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


class RMSNorm(nn.Module):

  def __init__(self, dim, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x.to(dtype)


class MLAAttention(nn.Module):

  def __init__(self, config, layer):
    super().__init__()
    x, llama = config.xecomla, config.xecomla['llama']
    self.layer = layer
    self.n, d = llama['n_heads'], llama['dim']
    self.d_qk, self.d_r, self.d_v = x['d_qk'], x['d_r'], x['d_v']
    self.r_q, self.r_kv = x['r_q'][layer], x['r_kv'][layer]
    self.scale = (self.d_qk + self.d_r) ** -0.5
    q_out = self.n * (self.d_qk + self.d_r)
    if self.r_q is None:
      self.q_proj = nn.Linear(d, q_out, bias=False)
    else:
      self.q_a_proj = nn.Linear(d, self.r_q, bias=False)
      if x['latent_norm']:
        self.q_a_layernorm = RMSNorm(self.r_q, x['latent_norm_eps'])
      self.q_b_proj = nn.Linear(self.r_q, q_out, bias=False)
    self.kv_a_proj_with_mqa = nn.Linear(d, self.r_kv + self.d_r, bias=False)
    if x['latent_norm']:
      self.kv_a_layernorm = RMSNorm(self.r_kv, x['latent_norm_eps'])
    self.kv_b_proj = nn.Linear(self.r_kv, self.n * (self.d_qk + self.d_v), bias=False)
    self.o_proj = nn.Linear(self.n * self.d_v, d, bias=False)
    self.rope_pairs = x['rope_pairs'][layer]
    self.rope = (llama['head_dim'], llama['rope_theta'], llama['rope_scaling'])
    self.latent_norm = x['latent_norm']

  def inv_freq(self, device):
    """RoPE inverse frequencies of the d_r RoPE dims (computed here, not stored: a
    non-persistent buffer would come out of from_pretrained's meta-device init uninitialised)."""
    head_dim, theta, scaling = self.rope
    if self.rope_pairs is None:
      inv = rope_inv_freq(self.d_r, theta, scaling)
    else:
      inv = rope_inv_freq(head_dim, theta, scaling)[self.rope_pairs]
    return inv.to(device)

  def forward(self, h, positions, key_mask, cache):
    b, t, _ = h.shape
    if self.r_q is None:
      q = self.q_proj(h)
    else:
      cq = self.q_a_proj(h)
      if self.latent_norm:
        cq = self.q_a_layernorm(cq)
      q = self.q_b_proj(cq)
    q = q.view(b, t, self.n, self.d_qk + self.d_r).transpose(1, 2)
    q_c, q_r = q[..., :self.d_qk], q[..., self.d_qk:]
    c_kv, k_r = self.kv_a_proj_with_mqa(h).split([self.r_kv, self.d_r], dim=-1)
    if self.latent_norm:
      c_kv = self.kv_a_layernorm(c_kv)
    c_kv = c_kv.view(b, 1, t, self.r_kv)
    inv_freq = self.inv_freq(h.device)
    k_r = apply_rope(k_r.view(b, 1, t, self.d_r), positions, inv_freq)
    q_r = apply_rope(q_r, positions, inv_freq)
    if cache is not None:
      c_kv, k_r = cache.update(c_kv, k_r, self.layer)
    w = self.kv_b_proj.weight.view(self.n, self.d_qk + self.d_v, self.r_kv)
    w_uk, w_uv = w[:, :self.d_qk], w[:, self.d_qk:]
    q_lat = torch.einsum('bnth,nhr->bntr', q_c, w_uk)                        # absorbed query
    scores = (torch.matmul(q_lat, c_kv.transpose(-1, -2)) + torch.matmul(q_r, k_r.transpose(-1, -2)))
    scores = scores.float() * self.scale
    scores = scores.masked_fill(~key_mask[:, None], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(c_kv.dtype)
    o_lat = torch.matmul(probs, c_kv)                                        # [B, N, T, r_kv]
    out = torch.einsum('bntr,nvr->btnv', o_lat, w_uv).reshape(b, t, self.n * self.d_v)
    return self.o_proj(out)


class MLP(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.gate_proj = nn.Linear(dim, hidden, bias=False)
    self.up_proj = nn.Linear(dim, hidden, bias=False)
    self.down_proj = nn.Linear(hidden, dim, bias=False)

  def forward(self, x):
    return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):

  def __init__(self, config, layer):
    super().__init__()
    llama = config.xecomla['llama']
    self.input_layernorm = RMSNorm(llama['dim'], llama['norm_eps'])
    self.self_attn = MLAAttention(config, layer)
    self.post_attention_layernorm = RMSNorm(llama['dim'], llama['norm_eps'])
    self.mlp = MLP(llama['dim'], llama['hidden_dim'])

  def forward(self, h, positions, key_mask, cache):
    h = h + self.self_attn(self.input_layernorm(h), positions, key_mask, cache)
    return h + self.mlp(self.post_attention_layernorm(h))


class XEcoMLAPreTrainedModel(PreTrainedModel):
  config_class = XEcoMLAConfig
  base_model_prefix = 'model'
  _no_split_modules = ['Block']
  _supports_cache_class = True

  def _init_weights(self, module):
    if isinstance(module, nn.Linear):
      nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Embedding):
      nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, RMSNorm):
      nn.init.ones_(module.weight)


class XEcoMLAModel(XEcoMLAPreTrainedModel):

  def __init__(self, config):
    super().__init__(config)
    llama = config.xecomla['llama']
    self.embed_tokens = nn.Embedding(llama['vocab_size'], llama['dim'])
    self.layers = nn.ModuleList([Block(config, l) for l in range(llama['n_layers'])])
    self.norm = RMSNorm(llama['dim'], llama['norm_eps'])
    self.post_init()

  def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
    b, t = input_ids.shape
    past = cache.get_seq_length() if cache is not None else 0
    total = past + t
    if attention_mask is None:
      attention_mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)
    valid = attention_mask[:, -total:].bool()                                   # [B, S]
    if position_ids is None:
      position_ids = (attention_mask[:, -total:].long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    slots = torch.arange(total, device=input_ids.device)
    causal = slots[None, :] <= (past + torch.arange(t, device=input_ids.device))[:, None]
    key_mask = causal[None] & valid[:, None, :]                                 # [B, T, S]
    h = self.embed_tokens(input_ids)
    for block in self.layers:
      h = block(h, position_ids, key_mask, cache)
    return self.norm(h)


class XEcoMLAForCausalLM(XEcoMLAPreTrainedModel, GenerationMixin):
  _tied_weights_keys = {'lm_head.weight': 'model.embed_tokens.weight'}

  def __init__(self, config):
    super().__init__(config)
    self.model = XEcoMLAModel(config)
    llama = config.xecomla['llama']
    self.lm_head = nn.Linear(llama['dim'], llama['vocab_size'], bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed_tokens

  def get_output_embeddings(self):
    return self.lm_head

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
              past_key_values=None, use_cache=None, labels=None, logits_to_keep=0, **kwargs):
    cache = cache if cache is not None else past_key_values
    if use_cache and cache is None:
      cache = DynamicCache(config=self.config)
    h = self.model(input_ids, attention_mask, position_ids, cache)
    if logits_to_keep:
      h = h[:, -logits_to_keep:]
    logits = self.lm_head(h).float()
    loss = None
    if labels is not None:
      loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                         labels[:, 1:].reshape(-1), ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
