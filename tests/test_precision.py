"""The conversion does not depend on the accelerator's matmul precision.

On TPU a float32 matmul at default precision rounds its operands to bfloat16 (TF32 on recent GPUs);
on CPU, jax.default_matmul_precision('bfloat16') changes nothing (measured: identical results).
So that this test fails on CPU too if the conversion went back to default-precision jnp matmuls,
`tpu_default_matmuls` makes the CPU do what a TPU does: it lowers every dot_general whose precision
is unset or DEFAULT with its float32 operands rounded to bfloat16 (accumulating in float32), and
leaves HIGHEST alone. The student converted that way, under
jax.default_matmul_precision('bfloat16'), must equal the one converted under
jax.enable_x64() without the emulation, parameter by parameter, to 1e-6 of each
parameter's largest magnitude, and no float32 matmul may be lowered at default precision at all.
Measured with the conversion as it was before (jnp float32 SVD of whiten.T @ m, calibration at
default precision): Gram matrices off by 2.9e-3 relative, activation-aware students by 1.4-2
(singular vectors change); now: 0 (bit-identical).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.lax import lax as lax_internal

from tests.conftest import VALID_TEXT
from xecomla.convert import calib, hf
from xecomla.convert.upcycle import InitOptions, upcycle
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig
from xecomla.tokenizer import Tokenizer

GQA = LlamaConfig(vocab_size=61, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                  hidden_dim=64, max_seq_len=64)
TOLERANCE = 1e-6


def _round_to_bf16(x):
  return x.astype(jnp.bfloat16).astype(x.dtype)


@contextlib.contextmanager
def tpu_default_matmuls():
  """CPU dot_generals at unset/DEFAULT precision take bfloat16-rounded float32 operands, as on TPU.

  Yields a list that counts the float32 dot_generals lowered at that precision.
  """
  table = mlir._platform_specific_lowerings['cpu']
  original = table[lax_internal.dot_general_p]
  lowered = [0]

  def rule(ctx, lhs, rhs, *, precision, **kwargs):
    if precision is None or all(p == jax.lax.Precision.DEFAULT for p in precision):
      lowered[0] += any(aval.dtype == np.float32 for aval in ctx.avals_in)
      rounded = []
      for x, aval in zip((lhs, rhs), ctx.avals_in):
        if aval.dtype == np.float32:
          x, = mlir.lower_fun(_round_to_bf16, multiple_results=False)(
              ctx.replace(avals_in=[aval], avals_out=[aval]), x)
        rounded.append(x)
      lhs, rhs = rounded
    return original.rule(ctx, lhs, rhs, precision=precision, **kwargs)

  table[lax_internal.dot_general_p] = mlir.LoweringRuleEntry(rule, original.inline)
  jax.clear_caches()  # nothing compiled before may be reused, nor what is compiled here after
  try:
    with jax.default_matmul_precision('bfloat16'):
      yield lowered
  finally:
    table[lax_internal.dot_general_p] = original
    jax.clear_caches()


def max_rel_diff(a, b) -> float:
  """max |a - b| / max |b| over each pair of leaves; the largest."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    worst = max(worst, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
  return worst


def test_the_emulation_rounds_default_precision_matmuls_only():
  x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
  exact = x.astype(np.float64) @ x.astype(np.float64)
  plain = np.asarray(jnp.asarray(x) @ jnp.asarray(x))
  with jax.default_matmul_precision('bfloat16'):  # on CPU alone: no effect
    assert np.array_equal(np.asarray(jnp.asarray(x) @ jnp.asarray(x)), plain)
  with tpu_default_matmuls() as lowered:
    default = np.asarray(jnp.einsum('ij,jk->ik', x, x))
    highest = np.asarray(jnp.einsum('ij,jk->ik', x, x, precision=jax.lax.Precision.HIGHEST))
  assert lowered == [1]
  assert max_rel_diff(default, exact) > 1e-3     # bfloat16 operands: 8 significant bits
  assert max_rel_diff(highest, exact) < 1e-6
  assert np.array_equal(np.asarray(jnp.asarray(x) @ jnp.asarray(x)), plain)  # restored


def random_teacher():
  return GQA, transformer.init_params(GQA, 4)


def stories_teacher(stories_dir):
  return hf.load_llama(stories_dir)


def calibration(llama, stories_dir):
  if stories_dir is None:
    rng = np.random.default_rng(1)
    return [list(rng.integers(1, llama.vocab_size, n)) for n in (40, 64, 17, 50)], 64
  seqs = calib.calibration_seqs(Tokenizer(stories_dir), VALID_TEXT, 1, llama.max_seq_len, 16,
                                2048)
  return seqs, llama.max_seq_len


def convert(llama, params, opts, seqs, row_length):
  grams = None
  if opts.method == 'activation':
    grams = calib.attention_input_grams(llama, params, seqs, row_length)
  _, student, _ = upcycle(llama, params, opts,
                          whiteners=None if grams is None else calib.whiteners(grams))
  return grams, student


@pytest.mark.parametrize('teacher', ['random', 'stories260K'])
@pytest.mark.parametrize('method', ['svd', 'activation'])
def test_conversion_is_the_same_at_bfloat16_default_precision(request, teacher, method):
  stories_dir = request.getfixturevalue('stories_dir') if teacher == 'stories260K' else None
  llama, params = random_teacher() if stories_dir is None else stories_teacher(stories_dir)
  seqs, row_length = calibration(llama, stories_dir)
  opts = InitOptions(method=method, r_kv=16, r_q=24, d_r=4, rope_dims='norm', round_to=1)
  with jax.enable_x64():
    grams64, ref = convert(llama, params, opts, seqs, row_length)
  with tpu_default_matmuls() as lowered:
    grams, student = convert(llama, params, opts, seqs, row_length)
  assert lowered == [0]  # no float32 matmul at default precision anywhere in the conversion
  if method == 'activation':
    assert max_rel_diff(grams, grams64) <= TOLERANCE
  assert max_rel_diff(student, ref) <= TOLERANCE
  for leaf in jax.tree.leaves(student):
    assert np.asarray(leaf).dtype == np.float32
