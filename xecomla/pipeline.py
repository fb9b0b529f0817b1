"""The stages of a run and the work directory they share.

W/teacher_hf/     the teacher converted from llama2.c (when teacher.path is a .bin)
W/results.json    what `eval` measured (teacher, and the student when one exists)
W/results.md      the same as a Markdown table
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax.numpy as jnp
from absl import logging

from xecomla import eval as evaluation
from xecomla import fileio, generate
from xecomla.cli import UsageError
from xecomla.convert import hf, llama2c
from xecomla.models import kvcache, transformer
from xecomla.models.config import LlamaConfig
from xecomla.tokenizer import Tokenizer

STAGES = ('init', 'distill', 'dpo', 'eval', 'export')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config) -> Any:
  if config.dtype not in DTYPES:
    raise UsageError(f'dtype {config.dtype!r} is not supported: use float32 or bfloat16.')
  return DTYPES[config.dtype]


def parse_stages(stages: str) -> list[str]:
  names = [s.strip() for s in stages.split(',') if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    raise UsageError(f'config.stages={stages!r}: unknown stage {unknown[0] if unknown else "(none)"!r}; '
                     f'choose a comma-separated list from {",".join(STAGES)}.')
  return names


# ----------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------

def teacher_dir(path: str, tokenizer: str, workdir: str, name: str = 'teacher_hf') -> str:
  """A Hugging Face Llama directory for `path`: itself, or its conversion (llama2.c .bin)."""
  if not path:
    raise UsageError('teacher.path is empty: set --config.teacher.path to a Hugging Face Llama '
                     'directory or a llama2.c .bin.')
  if os.path.isdir(path):
    return path
  if not os.path.exists(path):
    raise UsageError(f'teacher.path {path} does not exist: point it to a Hugging Face Llama '
                     'directory or a llama2.c .bin (is ../shared/data beside the project?).')
  if not path.endswith('.bin'):
    raise UsageError(f'teacher.path {path} is a file but not a llama2.c .bin: give a directory.')
  if not tokenizer:
    raise UsageError(f'teacher.path {path} is a llama2.c checkpoint: set teacher.tokenizer to '
                     'its tok*.bin.')
  out = os.path.join(workdir, name)
  if not os.path.exists(os.path.join(out, 'config.json')):
    logging.info('converting llama2.c %s -> %s', path, out)
    if os.path.exists(out) and not os.listdir(out):
      os.rmdir(out)
    llama2c.convert(path, tokenizer, out)
  return out


def load_teacher(config, workdir: str) -> tuple[str, LlamaConfig, dict]:
  directory = teacher_dir(config.teacher.path, config.teacher.tokenizer, workdir)
  llama, params = hf.load_llama(directory)
  return directory, llama, params


# ----------------------------------------------------------------------------------------------
# Evaluation of one model
# ----------------------------------------------------------------------------------------------

def text_paths(config) -> list[str]:
  paths = [config.eval.path] + [p for p in config.eval.extra_paths.split(',') if p]
  for p in paths:
    if p and not os.path.exists(p):
      raise UsageError(f'evaluation text {p} does not exist: fix eval.path / eval.extra_paths.')
  return [p for p in paths if p]


def evaluate_model(model, tokenizer: Tokenizer, config, llama: LlamaConfig) -> dict[str, Any]:
  """NLL on every evaluation text, cached values per token, and a greedy sample from BOS."""
  out: dict[str, Any] = {'kv_values_per_token': sum(kvcache.values_per_token(model.config)),
                         'kv_values_per_token_per_layer': kvcache.values_per_token(model.config)}
  texts = {}
  for path in text_paths(config):
    t0 = time.perf_counter()
    r = evaluation.evaluate_text(model, tokenizer, path, max_docs=config.eval.max_docs or None,
                                 bos_id=llama.bos_id, max_len=llama.max_seq_len,
                                 batch_rows=config.eval.batch_rows)
    r['seconds'] = round(time.perf_counter() - t0, 2)
    texts[os.path.basename(path)] = r
  if texts:
    first = texts[os.path.basename(config.eval.path)] if config.eval.path else next(iter(texts.values()))
    out.update(nll=first['nll'], ppl=first['ppl'], eval_tokens=first['tokens'])
  out['texts'] = texts
  if config.eval.sample_tokens:
    g = generate.generate(model, [[llama.bos_id]], config.eval.sample_tokens)
    out['sample_ids'] = [llama.bos_id] + g['tokens'][0]
    out['sample'] = tokenizer.decode(out['sample_ids'])
  return out


def results_markdown(results: dict[str, Any]) -> str:
  rows = ['| model | held-out NLL | ppl | KV values / token | KV fraction | other texts (NLL) |',
          '|---|---|---|---|---|---|']
  teacher_kv = results.get('teacher', {}).get('kv_values_per_token')
  for name in ('teacher', 'student'):
    r = results.get(name)
    if not r:
      continue
    others = ', '.join(f"{k}: {v['nll']:.4f}" for k, v in list(r['texts'].items())[1:])
    frac = f"{r['kv_values_per_token'] / teacher_kv:.1%}" if teacher_kv else ''
    rows.append(f"| {name} | {r.get('nll', float('nan')):.4f} | {r.get('ppl', float('nan')):.3f} | "
                f"{r['kv_values_per_token']} | {frac} | {others} |")
  return '\n'.join(rows) + '\n'


def stage_eval(config, workdir: str) -> dict[str, Any]:
  dtype = compute_dtype(config)
  directory, llama, params = load_teacher(config, workdir)
  tokenizer = Tokenizer(directory)
  results: dict[str, Any] = {'teacher': {'path': directory, **evaluate_model(
      transformer.from_params(llama, params, dtype=dtype), tokenizer, config, llama)}}
  fileio.atomic_write_json(os.path.join(workdir, 'results.json'), results)
  fileio.atomic_write_text(os.path.join(workdir, 'results.md'), results_markdown(results))
  return results


STAGE_FNS: dict[str, Callable[[Any, str], Any]] = {'eval': stage_eval}


def run(config, workdir: str) -> dict[str, Any]:
  """Runs config.stages in order; returns what each stage returned."""
  stages = parse_stages(config.stages)
  compute_dtype(config)
  missing = [s for s in stages if s not in STAGE_FNS]
  if missing:
    raise UsageError(f'stage {missing[0]!r} is not available in this version.')
  os.makedirs(workdir, exist_ok=True)
  fileio.atomic_write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  out = {}
  for stage in stages:
    t0 = time.perf_counter()
    logging.info('stage %s', stage)
    out[stage] = STAGE_FNS[stage](config, workdir)
    logging.info('stage %s done in %.1f s', stage, time.perf_counter() - t0)
  return out
