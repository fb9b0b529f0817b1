"""grain pipelines: chat loss masks, preference schemas, deterministic resumable iteration."""

import json

import numpy as np
import pytest

from xecomla import data
from xecomla.cli import UsageError


class CharTokenizer:
  """One id per character (ord + 10), enough to check masks and truncation exactly."""

  def encode(self, text):
    return [ord(c) + 10 for c in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]


TOK = CharTokenizer()


def test_chat_loss_mask_covers_assistant_tokens_only(tmp_path):
  path = tmp_path / 'chat.jsonl'
  path.write_text(json.dumps({'messages': [{'role': 'user', 'content': 'hi'},
                                           {'role': 'assistant', 'content': 'yo'}]}) + '\n')
  (ex,) = data.chat_examples(TOK, str(path), bos_id=1, seq_len=64)
  text = 'User: hi\n\nAssistant: yo'
  assert ex['tokens'].tolist() == [1] + TOK.encode(text)
  # loss_mask[t] = 1 when tokens[t + 1] is an assistant token ('y' and 'o').
  targets = [i + 1 for i, m in enumerate(ex['loss_mask']) if m]
  assert [chr(ex['tokens'][t] - 10) for t in targets] == ['y', 'o']


def test_both_preference_schemas(tmp_path):
  rows = [
      {'input': {'messages': [{'role': 'system', 'content': 'be kind'},
                              {'role': 'user', 'content': 'q?'}]},
       'preferred_output': [{'role': 'assistant', 'content': 'good'}],
       'non_preferred_output': [{'role': 'assistant', 'content': 'bad!'}]},
      {'prompt': 'q?', 'chosen': 'good', 'rejected': 'bad!'},
  ]
  path = tmp_path / 'prefs.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  a, b = data.preference_examples(TOK, str(path), bos_id=1, max_len=64, max_prompt_len=40)
  for ex, prompt in ((a, 'System: be kind\n\nUser: q?\n\nAssistant: '), (b, 'User: q?\n\nAssistant: ')):
    for name, response in (('chosen', 'good'), ('rejected', 'bad!')):
      n = 1 + len(prompt) + len(response)
      assert ex[f'{name}_tokens'][:n].tolist() == [1] + TOK.encode(prompt + response)
      assert ex[f'{name}_segment_ids'].sum() == n and ex[f'{name}_tokens'].shape == (64,)
      targets = [i + 1 for i, m in enumerate(ex[f'{name}_loss_mask']) if m]
      assert ''.join(chr(ex[f'{name}_tokens'][t] - 10) for t in targets) == response


def test_long_prompts_keep_their_end_and_responses_are_cut(tmp_path):
  path = tmp_path / 'p.jsonl'
  path.write_text(json.dumps({'prompt': 'x' * 100, 'chosen': 'c' * 50, 'rejected': 'r'}) + '\n')
  (ex,) = data.preference_examples(TOK, str(path), bos_id=1, max_len=48, max_prompt_len=32)
  tokens = ex['chosen_tokens'].tolist()
  assert tokens[0] == 1 and tokens[31] == TOK.encode(' ')[0]  # prompt ends '...Assistant: '
  assert ex['chosen_segment_ids'].sum() == 48 and ex['chosen_loss_mask'].sum() == 16


def test_bad_rows_are_named(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"prompt": "a"}\n')
  with pytest.raises(UsageError, match='bad.jsonl:1: a preference row needs'):
    data.preference_examples(TOK, str(path), bos_id=1, max_len=16, max_prompt_len=8)
  path.write_text('not json\n')
  with pytest.raises(UsageError, match='bad.jsonl:1 is not valid JSON'):
    data.read_jsonl(str(path))
  path.write_text(json.dumps({'messages': [{'role': 'robot', 'content': 'x'}]}) + '\n')
  with pytest.raises(UsageError, match="role 'robot'"):
    data.chat_examples(TOK, str(path), bos_id=1, seq_len=16)


def test_packed_iteration_is_deterministic_and_resumable():
  rng = np.random.default_rng(0)
  examples = [{'tokens': rng.integers(1, 50, n).astype(np.int32)} for n in rng.integers(2, 30, 40)]
  ds = data.packed_dataset(examples, seq_len=32, batch_size=4, seed=3)
  it = iter(ds)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  json.dumps(state)  # checkpointed as JSON
  rest = [next(it) for _ in range(3)]
  again = iter(data.packed_dataset(examples, seq_len=32, batch_size=4, seed=3))
  for a, b in zip(first, [next(again) for _ in range(3)]):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  resumed = iter(data.packed_dataset(examples, seq_len=32, batch_size=4, seed=3))
  resumed.set_state(state)
  for a, b in zip(rest, [next(resumed) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = next(iter(data.packed_dataset(examples, seq_len=32, batch_size=4, seed=4)))
  assert not np.array_equal(other['tokens'], first[0]['tokens'])


def test_documents_longer_than_a_row_are_chunked():
  assert data.chunk(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert data.chunk(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token piece predicts nothing
