"""Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama directory.

  python -m xecomla.tools.llama2c --checkpoint=stories260K.bin --tokenizer=tok512.bin --out=DIR

DIR then loads with transformers' AutoModelForCausalLM / AutoTokenizer and with xecomla.
"""

from absl import app, flags

from xecomla.cli import fail_cleanly
from xecomla.convert import llama2c

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'llama2.c .bin (legacy version-0 export).',
                                  required=True)
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'llama2.c tokenizer .bin (e.g. tok512.bin).',
                                 required=True)
_OUT = flags.DEFINE_string('out', None, 'Output directory (must not exist, or be empty).',
                           required=True)


@fail_cleanly
def main(argv):
  del argv
  config = llama2c.convert(_CHECKPOINT.value, _TOKENIZER.value, _OUT.value)
  print(f'wrote {_OUT.value}: Llama {config.n_layers} layers, dim {config.dim}, '
        f'{config.n_heads} heads / {config.n_kv_heads} KV heads, vocab {config.vocab_size}')


if __name__ == '__main__':
  app.run(main)
