"""The stories260K study: X-EcoMLA's claims measured in miniature on a real pre-trained Llama.

  python -m experiments.stories260k.study                    # everything (resumable)
  python -m experiments.stories260k.study --only=grid,recipe  # some parts
  python -m experiments.stories260k.study --report_only      # tables and plots from saved runs
  python -m experiments.stories260k.study --only=gap --names=gap_align_1000_s1   # chosen runs

Every run goes through the product itself (xecomla.pipeline: init -> eval [-> align -> eval] ->
distill -> eval) in its own work directory under --runs; a finished run is read back, not redone,
and so is each evaluation before distillation (W/study_before.json, W/study_after_align.json).
Per run it stores study.json (settings, KV cache, ranks, held-out NLL before and after
distillation, the learning curve, wall time, throughput). `report.py` turns them into
results/*.md tables and plots.

Evaluation (the README definition): all 1000 held-out TinyStories validation stories, and the
first 1000 paragraphs of tiny-shakespeare (out of domain), and story completion (eval.story_mc:
the true last sentence of each of the first 500 stories among 4 endings, xecomla/story_mc.py),
after training and for the teacher; the 1000 stories alone before training. Distillation reads
tinystories_train_2MiB.txt only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from absl import app, flags, logging

from configs import stories260k
from experiments.stories260k import headline, plan, report
from xecomla import fileio, pipeline

_RUNS = flags.DEFINE_string('runs', 'runs/study', 'Where the runs\' work directories go.')
_OUT = flags.DEFINE_string('out', 'experiments/stories260k/results', 'Tables, plots, JSON.')
_ONLY = flags.DEFINE_list('only', [], f'Parts to run (default all): {", ".join(plan.PARTS)}.')
_NAMES = flags.DEFINE_list('names', [], 'Only these runs of the parts, in this order (e.g. to '
                           'share a part between two processes: a run is claimed only when done).')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only rebuild tables and plots.')
_README = flags.DEFINE_string('readme', 'README.md', 'The README whose study headline table '
                              'the report regenerates (between headline.py\'s markers).')
_KEEP = flags.DEFINE_bool('keep_checkpoints', False, 'Keep each run\'s checkpoints.')


def set_dotted(c, key: str, value) -> None:
  node = c
  parts = key.split('.')
  for p in parts[:-1]:
    node = node[p]
  if parts[-1] not in node:  # an unlocked ConfigDict would quietly add a misspelt field
    raise KeyError(f'{key} is not a config field')
  node[parts[-1]] = value


# The study's starting point, pinned here so that changing the demo's defaults in
# configs/stories260k.py does not change the study: every run states what differs from this.
BASE = {'mla.init': 'svd', 'mla.r_kv': 8, 'mla.d_r': 2, 'mla.d_qk': 6, 'mla.r_q': None,
        'mla.rope_dims': 'paper', 'mla.rope_key': 'mean', 'mla.latent_norm': False,
        'train.lr': 3e-3, 'train.batch_size': 16, 'train.seq_len': 256,
        'distill.kl_weight': 1.0, 'distill.ce_weight': 0.0, 'distill.hidden_weight': 0.0}


def config_for(over: dict):
  c = stories260k.get_config()
  for k, v in BASE.items():
    set_dotted(c, k, v)
  c.eval.max_docs = 0            # all 1000 held-out stories
  c.eval.extra_max_docs = 1000   # tiny-shakespeare paragraphs (out of domain)
  c.eval.teacher = False
  c.eval.sample_tokens = 60
  c.eval.story_mc = 500          # story completion on the first 500 held-out stories (demo: 200)
  c.train.log_every = 25
  c.train.ckpt_every = 10_000
  for k, v in over.items():
    set_dotted(c, k, v)
  return c


def curve(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'distill', 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  keep = ('step', 'loss', 'kl', 'ce', 'eval_nll', 'tokens_per_s', 'lr')
  return [{k: v for k, v in json.loads(l).items() if k in keep} for l in open(path)]


def evaluated(workdir: str, phase: str, spec: dict, stage: str) -> dict:
  """Runs `stage` (init, or align after it) and evaluates the student it leaves on the 1000 held-out
  stories, once: {'student': the evaluation, 'summary': what the stage returned}, kept in
  W/study_<phase>.json, so a rerun after a stop reads it back instead of evaluating whichever
  student came last."""
  path = os.path.join(workdir, f'study_{phase}.json')
  if os.path.exists(path):
    return json.load(open(path))
  c = config_for(spec['over'])
  c.stages = f'{stage},eval'
  c.eval.extra_paths = ''
  c.eval.story_mc = 0  # scored after training only
  res = pipeline.run(c, workdir)
  if res['eval']['student']['stage'] != stage:
    raise RuntimeError(f'{workdir}: evaluated the {res["eval"]["student"]["stage"]} student, not '
                       f'{stage}\'s: delete the directory and rerun {spec["name"]}.')
  result = {'student': res['eval']['student'], 'summary': res[stage]}
  fileio.atomic_write_json(path, result)
  return result


def run_one(spec: dict) -> dict:
  name = spec['name']
  workdir = os.path.join(_RUNS.value, name)
  done = os.path.join(workdir, 'study.json')
  if os.path.exists(done):
    return json.load(open(done))
  logging.info('study run %s: %s', name, spec)
  t0 = time.perf_counter()
  first = evaluated(workdir, 'before', spec, 'init')
  before = first['student']
  out = {**spec, 'before': before, 'kv_values_per_token': before['kv_values_per_token'],
         'kv_fraction': before['kv_report']['kv_fraction'], 'ranks': before['ranks'],
         'init_report': first['summary']}  # init's report, as W/init/report.json holds it
  if spec.get('steps'):
    c = config_for(spec['over'])
    c.train.steps = spec['steps']
    c.stages = 'distill,dpo,eval' if spec.get('dpo') else 'distill,eval'
    t1 = time.perf_counter()
    if spec.get('align'):  # distill then starts from the aligned student
      aligned = evaluated(workdir, 'after_align', spec, 'align')
      out['after_align'], out['align'] = aligned['student'], aligned['summary']
    res = pipeline.run(c, workdir)
    out['after'] = res['eval']['student']
    out['distill'] = res['distill']
    if spec.get('dpo'):
      out['dpo'] = res['dpo']
    out['train_wall_s'] = round(time.perf_counter() - t1, 1)
    out['curve'] = curve(workdir)
  out['wall_s'] = round(time.perf_counter() - t0, 1)
  with open(done, 'w') as f:
    json.dump(out, f, indent=1)
  if not _KEEP.value:
    for stage in ('distill', 'dpo'):
      shutil.rmtree(os.path.join(workdir, stage, 'ckpt'), ignore_errors=True)
  return out


def teacher_row() -> dict:
  path = os.path.join(_RUNS.value, 'teacher.json')
  if os.path.exists(path):
    return json.load(open(path))
  c = config_for({})
  c.stages = 'eval'
  c.eval.teacher = True
  workdir = os.path.join(_RUNS.value, 'teacher')
  r = pipeline.run(c, workdir)['eval']['teacher']
  c.eval.max_docs = 200
  c.eval.extra_paths = ''
  c.eval.story_mc = 0
  r['first200_nll'] = pipeline.run(c, workdir)['eval']['teacher']['nll']
  os.makedirs(_RUNS.value, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(r, f, indent=1)
  return r


def teacher_data_stats(root: str, saved: list[dict]) -> list[dict]:
  """done.json of every finished teacher-story cache under root (throughput, counts); a cache
  no longer on this machine keeps its entry in `saved` (the last report's)."""
  out = {s['key']: s for s in saved if 'key' in s}
  for key in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    done = os.path.join(root, key, 'done.json')
    if os.path.exists(done):
      stats = json.load(open(done))
      if 'tokens' not in stats:  # a cache from before done.json counted them
        from xecomla import teacher_data
        stats['tokens'] = sum(map(len, teacher_data.read_cache(os.path.join(root, key),
                                                               stats['stories'])))
      out[key] = {**stats, 'key': key, 'mean_tokens': stats['tokens'] / stats['stories']}
  return [out[k] for k in sorted(out)]


def saved_report() -> dict:
  """The last report (results.json: teacher, runs, teacher_data): a machine holding only some
  work directories (a part rerun elsewhere) still reports every row; a run found under --runs
  replaces its entry."""
  path = os.path.join(_OUT.value, 'results.json')
  return json.load(open(path)) if os.path.exists(path) else {}


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  parts = _ONLY.value or list(plan.PARTS)
  unknown = set(parts) - set(plan.PARTS)
  if unknown:
    print(f'error: unknown parts {sorted(unknown)}; choose from {", ".join(plan.PARTS)}',
          file=sys.stderr)
    sys.exit(2)
  t0 = time.perf_counter()
  if not _REPORT_ONLY.value:
    teacher_row()
    chosen = {}
    for part in parts:
      for spec in plan.specs(part, lambda s: run_one(s)):
        if not _NAMES.value:
          run_one(spec)
        elif spec['name'] in _NAMES.value:
          chosen[spec['name']] = spec
    unknown = [n for n in _NAMES.value if n not in chosen]
    if unknown:
      print(f'error: no run named {", ".join(unknown)} in parts {", ".join(parts)}', file=sys.stderr)
      sys.exit(2)
    for name in _NAMES.value:
      run_one(chosen[name])
  saved = saved_report()
  runs = dict(saved.get('runs', {}))
  if os.path.isdir(_RUNS.value):
    for name in sorted(os.listdir(_RUNS.value)):
      path = os.path.join(_RUNS.value, name, 'study.json')
      if os.path.exists(path):
        runs[name] = json.load(open(path))
  teacher_path = os.path.join(_RUNS.value, 'teacher.json')
  teacher = json.load(open(teacher_path)) if os.path.exists(teacher_path) else saved['teacher']
  report.write(_OUT.value, teacher, runs, wall_s=time.perf_counter() - t0,
               teacher_data=teacher_data_stats(plan.TEACHER_CACHE, saved.get('teacher_data', [])))
  if headline.update(_README.value, headline.table(teacher, runs)):
    print(f'headline table regenerated in {_README.value}')
  print(f'results in {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
