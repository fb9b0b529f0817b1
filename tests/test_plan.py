"""The ahead-of-time planner (xecomla.planner, python -m xecomla.tools.plan): named model shapes,
topologies, the mesh search, and real TPU compiles of a tiny student and teacher for v5e:2x2
through libtpu's compile-only client (no TPU needed). libtpu comes with the test extra of
setup.cfg: without it the compile tests are skipped, or fail under CI=true."""

import json
import os
import subprocess
import sys

import pytest

from configs import r_kv_64
from xecomla import sharding
from xecomla.cli import UsageError
from xecomla.convert.hf_config import llama_config_json
from xecomla.models.config import LlamaConfig
from xecomla.planner import analytic, plan, search, shapes, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require_libtpu():
  if topology.libtpu_available():
    return
  if os.environ.get('CI') == 'true':
    pytest.fail('libtpu is not installed: CI installs the test extra (libtpu==0.0.42.1)')
  pytest.skip('libtpu is not installed (pip install libtpu==0.0.42.1): no TPU compiler here')


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  """A config.json-only Llama directory (no weights: the planner needs none): vocab 4096, dim
  128, 2 layers, 4/2 heads of 32, tied."""
  d = tmp_path_factory.mktemp('tiny') / 'tiny-llama'
  d.mkdir()
  llama = LlamaConfig(vocab_size=4096, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                      hidden_dim=256, max_seq_len=1024, tie_embeddings=True)
  (d / 'config.json').write_text(json.dumps(llama_config_json(llama)))
  return str(d)


def tiny_overrides(path, batch=16, accum=2):
  return {'teacher.path': path, 'mla.r_kv': 16, 'mla.r_q': 32, 'mla.d_qk': 16, 'mla.d_r': 16,
          'train.seq_len': 64, 'train.batch_size': batch, 'train.accum': accum,
          'dpo.max_len': 64, 'dpo.max_prompt_len': 32, 'dpo.batch_size': 8, 'dpo.accum': 1,
          'mesh.fsdp': -1}


def tiny_config(path, **kw):
  c = r_kv_64.get_config()
  for key, value in tiny_overrides(path, **kw).items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def test_named_shapes_have_the_published_parameter_counts():
  # Meta's published sizes: Llama-3.2-1B 1,235,814,400, 3.1-8B 8,030,261,248 parameters.
  counts = {'Llama-3.2-1B-Instruct': 1_235_814_400, 'Meta-Llama-3.1-8B-Instruct': 8_030_261_248}
  for name, count in counts.items():
    llama, where = shapes.model_llama(os.path.join('/nonexistent', name), 'teacher.path')
    assert 'named shape' in where
    assert shapes.n_params(analytic.trees(llama)[0]) == count, name
    assert llama.vocab_size == 128256 and llama.rope_scaling_dict['rope_type'] == 'llama3'
  assert not shapes.model_llama('x/Llama-3.1-8B', 'f')[0].tie_embeddings
  l3 = shapes.model_llama('x/llama-3.2-3b', 'f')[0]  # published: 3,212,749,824 parameters
  q, kv = l3.n_heads * l3.head_dim, l3.n_kv_heads * l3.head_dim  # (counted without building it)
  layer = 2 * l3.dim * q + 2 * l3.dim * kv + 3 * l3.dim * l3.hidden_dim + 2 * l3.dim
  assert l3.tie_embeddings and l3.n_layers == 28 and l3.head_dim == 128
  assert l3.vocab_size * l3.dim + l3.n_layers * layer + l3.dim == 3_212_749_824


def test_student_is_the_fixed_rank_mla_of_the_config():
  models = shapes.models(r_kv_64.get_config('teacher=8b'))
  s = models['student']
  assert (s.r_kv[0], s.r_q[0], s.d_qk, s.d_r, s.d_v) == (64, 1424, 32, 32, 64)
  assert s.rope_pairs == (None,) * 16 and s.kv_fraction() == 96 / 1024
  assert models['teacher'].n_layers == 32 and models['teacher'].dim == 4096
  from configs import dynamic
  notes = shapes.models(dynamic.get_config())['notes']  # per-layer ranks need the weights
  assert any('planned at the fixed ranks r_kv=64, r_q=1424' in n for n in notes)


