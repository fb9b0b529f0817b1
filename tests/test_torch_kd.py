"""The PyTorch KD step of benchmarks/torch_kd.py computes xecomla's KD loss on the same weights and
batch: built exactly as `benchmarks.train_throughput --torch` builds both steps, on a tiny random
GQA teacher and its SVD-initialised student, so the throughput comparison cannot silently time
different work."""

import numpy as np
import pytest
import torch

from benchmarks import torch_kd
from benchmarks.kd_steps import torch_side, xecomla_trainer
from configs.common import base_config
from tests.conftest import f32_bound, forward_ops, max_abs, within
from xecomla import sharding
from xecomla.convert import hf
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig

TEACHER = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=48, max_seq_len=64)
B, T = 8, 24   # B divides the 8 forced CPU devices of the data axis


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  return z - np.max(z, -1, keepdims=True) - np.log(np.sum(np.exp(z - np.max(z, -1, keepdims=True)),
                                                          -1, keepdims=True))


def test_first_step_loss_is_xecomlas(tmp_path):
  # Not the defaults (KL only, temperature 1), so every term and the temperature are compared.
  kl_weight, ce_weight, temperature = 0.7, 0.5, 2.0
  t_params = transformer.init_params(TEACHER, 0)
  student, s_params, _ = upcycle(TEACHER, t_params, InitOptions(r_kv=2, r_q=4, d_r=2, round_to=1))
  hf.save_llama(str(tmp_path / 'teacher_hf'), TEACHER, t_params)
  config = base_config()
  config.distill.kl_weight, config.distill.ce_weight = kl_weight, ce_weight
  config.distill.temperature = temperature
  config.distill.loss_chunk = 8  # three chunks of the 24 positions
  trainer, schedule = xecomla_trainer(config, TEACHER, student, sharding.make_mesh(-1, 1, 1))
  threads = torch.get_num_threads()
  try:
    kd, _, _ = torch_side(str(tmp_path), str(tmp_path / 'teacher_hf'), student, s_params, config,
                          schedule, threads=1)
    check(kd, trainer, student, s_params, t_params, kl_weight, ce_weight, temperature)
  finally:
    torch.set_num_threads(threads)


def check(kd, trainer, student, s_params, t_params, kl_weight, ce_weight, temperature):
  rng = np.random.default_rng(0)
  host = {'tokens': rng.integers(0, TEACHER.vocab_size, (B, T)).astype(np.int32),
          'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1)),
          'segment_ids': np.ones((B, T), np.int32)}
  tokens = torch.from_numpy(host['tokens'].astype(np.int64))
  with torch.no_grad():
    torch_loss, sums = kd.loss(host)
    z_s, z_t = (m(input_ids=tokens).logits.numpy() for m in (kd.student, kd.teacher))
  state = trainer.init_state(s_params)
  _, metrics = trainer.step(state, trainer.put_frozen(t_params), host)
  assert float(sums['tokens']) == float(metrics['tokens']) == B * (T - 1)
  # Each side's logits are within a float32 rounding bound of the exact model's (as
  # tests/test_export.py bounds two float32 implementations of the same model; the magnitudes
  # are taken from the torch side's logits).
  d_s = f32_bound(max_abs(z_s), forward_ops(TEACHER, T, max(student.r_kv) + max(student.r_q)))
  d_t = f32_bound(max_abs(z_t), forward_ops(TEACHER, T))
  # The loss per token moves with the logits by at most: KL (times tau^2, logits over tau):
  # tau sum|p_s - p_t| <= 2 tau per unit of student logit, tau sum p_t |log p_t - log p_s - KL|
  # <= 2 tau M per unit of teacher logit (M = max |log p_t - log p_s|); CE: sum|p_s - onehot|
  # <= 2. Plus rounding of the sums over the vocabulary and the B (T - 1) tokens.
  lt, ls = log_softmax64(z_t / temperature), log_softmax64(z_s / temperature)
  m = np.abs(lt - ls).max()
  scale = kl_weight * temperature ** 2 * 2 * max(np.abs(lt).max(), np.abs(ls).max()) + \
      ce_weight * np.abs(log_softmax64(z_s)).max()
  bound = (kl_weight * 2 * temperature * (d_s + m * d_t) + ce_weight * 2 * d_s +
           f32_bound(scale, TEACHER.vocab_size + B * T))
  within(abs(float(metrics['loss']) - float(torch_loss)), bound)
  # ... and it is the step's loss: the first torch step returns it.
  assert kd.step(host) == pytest.approx(float(torch_loss), abs=0)


def test_kd_loss_refuses_packed_rows_and_matches_its_definition():
  rng = np.random.default_rng(1)
  zs, zt = rng.normal(size=(1, 5, 7)), rng.normal(size=(1, 5, 7))
  tokens = torch.tensor([[1, 2, 3, 4, 5]])
  seg = torch.tensor([[1, 1, 2, 2, 0]])  # targets only inside a segment: positions 0 and 2
  loss, sums = torch_kd.kd_loss(torch.tensor(zs), torch.tensor(zt), tokens, seg, ce_weight=1.0)
  lt, ls = log_softmax64(zt), log_softmax64(zs)
  kl = np.sum(np.exp(lt) * (lt - ls), -1)[0]
  ce = -ls[0, [0, 2], [2, 4]]
  # float32 log-softmax over 7 logits of size ~3, sums of 2 terms.
  within(abs(float(loss) - (kl[0] + kl[2] + ce.sum()) / 2), f32_bound(4 * max_abs(zs), 7 + 2))
  assert float(sums['tokens']) == 2
  kd = torch_kd.TorchKD.__new__(torch_kd.TorchKD)
  with pytest.raises(ValueError, match='one segment per row'):
    kd.loss({'tokens': np.ones((1, 4)), 'positions': np.zeros((1, 4)),
             'segment_ids': np.array([[1, 1, 2, 2]])})
