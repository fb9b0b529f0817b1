"""Chat data rendered with the tokenizer's own chat template (ids identical to transformers'
apply_chat_template, loss on assistant tokens and their end-of-turn token, DPO prompts with the
generation prompt), the fallback format's ids unchanged without a template, and every EOS id of
generation_config.json read, honoured by generation and the eval sample, and exported."""

import datetime
import json
import os
import shutil

import jax
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from tests.conftest import small_config
from xecomla import chat, data, generate
from xecomla.cli import UsageError
from xecomla.convert import hf
from xecomla.models import transformer
from xecomla.models.config import LlamaConfig
from xecomla.stages import evaluate
from xecomla.tokenizer import Tokenizer

# Meta-Llama-3-8B-Instruct's chat template, verbatim; Llama-3.2-1B-Instruct's (the paper's
# teacher) is in llama3_2_chat_template.jinja.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
          "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
          "assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_2 = os.path.join(os.path.dirname(__file__), 'llama3_2_chat_template.jinja')
# Llama-3's pre-tokenizer split, then byte-level BPE, with its special tokens.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
           '<|eot_id|>']
CORPUS = ['Hello there! How are you today?\n\n', 'I am fine, thank you.', 'system\n\nuser\n\n',
          'You are a helpful assistant.', 'What is two plus two? It is four.\n\nassistant\n\n',
          'Tell me a story about a cat. Cutting Knowledge Date: December 2023']
SYSTEM = {'role': 'system', 'content': 'You are a helpful assistant.'}
TURNS = [{'role': 'user', 'content': 'Hello there!'},
         {'role': 'assistant', 'content': ' I am fine, thank you. '},
         {'role': 'user', 'content': 'What is two plus two?'},
         {'role': 'assistant', 'content': 'It is four.'}]
CASES = {'multi_turn': (TURNS, False), 'system_prompt': ([SYSTEM] + TURNS, False),
         'generation_prompt': ([SYSTEM] + TURNS[:3], True)}


def make_tokenizer(directory, template=None, jinja_file=None):
  """A tiny Llama-3-style tokenizer directory (trained BPE, 300 ids, Llama-3's special tokens)."""
  os.makedirs(directory, exist_ok=True)
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT), 'isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIAL, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(directory, 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|begin_of_text|>',
            'eos_token': '<|eot_id|>', 'model_max_length': 131072}
  if template:
    config['chat_template'] = template
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  if jinja_file:
    shutil.copy(jinja_file, os.path.join(directory, 'chat_template.jinja'))
  return directory


@pytest.fixture(scope='module')
def llama3_dir(tmp_path_factory):
  return make_tokenizer(str(tmp_path_factory.mktemp('llama3')), LLAMA3)


@pytest.fixture(scope='module')
def llama3_2_dir(tmp_path_factory):
  return make_tokenizer(str(tmp_path_factory.mktemp('llama3_2')), jinja_file=LLAMA3_2)


class FixedDate(datetime.datetime):
  now = classmethod(lambda cls, tz=None: cls(2024, 7, 26, 4, 5, 6))


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('which', ['llama3', 'llama3_2'])
def test_ids_are_those_of_transformers_apply_chat_template(which, case, request, monkeypatch):
  transformers = pytest.importorskip('transformers')
  from transformers.utils import chat_template_utils
  # Llama-3.2's template writes the day of rendering: transformers' on xecomla's fixed day.
  monkeypatch.setattr(chat_template_utils, 'datetime', FixedDate)
  assert chat.RENDER_DATE.date() == FixedDate.now().date()
  directory = request.getfixturevalue(f'{which}_dir')
  ours, theirs = Tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
  messages, prompt = CASES[case]
  text = ours.chat_template.render(messages, add_generation_prompt=prompt)
  assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
  ids = theirs.apply_chat_template(messages, tokenize=True,
                                   add_generation_prompt=prompt)['input_ids']
  if prompt:
    assert ours.encode(text) == ids
  else:
    assert chat.encode_conversation(ours, ours.chat_template, messages)[0] == ids
  assert ids.count(theirs.convert_tokens_to_ids('<|begin_of_text|>')) == 1  # the template's BOS
  assert ('26 Jul 2024' in text) == (which == 'llama3_2')  # RENDER_DATE, whatever today is


