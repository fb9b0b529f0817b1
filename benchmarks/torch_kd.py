"""The KD step of the distill stage in PyTorch, the stack the official X-EcoMLA code uses: a
transformers LlamaForCausalLM teacher (forward only), the exported student's own modeling file
(xecomla/export/remote/modeling_xecomla.py, loaded with trust_remote_code) trained with
torch.optim.AdamW, gradient clipping and the same learning-rate schedule, on the same batch.

The loss is xecomla's (train/losses.py: kd_loss_sums, normalised as train/steps.py does): per target
token KL(p_teacher || p_student) at temperature tau, times tau^2, plus ce_weight times the
student's cross-entropy, summed over the tokens that have a target in their own segment and divided
by their count. The torch models see one document per row (no packing masks), so a batch must have
one segment per row. `benchmarks.train_throughput --torch` times this step beside xecomla's.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

from xecomla.export import export_hf


def set_threads(n: int | None = None) -> int:
  """Intra-op threads of torch: the machine's cores unless given."""
  n = n or os.cpu_count()
  torch.set_num_threads(n)
  return n


def targets_and_weights(tokens: torch.Tensor, segment_ids: torch.Tensor):
  """losses.next_token_targets: tokens shifted left, weight 1 where the next token is in the
  same non-zero segment."""
  targets = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
  same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
  weights = torch.cat([same, torch.zeros_like(same[:, :1])], dim=1).float()
  return targets, weights


def kd_loss(student_logits, teacher_logits, tokens, segment_ids, *, kl_weight=1.0, ce_weight=0.0,
            temperature=1.0):
  """(loss per target token, sums {'loss', 'kl', 'ce', 'tokens'}) as losses.kd_loss_sums and the
  step's normalisation compute them, in float32."""
  t = temperature
  targets, w = targets_and_weights(tokens, segment_ids)
  log_ps = torch.log_softmax(student_logits.float() / t, dim=-1)
  log_pt = torch.log_softmax(teacher_logits.float() / t, dim=-1)
  kl = torch.sum(torch.exp(log_pt) * (log_pt - log_ps), dim=-1) * (t * t)
  logp1 = torch.log_softmax(student_logits.float(), dim=-1)
  ce = -torch.gather(logp1, -1, targets[..., None])[..., 0]
  sums = {'kl': torch.sum(kl * w), 'ce': torch.sum(ce * w), 'tokens': torch.sum(w)}
  sums['loss'] = kl_weight * sums['kl'] + ce_weight * sums['ce']
  return sums['loss'] / torch.clamp(sums['tokens'], min=1.0), sums


def hf_teacher(directory: str, attention: str = 'sdpa') -> transformers.LlamaForCausalLM:
  """A Hugging Face Llama directory (e.g. the init stage's conversion of the llama2.c teacher) as
  a float32 transformers model in eval mode."""
  model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                        attn_implementation=attention)
  return model.eval().requires_grad_(False)


def exported_student(directory: str, config, params, tokenizer_dir: str | None = None):
  """export_hf of the student (remote code), loaded back by transformers, float32, train mode."""
  export_hf(directory, config, params, tokenizer_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                            dtype=torch.float32)
  return model.train()


class TorchKD:
  """One KD step per `step(batch)`: teacher forward without autograd, student forward and
  backward, global-norm clipping, AdamW (weight decay on matrices only, as optim.adamw masks it;
  `adamw` = torch's fused, foreach or per-tensor loop implementation), the learning rate of
  `schedule(step)` (optim.schedule: warmup then cosine)."""

  def __init__(self, student, teacher, train_config, distill_config, schedule, adamw='fused'):
    self.student, self.teacher, self.schedule = student, teacher, schedule
    self.d, self.clip = distill_config, train_config.grad_clip
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.ndim >= 2],
               'weight_decay': train_config.weight_decay},
              {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
    kw = {'fused': {'fused': True}, 'foreach': {'foreach': True}, 'loop': {'foreach': False}}[adamw]
    self.opt = torch.optim.AdamW(groups, lr=float(schedule(0)), betas=(train_config.b1,
                                 train_config.b2), eps=1e-8, **kw)
    self.n = 0

  def loss(self, batch):
    """(loss, sums) of the current student on a batch of numpy arrays (tokens, positions,
    segment_ids [B, T]); differentiable."""
    seg = np.asarray(batch['segment_ids'])
    if not (seg == seg[:, :1]).all():
      raise ValueError('the torch KD step takes one segment per row (no packed documents).')
    tokens = torch.from_numpy(np.asarray(batch['tokens'], np.int64))
    positions = torch.from_numpy(np.asarray(batch['positions'], np.int64))
    with torch.no_grad():
      t_logits = self.teacher(input_ids=tokens, position_ids=positions).logits
    s_logits = self.student(input_ids=tokens, position_ids=positions).logits
    return kd_loss(s_logits, t_logits, tokens, torch.from_numpy(seg.astype(np.int64)),
                   kl_weight=self.d.kl_weight, ce_weight=self.d.ce_weight,
                   temperature=self.d.temperature)

  def step(self, batch) -> float:
    for g in self.opt.param_groups:
      g['lr'] = float(self.schedule(self.n))
    loss, _ = self.loss(batch)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.clip and self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
    self.opt.step()
    self.n += 1
    return float(loss.detach())


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 FLOP/s of an n x n x n torch matmul (best of `repeats`), for reference
  beside benchmarks.flops.matmul_peak (XLA's)."""
  import time
  g = torch.Generator().manual_seed(0)
  a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
  a @ b
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best
