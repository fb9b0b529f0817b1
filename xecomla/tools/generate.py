"""Generate text from a model: a work directory's latest student, an xecomla export, or a plain
Hugging Face Llama directory (the teacher). The student decodes through its compressed cache.

  python -m xecomla.tools.generate --workdir=runs/demo --prompt="Once upon a time"
  python -m xecomla.tools.generate --model=runs/demo/export/hf --max_new_tokens=100 --temperature=0.8

Prints the text, then tokens/s of prefill and decode (the first call includes compilation; with
--repeat=2 the second call is timed on compiled code).
"""

from absl import app, flags
from etils import epath

from xecomla import fileio, generate, workdir as wd
from xecomla.cli import UsageError, fail_cleanly
from xecomla.convert import hf
from xecomla.models import kvcache, transformer
from xecomla.tokenizer import Tokenizer

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run: its latest student is used.')
_MODEL = flags.DEFINE_string('model', None, 'An xecomla export or a Hugging Face Llama directory.')
_TEACHER = flags.DEFINE_bool('teacher', False, 'With --workdir: the teacher instead of the student.')
_PROMPT = flags.DEFINE_string('prompt', '', 'Prompt text (BOS is prepended).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k sampling (0 = off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_REPEAT = flags.DEFINE_integer('repeat', 1, 'Generate this many times; time the last.')
_CACHE = flags.DEFINE_enum('cache_dtype', 'auto', list(kvcache.CACHE_DTYPES),
                           'Decode cache format (auto = the compute dtype; int8 / float8_e4m3fn '
                           'quantise a student\'s latent with per-token scales).')


def load(workdir, model_dir, teacher):
  """(model config, params, tokenizer directory)."""
  if bool(workdir) == bool(model_dir):
    raise UsageError('give exactly one of --workdir and --model.')
  if model_dir:
    if not epath.Path(model_dir).is_dir():
      raise UsageError(f'--model {model_dir} is not a directory.')
    is_export = 'xecomla' in fileio.read_json(epath.Path(model_dir) / 'config.json')
    if is_export:
      from xecomla.export import import_hf
      return (*import_hf(model_dir), model_dir)
    return (*hf.load_llama(model_dir), model_dir)
  meta = wd.checkpoints(workdir, 'init').read_meta()
  if teacher:
    return (*hf.load_llama(meta['teacher']), meta['teacher'])
  found = wd.latest_student(workdir)
  return found[1], found[2], meta['teacher']


@fail_cleanly
def main(argv):
  del argv
  config, params, tok_dir = load(_WORKDIR.value, _MODEL.value, _TEACHER.value)
  model = transformer.from_params(config, params)
  tokenizer = Tokenizer(tok_dir)
  prompt = [model.llama.bos_id] + tokenizer.encode(_PROMPT.value)
  try:
    kvcache.storage_dtype(model.config, _CACHE.value)
  except ValueError as e:
    raise UsageError(f'--cache_dtype: {e}') from e
  sampling = generate.Sampling(_TEMPERATURE.value, _TOP_P.value, _TOP_K.value)
  for _ in range(_REPEAT.value):
    out = generate.generate(model, [prompt], _MAX_NEW.value, sampling=sampling, seed=_SEED.value,
                            eos_ids=model.llama.eos_ids, cache_dtype=_CACHE.value)
  ids = out['tokens'][0]
  print(tokenizer.decode(prompt + ids))
  print(f"\n[{len(prompt)} prompt tokens: {len(prompt) / out['prefill_s']:.1f} tokens/s prefill; "
        f"{_MAX_NEW.value} decode steps: {_MAX_NEW.value / out['decode_s']:.1f} tokens/s; "
        f"cache {model.config.kv_values_per_token()} values per token, "
        f"{kvcache.cache_bytes(out['cache']) // out['cache'].length} bytes per token ({_CACHE.value})]")

if __name__ == '__main__':
  app.run(main)