def runs(flags):
  """[start, end) of every run of consecutive 1s."""
  padded = [0] + list(flags) + [0]
  edges = [i for i in range(len(flags) + 1) if padded[i] != padded[i + 1]]
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize('which', ['llama3', 'llama3_2'])
def test_loss_mask_covers_exactly_the_assistant_tokens_and_end_of_turn(which, request, tmp_path):
  tok = Tokenizer(request.getfixturevalue(f'{which}_dir'))
  path = tmp_path / 'chat.jsonl'
  messages = [SYSTEM] + TURNS
  path.write_text(json.dumps({'messages': messages}) + '\n')
  (ex,) = data.chat_examples(tok, str(path), bos_id=tok.encode('<|begin_of_text|>')[0], seq_len=512)
  ids = ex['tokens'].tolist()
  assert ids == chat.encode_conversation(tok, tok.chat_template, messages)[0]
  header = tok.encode('<|start_header_id|>assistant<|end_header_id|>\n\n')
  targets = [0] + ex['loss_mask'].tolist()[:-1]  # loss_mask[t] = 1: token t + 1 is a target
  spans = runs(targets)
  replies = [m['content'] for m in messages if m['role'] == 'assistant']
  assert len(spans) == len(replies)
  for (s, e), reply in zip(spans, replies):
    assert ids[s - len(header):s] == header  # the header is not a target, what follows is
    assert ids[s:e] == tok.encode(reply.strip() + '<|eot_id|>')
    assert ids[e - 1] == tok.encode('<|eot_id|>')[0]


def test_dpo_prompt_has_the_generation_prompt_and_responses_end_their_turn(llama3_dir, tmp_path):
  transformers = pytest.importorskip('transformers')
  theirs = transformers.AutoTokenizer.from_pretrained(llama3_dir)
  tok = Tokenizer(llama3_dir)
  bos, eot = tok.encode('<|begin_of_text|>')[0], tok.encode('<|eot_id|>')[0]
  path = tmp_path / 'prefs.jsonl'
  row = {'prompt': [SYSTEM, TURNS[0]], 'chosen': 'I am fine, thank you.', 'rejected': 'Tell me!'}
  path.write_text(json.dumps(row) + '\n')
  (ex,) = data.preference_examples(tok, str(path), bos_id=bos, max_len=96, max_prompt_len=64)
  prompt = theirs.apply_chat_template(row['prompt'], add_generation_prompt=True)['input_ids']
  for name in ('chosen', 'rejected'):
    whole = theirs.apply_chat_template(
        row['prompt'] + [{'role': 'assistant', 'content': row[name]}])['input_ids']
    n = int(ex[f'{name}_segment_ids'].sum())
    tokens = ex[f'{name}_tokens'].tolist()
    assert tokens[:n] == whole and tokens[:len(prompt)] == prompt and tokens[n - 1] == eot
    targets = [i + 1 for i, m in enumerate(ex[f'{name}_loss_mask']) if m]
    assert targets == list(range(len(prompt), n))  # the response and its <|eot_id|>
  # A cut prompt keeps the template's BOS first (and only once) and its generation prompt.
  (cut,) = data.preference_examples(tok, str(path), bos_id=bos, max_len=40, max_prompt_len=12)
  tokens = cut['chosen_tokens'][:int(cut['chosen_segment_ids'].sum())].tolist()
  assert tokens[0] == bos and tokens[1:12] == prompt[len(prompt) - 11:] and bos not in tokens[1:]


def test_without_a_template_the_fallback_ids_are_unchanged(tmp_path):
  tok = Tokenizer(make_tokenizer(str(tmp_path / 'plain')))
  assert tok.chat_template is None
  path = tmp_path / 'chat.jsonl'
  path.write_text(json.dumps({'messages': TURNS[:2]}) + '\n')
  (ex,) = data.chat_examples(tok, str(path), bos_id=0, seq_len=128)
  reply = tok.encode(' I am fine, thank you. ')
  assert ex['tokens'].tolist() == ([0] + tok.encode('User: ') + tok.encode('Hello there!')
                                   + tok.encode('\n\nAssistant: ') + reply)
  n = len(ex['tokens'])
  assert ex['loss_mask'].tolist() == [0] * (n - len(reply) - 1) + [1] * len(reply) + [0]