def test_config_json_beats_the_name_and_bad_paths_are_refused(tmp_path, tiny_dir):
  named = tmp_path / 'Llama-3.2-1B'
  named.mkdir()
  (named / 'config.json').write_text(open(os.path.join(tiny_dir, 'config.json')).read())
  llama, where = shapes.model_llama(str(named), 'teacher.path')
  assert llama.dim == 128 and where.endswith('config.json')
  with pytest.raises(UsageError, match='matches no known shape'):
    shapes.model_llama(str(tmp_path / 'my-model'), 'teacher.path')


def test_topology_names():
  t = topology.parse('v5e:4x4')
  assert (t.n_devices, t.hbm_bytes, t.host_bounds(), t.accelerator_type()) == (
      16, 16 * 2 ** 30, (2, 2, 1), 'v5litepod-16')
  assert topology.parse('v5p:2x2x1').accelerator_type() == 'v5p-8'
  assert topology.parse('h200:8').platform == 'gpu'
  for bad in ('v7x:2x2', 'v5e:2x2x1', 'v5p:2x2', 'v5e:0x2', 'h100', ''):
    with pytest.raises(UsageError, match='--topology'):
      topology.parse(bad)
  need, limit = topology.parse_oom('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory '
                                   'required for HLO temporaries (41.64G) exceeds available HBM '
                                   '(15.75G).')
  assert (need, limit) == (int(41.64 * 2 ** 30), int(15.75 * 2 ** 30))


def test_search_confirms_the_first_candidate_the_compiler_accepts(tiny_dir):
  cfg = tiny_config(tiny_dir, batch=64, accum=1)
  models = shapes.models(cfg)
  mesh = {'data': 4, 'fsdp': 1, 'tensor': 1}
  shape = plan.step_shape('kd', cfg, models, 'tpu', mesh)
  terms = analytic.breakdown(shape, mesh)
  limit = 2 * terms['total']  # every candidate is predicted to fit
  ranked = search.rank(shape, 4, 1, limit, 1.0, True)
  assert ranked[0]['rows_per_device'] == 16 and ranked[0]['accum'] == 1  # fewest micro-steps
  assert all(c['micro_batch'] % (c['mesh']['data'] * c['mesh']['fsdp']) == 0 for c in ranked)
  answers = iter([limit + 1, limit - 1])
  def confirm(mesh, accum):
    return {'compiled': True, 'per_device_bytes': {'total': next(answers)}}
  got = search.suggest(shape, 4, 1, limit, terms, None, True, confirm, tries=3)
  assert got['confirmed'] and [t['fits'] for t in got['tried']] == [False, True]
  assert (got['mesh'], got['accum']) == (ranked[1]['mesh'], ranked[1]['accum'])


def test_gpu_topologies_get_the_analytic_breakdown(tiny_dir):
  config = tiny_config(tiny_dir)
  out = plan.plan(config, 'h100:8')
  m = config.mesh  # fsdp -1: every device
  assert out['per_device_bytes'] is None
  assert out['mesh'] == sharding.mesh_shape(8, m.data, m.fsdp, m.tensor) == {'data': 1, 'fsdp': 8,
                                                                             'tensor': 1}
  assert out['hbm_bytes'] == 80 * 10 ** 9 and out['fits'] == (out['analytic']['total'] <= 80e9)


