"""Teacher and exported student, computed by xecomla and by transformers side by side: held-out
NLL (README definition, documents one at a time in PyTorch) and the KV-cache report.

  python -m experiments.stories260k.export_check --workdir=runs/demo [--max_docs=200]

Needs a work directory whose `export` stage has run (W/export/hf) and transformers + torch.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from xecomla import eval as evaluation, workdir as wd
from xecomla.convert import hf
from xecomla.export import import_hf
from xecomla.models import kvcache, transformer
from xecomla.tokenizer import Tokenizer

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'A run with an export.')
_TEXT = flags.DEFINE_string('text', '../shared/data/text/tinystories_valid_1000.txt', 'Held-out text.')
_MAX_DOCS = flags.DEFINE_integer('max_docs', 200, 'Documents (0 = all).')
_OUT = flags.DEFINE_string('out', '', 'Write the table (Markdown) and JSON next to this path.')


def torch_nll(directory: str, docs: list[str], bos_id: int, max_len: int, remote: bool) -> float:
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote,
                                                            dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=remote)
  total, count = 0.0, 0
  with torch.no_grad():
    for d in docs:
      ids = ([bos_id] + tok(d, add_special_tokens=False)['input_ids'])[:max_len + 1]
      logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
      total -= logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
      count += len(ids) - 1
  return total / count


def main(argv):
  del argv
  w = _WORKDIR.value
  export_dir = os.path.join(w, 'export', 'hf')
  teacher_dir = wd.checkpoints(w, 'init').read_meta()['teacher']
  t_cfg, t_params = hf.load_llama(teacher_dir)
  s_cfg, s_params = import_hf(export_dir)
  tokenizer = Tokenizer(teacher_dir)
  docs = evaluation.read_documents(_TEXT.value, _MAX_DOCS.value or None)
  seqs = evaluation.encode_documents(tokenizer, docs, t_cfg.bos_id, t_cfg.max_seq_len)
  rows = {}
  for name, cfg, params, directory, remote in (('teacher', t_cfg, t_params, teacher_dir, False),
                                               ('student (export)', s_cfg, s_params, export_dir, True)):
    ours = evaluation.evaluate_nll(transformer.from_params(cfg, params), seqs,
                                   row_length=t_cfg.max_seq_len + 1)['nll']
    theirs = torch_nll(directory, docs, t_cfg.bos_id, t_cfg.max_seq_len, remote)
    report = kvcache.kv_report(cfg, dtype_bytes=2, context=t_cfg.max_seq_len,
                               memory_bytes=2 ** 30, teacher=t_cfg)
    rows[name] = {'nll_xecomla': ours, 'nll_transformers': theirs, **report}
  lines = ['| model | NLL (xecomla) | NLL (transformers) | KV values / token | bf16 bytes / token | '
           'KV fraction | max context in 1 GiB |', '|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    lines.append(f"| {name} | {r['nll_xecomla']:.5f} | {r['nll_transformers']:.5f} | "
                 f"{r['kv_values_per_token']} | {r['bytes_per_token']} | {r['kv_fraction']:.1%} | "
                 f"{r['max_context']:,} |")
  text = '\n'.join(lines) + '\n'
  print(f'{len(docs)} documents of {_TEXT.value}\n' + text)
  if _OUT.value:
    with open(_OUT.value + '.md', 'w') as f:
      f.write(text)
    with open(_OUT.value + '.json', 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