def test_template_sources_sandbox_and_refusals(tmp_path, llama3_dir):
  named = [{'name': 'tool_use', 'template': 'tools'}, {'name': 'default', 'template': LLAMA3}]
  d = make_tokenizer(str(tmp_path / 'named'), named)
  assert chat.load_template(d).source == LLAMA3
  d = make_tokenizer(str(tmp_path / 'both'), 'ignored', jinja_file=LLAMA3_2)
  assert 'Cutting Knowledge Date' in chat.load_template(d).source  # the .jinja file wins
  with pytest.raises(ValueError, match='refuses'):  # no access to Python internals
    chat.ChatTemplate("{{ messages.__class__.__mro__ }}", {}).render([])
  odd = chat.ChatTemplate("{{ raise_exception('roles must alternate') }}", {})
  with pytest.raises(ValueError, match='roles must alternate'):
    odd.render(TURNS)
  tok = Tokenizer(llama3_dir)
  tok.chat_template = odd
  path = tmp_path / 'chat.jsonl'
  path.write_text(json.dumps({'messages': TURNS}) + '\n')
  with pytest.raises(UsageError, match=r'chat.jsonl:1: .*roles must alternate.*fix or remove'):
    data.chat_examples(tok, str(path), bos_id=0, seq_len=64)


def tiny_llama_dir(directory, eos_ids):
  """A random tiny Llama (the test tokenizer's 300 ids) whose generation_config.json lists eos_ids
  and whose config.json names only the first, as Llama-3.x Instruct's do."""
  llama = LlamaConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=48, max_seq_len=64, bos_id=1, eos_id=eos_ids[0])
  rng = np.random.default_rng(0)  # numpy, not init_params: no compilation for a random model
  params = jax.tree.map(lambda x: np.ones(x.shape, np.float32) if len(x.shape) == 1 else
                        rng.normal(0, 0.3, x.shape).astype(np.float32),
                        transformer.abstract_params(llama))
  hf.save_llama(directory, llama, params)
  with open(os.path.join(directory, 'generation_config.json'), 'w') as f:
    json.dump({'bos_token_id': 1, 'eos_token_id': list(eos_ids), 'temperature': 0.6}, f)
  return llama, params


def test_every_eos_id_is_read_and_stops_generation_and_the_eval_sample(llama3_dir, tmp_path):
  d = str(tmp_path / 'llama')
  llama, params = tiny_llama_dir(d, (0,))
  row = generate.generate(transformer.from_params(llama, params), [[1]], 16)['tokens'][0]
  k = next(i for i in range(2, 16) if row[i] not in row[:i])  # first new token after two
  never = next(i for i in range(300) if i not in row)
  shutil.rmtree(d)
  tiny_llama_dir(d, (never, row[k]))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(llama3_dir, name), d)
  llama, params = hf.load_llama(d)
  assert llama.eos_id == never and llama.eos_ids == (never, row[k])
  model = transformer.from_params(llama, params)
  assert generate.generate(model, [[1]], 16, eos_ids=llama.eos_ids)['tokens'][0] == row[:k + 1]
  c = small_config()
  c.eval.path = c.eval.extra_paths = c.eval.mc_paths = ''
  c.eval.sample_tokens = 16
  out = evaluate.evaluate_model(model, Tokenizer(d), c, llama)
  assert out['sample_ids'] == [1] + row[:k + 1]


def test_the_export_lists_every_eos_id_and_carries_the_template(llama3_dir, tmp_path):
  from xecomla.convert.upcycle import InitOptions, upcycle
  from xecomla.export import export_hf, import_hf
  d = str(tmp_path / 'llama')
  llama, params = tiny_llama_dir(d, (5, 7, 9))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(llama3_dir, name), d)
  llama, params = hf.load_llama(d)
  cfg, student, _ = upcycle(llama, params, InitOptions(r_kv=6, d_r=4, round_to=1))
  out = export_hf(str(tmp_path / 'export'), cfg, student, tokenizer_dir=d)
  with open(os.path.join(out, 'generation_config.json')) as f:
    gen = json.load(f)
  assert gen == {'bos_token_id': 1, 'eos_token_id': [5, 7, 9], 'temperature': 0.6}
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['eos_token_id'] == [5, 7, 9]
  assert import_hf(out)[0].llama.eos_ids == (5, 7, 9)
  assert Tokenizer(out).chat_template.source == LLAMA3
  transformers = pytest.importorskip('transformers')
  assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [5, 7, 9]