def run_plan(*args):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'xecomla.tools.plan', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_plan_compiles_kd_and_dpo_for_v5e(tiny_dir, tmp_path):
  require_libtpu()
  out_json = tmp_path / 'plan.json'
  flags = [f'--config.{k}={v}' for k, v in tiny_overrides(tiny_dir).items()]
  r = run_plan('--config=configs/r_kv_64.py', '--topology=v5e:2x2', f'--json={out_json}', *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  p = json.loads(out_json.read_text())
  assert p['topology'] == 'v5e:2x2' and p['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert p['hbm_bytes'] == 16 * 2 ** 30 and p['step'] == 'kd'
  for kind in ('kd', 'dpo'):
    s = p['steps'][kind]
    pd = s['per_device_bytes']
    assert s['compiled'] and set(pd) >= {'arguments', 'outputs', 'temporaries', 'total'}
    assert pd['total'] == pd['arguments'] + pd['outputs'] + pd['temporaries'] - pd['aliased']
    assert 0 < s['limit_bytes'] <= p['hbm_bytes']  # the compiler's own limit (15.75 GiB)
    assert s['fits'] == (pd['total'] <= s['limit_bytes']) and s['fits']
    assert s['attention'] == 'splash'  # the TPU kernel was chosen for the TPU target
  assert p['per_device_bytes'] == p['steps']['kd']['per_device_bytes'] and p['fits'] is True
  assert 'KD step' in r.stdout and 'DPO step' in r.stdout


def test_a_huge_batch_does_not_fit_and_gets_a_mesh_that_should(tiny_dir):
  require_libtpu()
  cfg = tiny_config(tiny_dir, batch=32768, accum=1)
  out = plan.plan(cfg, 'v5e:2x2', kinds=('kd',), confirm=0)
  kd = out['steps']['kd']
  assert not kd['compiled'] and not out['fits'] and 'RESOURCE_EXHAUSTED' in kd['error']
  assert kd['per_device_bytes']['total'] > kd['limit_bytes']  # the compiler's figure
  s = out['suggestion']
  assert s is not None and not s['confirmed'] and s['accum'] > 1
  assert s['predicted_total'] <= search.MARGIN * kd['limit_bytes']
  assert 32768 % s['accum'] == 0 and s['micro_batch'] % (s['mesh']['data'] * s['mesh']['fsdp']) == 0


def test_bad_input_is_one_line_and_exit_2(tiny_dir):
  r = run_plan('--config=configs/r_kv_64.py', '--topology=v7x:2x2')
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: --topology='v7x:2x2' is not known")
  cfg = tiny_config(tiny_dir)
  cfg.mesh.fsdp = 3
  with pytest.raises(UsageError, match='do not divide into fsdp=3'):
    plan.plan(cfg, 'v5e:2x2')
  cfg.mesh.fsdp, cfg.train.accum = 1, 3
  with pytest.raises(UsageError, match='train.batch_size=16 is not divisible by train.accum=3'):
    plan.plan(cfg, 'v5e:2x2')


def test_a_batch_the_mesh_cannot_split_is_a_step_that_does_not_fit(tiny_dir):
  cfg = tiny_config(tiny_dir, batch=16, accum=4)  # micro-batches of 4 rows over 8 GPUs
  kd = plan.plan(cfg, 'h100:8', kinds=('kd',))['steps']['kd']
  assert not kd['fits'] and 'train.batch_size / train.accum=4 is not divisible' in kd['error']
  s = kd['suggestion']
  assert (s['accum'], s['micro_batch'], s['rows_per_device']) == (1, 16, 2)


def test_mesh_sizes_agree_with_sharding_make_mesh():
  """The planner sizes meshes without devices (GPU plans); it must say what make_mesh says."""
  import jax
  from xecomla import sharding
  from xecomla.planner import compile as aot
  for sizes in [(-1, 1, 1), (-1, 2, 2), (2, -1, 1), (-1, -1, 2), (1, 8, 1), (-1, 3, 1),
                (3, -1, 1), (2, 2, 1), (0, 1, 1)]:
    try:
      want = dict(sharding.make_mesh(*sizes, devices=jax.devices()[:8]).shape)
    except UsageError as e:
      with pytest.raises(UsageError) as got:
        aot.mesh_sizes(8, *sizes)
      assert str(got.value) == str(e)
      continue
    assert aot.mesh_sizes(8, *sizes) == want, sizes
