"""Stage `eval`: the teacher and the latest student (dpo, else distill, else init) on every
evaluation text (README definition), multiple-choice tasks (with eval.story_mc, also story
completion built from eval.path: W/story_mc.jsonl), the KV-cache report and a greedy sample; writes
W/results.json and W/results.md."""

from __future__ import annotations

import os
import time
from typing import Any

from etils import epath

from xecomla import eval as evaluation
from xecomla import data_checks, distributed, fileio, generate, story_mc, workdir as wd
from xecomla.cli import UsageError
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig, MLAConfig
from xecomla.tokenizer import Tokenizer


def text_paths(config) -> list[str]:
  paths = [config.eval.path] + [p for p in config.eval.extra_paths.split(',') if p]
  for p in paths:
    if p and not epath.Path(p).exists():
      raise UsageError(f'evaluation text {p} does not exist: fix eval.path / eval.extra_paths.')
  return [p for p in paths if p]


def mc_paths(config) -> list[str]:
  paths = [p for p in config.eval.mc_paths.split(',') if p]
  for p in paths:
    if not epath.Path(p).exists():
      raise UsageError(f'multiple-choice file {p} does not exist: fix eval.mc_paths.')
  return paths


def story_rows(config) -> list[dict[str, Any]]:
  """The eval.story_mc story-completion items built from all of eval.path's stories
  (xecomla/story_mc.py): UsageError when the settings or the stories cannot make them."""
  n, k = config.eval.story_mc, config.eval.story_mc_choices
  if n < 0 or k < 2:
    raise UsageError(f'eval.story_mc={n}, eval.story_mc_choices={k}: give story_mc >= 0 items '
                     '(0 = off) and story_mc_choices >= 2.')
  if not config.eval.path:
    raise UsageError('eval.story_mc needs the held-out stories of eval.path: set eval.path, or '
                     'eval.story_mc=0.')
  try:
    return story_mc.build_rows(evaluation.read_documents(config.eval.path), items=n, choices=k,
                               seed=config.eval.story_mc_seed)
  except ValueError as e:
    raise UsageError(f'eval.story_mc: {config.eval.path}: {e}: lower eval.story_mc or '
                     'eval.story_mc_choices.') from e


def max_len(config, llama: LlamaConfig) -> int:
  """Tokens predicted per document (and per multiple-choice request): eval.max_len, at most the
  model's maximum length (131,072 for Llama-3.x; rows that long do not fit an accelerator)."""
  return min(config.eval.max_len, llama.max_seq_len)


def cache_dtype(config, model_config) -> str:
  """eval.cache_dtype for this model ('' = no evaluation through the cache): a quantised (MLA
  latent) dtype is for the student; the teacher's GQA cache then stays in the compute dtype."""
  name = config.eval.cache_dtype
  if name in kvcache.QUANTISED and not isinstance(model_config, MLAConfig):
    return 'auto'
  return name


def validate(config, workdir: str | None, teacher, stages: list[str]) -> None:
  """Every evaluation file exists and is usable: text with at least one document, well-formed
  multiple-choice rows (file and line named); eval.cache_dtype is a cache format."""
  if config.eval.cache_dtype not in ('',) + kvcache.CACHE_DTYPES:
    raise UsageError(f'eval.cache_dtype={config.eval.cache_dtype!r} is not one of '
                     f"{('',) + kvcache.CACHE_DTYPES}: '' skips the NLL through the decode cache.")
  for p in text_paths(config):
    data_checks.check_text(p, 'eval.path' if p == config.eval.path else 'eval.extra_paths')
  for p in mc_paths(config):
    try:
      rows = evaluation.read_mc(p)
    except UnicodeDecodeError as e:
      raise UsageError(f'eval.mc_paths: {p} is not UTF-8 text: re-encode it as UTF-8.') from e
    except ValueError as e:  # JSON errors and malformed rows
      raise UsageError(f'eval.mc_paths: {str(e).rstrip(".")}: fix or remove that line.') from e
    if not rows:
      raise UsageError(f'eval.mc_paths: {p} holds no question: give a JSONL file of questions.')
  if config.eval.story_mc:
    story_rows(config)


