"""A tokenizer directory's own chat template, rendered with jinja2 the way transformers renders it
(`transformers.utils.chat_template_utils`), without transformers or torch.

The template comes from `chat_template.jinja` (which takes priority, as in transformers) or from
`tokenizer_config.json`'s `chat_template` (a string, or named templates, of which the 'default'
one is used). It sees `messages`, `tools` and `documents` (None), `add_generation_prompt` and the
special tokens of the tokenizer config (`bos_token`, `eos_token`, ...), in a sandboxed, immutable
environment with trim_blocks and lstrip_blocks, the loopcontrols extension, the `{% generation %}`
tag, `raise_exception`, `strftime_now` (on the fixed day RENDER_DATE) and a `tojson` that does not escape HTML.

Assistant turns are found by rendering prefixes of the conversation: turn i spans from the end of
`messages[:i]` rendered with the generation prompt (its header) to the end of `messages[:i + 1]`
(its content and the template's end-of-turn token, e.g. Llama-3's <|eot_id|>).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from etils import epath
from jinja2.sandbox import ImmutableSandboxedEnvironment

from xecomla import fileio
from xecomla.convert.hf_config import read_json_object
from xecomla.convert.safetensors_io import CheckpointError

SPECIAL_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token',
                  'mask_token')


class _Generation(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (marks assistant text for transformers' assistant
  masks): rendered as its body; the spans come from prefix rendering instead."""
  tags = {'generation'}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


# transformers stamps the day of rendering (`strftime_now`) into templates that ask for it, such
# as Llama-3.2's system header; training data must not change with the day it is built (a run
# resumed tomorrow would read other tokens), so xecomla renders them on one fixed day: the
# date that Llama-3.2's own template falls back to.
RENDER_DATE = datetime(2024, 7, 26)


def _strftime_now(fmt):
  return RENDER_DATE.strftime(fmt)


class _Dict:
  """`dict(...)` and `dict.fromkeys(...)` without exposing the type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """`namespace(...)` refusing underscore-prefixed attributes (no way to CPython internals)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith('_'):
      raise jinja2.exceptions.SecurityError(f'chat templates cannot set {name!r} on a namespace')


def environment() -> ImmutableSandboxedEnvironment:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                     namespace=_Namespace)
  return env


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) else None


def _pick(source: Any, where: str) -> str:
  """The template to use from a string, a {name: template} dict or a [{name, template}] list."""
  if isinstance(source, list):
    source = {t.get('name'): t.get('template') for t in source if isinstance(t, dict)}
  if isinstance(source, dict):
    if 'default' not in source:
      raise CheckpointError(f'{where} holds chat templates {sorted(map(str, source))} but no '
                            "'default' one: name one of them 'default'.")
    source = source['default']
  if not isinstance(source, str):
    raise CheckpointError(f'{where}: chat_template is not a string: re-save the tokenizer.')
  return source


class ChatTemplate:
  """A compiled chat template and the special tokens it is rendered with."""

  def __init__(self, source: str, special_tokens: dict[str, str], where: str = 'a string'):
    self.source, self.special_tokens, self.where = source, dict(special_tokens), where
    try:
      self._template = environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise CheckpointError(f'{where}: the chat template does not parse ({e.message}, line '
                            f'{e.lineno}): fix the template.') from e

  def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as text; ValueError where the template refuses it (raise_exception, an
    undefined field)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
      return self._template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
    except jinja2.TemplateError as e:
      raise ValueError(f'the chat template of {self.where} refuses this conversation ({e})') from e


def load_template(directory: str) -> ChatTemplate | None:
  """The chat template of a tokenizer directory, or None when it has none."""
  config_path = epath.Path(directory) / 'tokenizer_config.json'
  config = read_json_object(config_path, 'tokenizer') if config_path.exists() else {}
  jinja_path = epath.Path(directory) / 'chat_template.jinja'
  if jinja_path.exists():
    source, where = fileio.read_text(jinja_path), jinja_path
  elif config.get('chat_template'):
    source, where = _pick(config['chat_template'], str(config_path)), config_path
  else:
    return None
  special = dict(config)
  map_path = epath.Path(directory) / 'special_tokens_map.json'
  if map_path.exists() and 'added_tokens_decoder' not in config:
    # transformers' legacy path: the map takes precedence
    special.update(read_json_object(map_path, 'tokenizer'))
  tokens = {k: _token_text(special.get(k)) for k in SPECIAL_TOKENS}
  return ChatTemplate(source, {k: v for k, v in tokens.items() if v is not None}, str(where))


def assistant_spans(template: ChatTemplate, messages: list[dict[str, Any]]
                    ) -> tuple[str, list[tuple[int, int]]]:
  """The whole conversation rendered, and the [start, end) characters of every assistant turn:
  its content and end-of-turn token, without its header. Raises ValueError for a template that
  does not render a conversation as the concatenation of its turns."""
  full = template.render(messages)
  spans = []
  for i, m in enumerate(messages):
    if m.get('role') != 'assistant':
      continue
    head = template.render(messages[:i], add_generation_prompt=True)
    upto = template.render(messages[:i + 1])
    if not (upto.startswith(head) and full.startswith(upto)):
      raise ValueError(f'{template.where}: the chat template does not render message {i} as a '
                       'continuation of the ones before it, so its tokens cannot be told apart')
    spans.append((len(head), len(upto)))
  return full, spans


def target_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
  """1 for each token whose characters [a, b) overlap an assistant span (as transformers'
  assistant masks count them), else 0."""
  return [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]


def encode_conversation(tokenizer, template: ChatTemplate,
                        messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
  """Token ids of the rendered conversation (exactly transformers' apply_chat_template(...,
  tokenize=True): the whole text encoded without added special tokens; a BOS comes from the
  template itself) and per-token target flags (assistant turns, end-of-turn token included)."""
  full, spans = assistant_spans(template, messages)
  ids, offsets = tokenizer.encode_with_offsets(full)
  return ids, target_flags(offsets, spans)


def encode_prompt_response(tokenizer, template: ChatTemplate, messages: list[dict[str, Any]],
                           response: str) -> tuple[list[int], list[int]]:
  """(prompt ids: the messages with the generation prompt, as a model is prompted; response ids:
  the assistant turn's content and the template's end-of-turn token, as the model would generate
  them)."""
  prompt = template.render(messages, add_generation_prompt=True)
  full = template.render(list(messages) + [{'role': 'assistant', 'content': response}])
  if not full.startswith(prompt):
    raise ValueError(f'{template.where}: the chat template does not render the response as a '
                     'continuation of the prompt with its generation prompt')
  return tokenizer.encode(prompt), tokenizer.encode(full[len(prompt):])
