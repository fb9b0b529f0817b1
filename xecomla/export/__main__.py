"""Export the latest student checkpoint of a work directory to Hugging Face format.

  python -m xecomla.export --workdir=W --out=DIR [--deepseek]

Loads with transformers: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); with
--deepseek (a DeepSeek-compatible student only) as a native deepseek_v3 model, no remote code.
"""

from absl import app, flags
from etils import epath

from xecomla.cli import UsageError, fail_cleanly
from xecomla.stages.export import export_latest

_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory of a run.', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist, or be empty).',
                           required=True)
_DEEPSEEK = flags.DEFINE_bool('deepseek', False, 'Write a native deepseek_v3 directory.')
_TOKENIZER = flags.DEFINE_string('tokenizer_dir', None,
                                 'Where the tokenizer files are (default W/teacher_hf).')


@fail_cleanly
def main(argv):
  del argv
  if not epath.Path(_WORKDIR.value).is_dir():
    raise UsageError(f'--workdir {_WORKDIR.value} does not exist.')
  r = export_latest(_WORKDIR.value, _OUT.value, deepseek=_DEEPSEEK.value,
                    tokenizer_dir=_TOKENIZER.value)
  print(f"exported the {r['stage']} student to {r['path']}")


if __name__ == '__main__':
  app.run(main)