def evaluate_model(model, tokenizer: Tokenizer, config, teacher: LlamaConfig,
                   story_path: str = '') -> dict[str, Any]:
  """NLL on every evaluation text, multiple-choice accuracy (the rows of `story_path` as task
  'story_mc'), the KV report, a greedy sample."""
  llama = model.llama
  out: dict[str, Any] = {}
  texts = {}
  through = cache_dtype(config, model.config)
  for i, path in enumerate(text_paths(config)):
    t0 = time.perf_counter()
    max_docs = config.eval.max_docs
    if i and config.eval.extra_max_docs >= 0:
      max_docs = config.eval.extra_max_docs
    r = evaluation.evaluate_text(model, tokenizer, path, max_docs=max_docs or None,
                                 bos_id=llama.bos_id, max_len=max_len(config, llama),
                                 batch_rows=config.eval.batch_rows,
                                 through_cache=through if i == 0 else '')
    r['seconds'] = round(time.perf_counter() - t0, 2)
    texts[os.path.basename(path)] = r
  if texts:
    first = next(iter(texts.values()))
    out.update(nll=first['nll'], ppl=first['ppl'], eval_tokens=first['tokens'])
  out['texts'] = texts
  tasks = {}
  for path in mc_paths(config):
    tasks[os.path.basename(path)] = evaluation.multiple_choice(
        model, tokenizer, path, bos_id=llama.bos_id, max_len=max_len(config, llama))
  if story_path:
    tasks['story_mc'] = {**evaluation.multiple_choice(
        model, tokenizer, story_path, bos_id=llama.bos_id, max_len=max_len(config, llama)),
                         'choices': config.eval.story_mc_choices}
  if tasks:
    out['tasks'] = tasks
  report = kvcache.kv_report(model.config, dtype_bytes=2, context=llama.max_seq_len,
                             memory_bytes=int(config.eval.memory_gb * 2 ** 30), teacher=teacher)
  out['kv_values_per_token'] = report['kv_values_per_token']
  out['kv_report'] = report
  if config.eval.sample_tokens:
    g = generate.generate(model, [[llama.bos_id]], min(config.eval.sample_tokens,
                                                        llama.max_seq_len - 1),
                          eos_ids=llama.eos_ids, cache_dtype=through or 'auto')
    out['sample_ids'] = [llama.bos_id] + g['tokens'][0]
    out['sample'] = tokenizer.decode(out['sample_ids'])
  return out


def results_markdown(results: dict[str, Any]) -> str:
  rows = ['| model | held-out NLL | ppl | KV values / token | KV fraction | other texts (NLL) | tasks |',
          '|---|---|---|---|---|---|---|']
  for name in ('teacher', 'student'):
    r = results.get(name)
    if not r:
      continue
    others = ', '.join(f"{k}: {v['nll']:.4f}" for k, v in list(r['texts'].items())[1:])
    tasks = ', '.join(f"{k}: acc {v['acc']:.3f} / acc_norm {v['acc_norm']:.3f}"
                      for k, v in r.get('tasks', {}).items())
    rows.append(f"| {name} | {r.get('nll', float('nan')):.4f} | {r.get('ppl', float('nan')):.3f} | "
                f"{r['kv_values_per_token']} | {r['kv_report']['kv_fraction']:.1%} | {others} | {tasks} |")
  return '\n'.join(rows) + '\n'


def run(config, workdir: str) -> dict[str, Any]:
  model_kw = wd.model_kwargs(config)
  directory, llama, params = wd.load_teacher(config, workdir)
  tokenizer = Tokenizer(directory)
  results: dict[str, Any] = {}
  story_path = os.path.join(workdir, 'story_mc.jsonl') if config.eval.story_mc else ''
  # the items scored, kept for other harnesses (lm-evaluation-harness); process 0 writes them
  if story_path and distributed.is_writer():
    fileio.atomic_write_text(story_path, story_mc.to_jsonl(story_rows(config)))
  distributed.barrier('xecomla_story_mc')  # the others read what process 0 wrote
  if config.eval.teacher:
    results['teacher'] = {'path': directory, **evaluate_model(
        transformer.from_params(llama, params, **model_kw), tokenizer, config, llama, story_path)}
  found = wd.latest_student(workdir)
  if found is not None:
    stage, student_cfg, student_params, meta = found
    results['student'] = {
        'stage': stage, 'step': meta.get('summary', {}).get('steps', 0),
        'ranks': {'r_kv': list(student_cfg.r_kv), 'r_q': list(student_cfg.r_q)},
        'd_r': student_cfg.d_r, 'rope_pairs': [None if p is None else list(p)
                                              for p in student_cfg.rope_pairs],
        'latent_norm': student_cfg.latent_norm,
        **evaluate_model(transformer.from_params(student_cfg, student_params, **model_kw),
                         tokenizer, config, llama, story_path)}
  if distributed.is_writer():  # every process computed the same results
    fileio.atomic_write_json(os.path.join(workdir, 'results.json'), results)
    fileio.atomic_write_text(os.path.join(workdir, 'results.md'), results_markdown(results))
  return results
