"""Chat templates: kdjax's rendering, token ids and loss masks against
transformers' ``apply_chat_template`` on tiny tokenizers trained here, with
templates written like Qwen2.5's, Qwen3's, Llama 3's and Gemma's."""

import json

from flax import nnx
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import extras
from kdjax import models as models_lib
from kdjax.data import chat, instruct_jsonl, pipeline, seqkd
from kdjax.data import tokenizer as tokenizer_lib

transformers = extras.require("transformers")

QWEN25 = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are \
a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not \
loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + \
'<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3 = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, \
last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not \
loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + \
'<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0]\
.rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or \
reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + \
reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\\n'}}{% endif %}"
)

TEXT = [
    "Below is a task. Name a fruit that is red.",
    "An apple is a red fruit; a cherry is red too.",
    "Add the numbers and give the sum: 2 3 4",
    "The sum is 9. Sort the words: pear fig kiwi",
    "You are a helpful assistant. Answer briefly.",
    "system user assistant model think\n\n",
]

# name: (template, where it is saved, trained special tokens, added
# non-special tokens, tokenizer_config entries).
FAMILIES = {
    "qwen2.5": (
        QWEN25,
        "config",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        [],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    "qwen3": (
        QWEN3,
        "jinja",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        ["<think>", "</think>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
    # <|eot_id|> is declared by the config only: loading adds it.
    "llama3": (
        LLAMA3,
        "config",
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
        ],
        [],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "gemma": (
        GEMMA,
        "jinja",
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        [],
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        },
    ),
}

EXAMPLES = [
    {
        "instruction": "Name a fruit that is red.",
        "input": "",
        "response": "An apple.",
    },
    {
        "instruction": "Add the numbers.",
        "input": "2 3 4",
        "response": "The sum is 9.",
    },
]


def _save(directory, name, without=()):
  """A tiny byte-level BPE tokenizer with the family's template (and its
  special tokens but ``without``), saved as an HF tokenizer directory."""
  source, where, special, added, config = FAMILIES[name]
  special = [t for t in special if t not in without]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=320,
      special_tokens=special,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(TEXT, trainer=trainer)
  tok.add_tokens(added)
  directory.mkdir()
  tok.save(str(directory / "tokenizer.json"))
  config = dict(config, tokenizer_class="PreTrainedTokenizerFast")
  if where == "jinja":  # newer checkpoints: a file beside the config
    (directory / "chat_template.jinja").write_text(source)
  else:
    config["chat_template"] = source
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return str(directory)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  """``(name, kdjax tokenizer, eos_id, transformers tokenizer)``."""
  path = _save(tmp_path_factory.mktemp("tok") / request.param, request.param)
  tok, eos_id = tokenizer_lib.load(path)
  return (
      request.param,
      tok,
      eos_id,
      transformers.AutoTokenizer.from_pretrained(path),
  )


def _conversations(name):
  user = [{"role": "user", "content": "Name a fruit that is red."}]
  answer = {"role": "assistant", "content": "An apple."}
  out = [user, user + [answer]]
  if name != "gemma":  # Gemma's template refuses a system turn
    system = {"role": "system", "content": "Answer briefly."}
    out += [[system] + user, [system] + user + [answer]]
  return out


def _hf_ids(hf, messages, **kw):
  return list(
      hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
  )


def test_rendering_and_ids_are_transformers(family):
  name, tok, _, hf = family
  assert tok.chat_template == hf.chat_template
  for messages in _conversations(name):
    for prompt in (False, True):
      text = tok.apply_chat_template(messages, add_generation_prompt=prompt)
      assert text == hf.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=prompt
      )
      ids = tok.encode(text, add_special_tokens=False).ids
      assert ids == _hf_ids(hf, messages, add_generation_prompt=prompt)


def test_special_tokens_are_transformers(family):
  _, tok, eos_id, hf = family
  assert tok.special_tokens == hf.special_tokens_map
  for text in tok.special_tokens.values():
    assert tok.token_to_id(text) == hf.convert_tokens_to_ids(text)
  # load's EOS: the first known end-of-text token, else the config's.
  assert tok.id_to_token(eos_id) in (
      "<|endoftext|>",
      "<|end_of_text|>",
      "<eos>",
  )


def test_rows_and_loss_mask_cover_exactly_the_response(family):
  name, tok, eos_id, hf = family
  rows, stats = pipeline.tokenize_split(
      EXAMPLES,
      tok,
      eos_id=eos_id,
      max_length=200,
      max_prompt_length=150,
      template_style="chat",
  )
  assert stats.kept == len(EXAMPLES)
  for example, row in zip(EXAMPLES, rows):
    user = f"{example['instruction']}\n\n{example['input']}".strip()
    messages = [{"role": "user", "content": user}]
    want_prompt = _hf_ids(hf, messages, add_generation_prompt=True)
    answered = messages + [
        {"role": "assistant", "content": example["response"]}
    ]
    want_full = _hf_ids(hf, answered)
    assert want_full[: len(want_prompt)] == want_prompt
    assert row.ids.tolist() == want_full + [eos_id]
    assert row.prompt_len == len(want_prompt)
    bos = tok.bos_token and tok.token_to_id(tok.bos_token)
    assert row.ids.tolist().count(bos) == (1 if bos is not None else 0)

    train = pipeline.train_row(row, max_length=200, eos_id=eos_id)
    masked = train["labels"][train["loss_mask"] == 1].tolist()
    assert masked == want_full[len(want_prompt) :] + [eos_id]
    # The loss starts at the first answer token and ends with the template's
    # end-of-turn token, what it writes after it, and the appended EOS.
    answer = hf.decode(masked, skip_special_tokens=False)
    end_of_turn = {
        "qwen2.5": "<|im_end|>\n",
        "qwen3": "<|im_end|>\n",
        "llama3": "<|eot_id|>",
        "gemma": "<end_of_turn>\n",
    }[name]
    eos = tok.id_to_token(eos_id)
    assert answer.endswith(example["response"] + end_of_turn + eos)
    start = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
    assert answer.startswith(start + example["response"])


def test_generation_prompts_are_the_training_prompts(family):
  name, tok, eos_id, hf = family
  system = "" if name == "gemma" else "Answer briefly."
  gen = pipeline.eval_prompts(
      [dict(e, references=[e["response"]]) for e in EXAMPLES],
      tok,
      eos_id=eos_id,
      batch_size=2,
      max_prompt_length=64,
      template_style="chat",
      system_prompt=system,
  )
  rows, _ = pipeline.tokenize_split(
      EXAMPLES,
      tok,
      eos_id=eos_id,
      max_length=200,
      max_prompt_length=150,
      template_style="chat",
      system_prompt=system,
  )
  batch = gen.dataset[0]
  for r, row in enumerate(rows):
    ids = batch["input_ids"][r][batch["attention_mask"][r] == 1].tolist()
    assert ids == row.ids[: row.prompt_len].tolist()
    turns = [{"role": "system", "content": system}] if system else []
    user = f"{EXAMPLES[r]['instruction']}\n\n{EXAMPLES[r]['input']}".strip()
    turns.append({"role": "user", "content": user})
    assert ids == _hf_ids(hf, turns, add_generation_prompt=True)


def test_no_second_eos_after_a_template_that_ends_with_it(tmp_path):
  # Without <|end_of_text|>, load's EOS is the config's <|eot_id|>, which
  # Llama 3's template already writes after the answer.
  path = _save(tmp_path / "llama", "llama3", without=("<|end_of_text|>",))
  tok, eos_id = tokenizer_lib.load(path)
  assert eos_id == tok.token_to_id("<|eot_id|>")
  hf = transformers.AutoTokenizer.from_pretrained(path)
  (row,), _ = pipeline.tokenize_split(
      EXAMPLES[:1],
      tok,
      eos_id=eos_id,
      max_length=200,
      max_prompt_length=150,
      template_style="chat",
  )
  messages = [
      {"role": "user", "content": EXAMPLES[0]["instruction"]},
      {"role": "assistant", "content": EXAMPLES[0]["response"]},
  ]
  assert row.ids.tolist() == _hf_ids(hf, messages)


def test_a_system_prompt_is_the_first_turn(tmp_path):
  path = _save(tmp_path / "qwen", "qwen2.5")
  tok, eos_id = tokenizer_lib.load(path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  (row,), _ = pipeline.tokenize_split(
      EXAMPLES[:1],
      tok,
      eos_id=eos_id,
      max_length=200,
      max_prompt_length=150,
      template_style="chat",
      system_prompt="Answer briefly.",
  )
  messages = [
      {"role": "system", "content": "Answer briefly."},
      {"role": "user", "content": EXAMPLES[0]["instruction"]},
  ]
  prompt = _hf_ids(hf, messages, add_generation_prompt=True)
  assert row.ids[: row.prompt_len].tolist() == prompt
  # Without one, Qwen2.5's template writes its default system prompt.
  default = pipeline.prompt_of(EXAMPLES[0], "chat", tok)
  assert default.startswith("<|im_start|>system\nYou are Qwen")


def test_template_refusals_are_one_sentence(tmp_path):
  gemma, _ = tokenizer_lib.load(_save(tmp_path / "gemma", "gemma"))
  with pytest.raises(ValueError, match="System role not supported"):
    pipeline.prompt_of(EXAMPLES[0], "chat", gemma, system_prompt="Be brief.")
  user = {"role": "user", "content": "hi"}
  with pytest.raises(ValueError, match="roles must alternate"):
    gemma.apply_chat_template([user, user])
  # The prompt must be the start of the answered conversation.
  wrong = QWEN25.replace(
      "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>model\\n' }}"
  )
  qwen, _ = tokenizer_lib.load(_save(tmp_path / "qwen", "qwen2.5"))
  qwen = tokenizer_lib.HFTokenizer(qwen.tokenizer, qwen.special_tokens, wrong)
  with pytest.raises(ValueError, match="cannot be split off"):
    pipeline.texts_of(EXAMPLES[0], "chat", qwen)
  with pytest.raises(ValueError, match="has none; load an instruct"):
    pipeline.prompt_of(EXAMPLES[0], "chat", tokenizer_lib.byte_level())
  templated = {"instruction": "", "prompt": "Below is an instruction ..."}
  with pytest.raises(ValueError, match="no instruction"):
    pipeline.prompt_of(templated, "chat", gemma)


def test_the_environment_is_transformers():
  """Filters, globals and block handling against transformers' renderer."""
  from transformers.utils import chat_template_utils

  source = (
      "{% set ns = namespace(count=0) %}\n"
      "{% for m in messages %}\n"
      "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
      "  {% set ns.count = ns.count + 1 %}\n"
      "  {% generation %}{{ m | tojson }}{% endgeneration %}\n"
      "{% endfor %}\n"
      "{{ messages[0] | tojson(indent=2, sort_keys=True) }}"
      "{{ dict(a=1, b=[2]) | tojson(separators=(',', ':')) }}"
      "{{ ns.count }}{{ strftime_now('%Y') }}{{ bos_token }}"
      "{% if tools is none and documents is none %}none{% endif %}"
      "{% if add_generation_prompt %}<go>{% endif %}"
  )
  messages = [
      {"role": "user", "content": 'café <b> & "quotes"'},
      {"role": "assistant", "content": "ok"},
      {"role": "user", "content": "never shown"},
  ]
  for prompt in (False, True):
    (want,), _ = chat_template_utils.render_jinja_template(
        [messages],
        chat_template=source,
        add_generation_prompt=prompt,
        bos_token="<s>",
    )
    got = chat.render(
        source, messages, add_generation_prompt=prompt, bos_token="<s>"
    )
    assert got == want
  with pytest.raises(ValueError, match="underscore"):
    chat.render("{% set ns = namespace(_x=1) %}", messages)


def test_from_pretrained_keeps_the_tokenizer_interface(tmp_path):
  path = _save(tmp_path / "llama", "llama3")
  tok = tokenizer_lib.from_pretrained(path)
  bare = tokenizers.Tokenizer.from_file(f"{path}/tokenizer.json")
  text = "Add the numbers: 2 3 4"
  assert tok.encode(text).ids == bare.encode(text).ids
  assert tok.decode(tok.encode(text).ids) == text
  assert tok.get_vocab_size() == bare.get_vocab_size() + 1  # + <|eot_id|>
  lone = tokenizer_lib.from_pretrained(f"{path}/tokenizer.json")
  assert lone.chat_template is None and lone.special_tokens == {}


def test_seqkd_responses_render_the_same_chat_prompt_again(tmp_path):
  tok, _ = tokenizer_lib.load(_save(tmp_path / "qwen", "qwen2.5"))
  prompts = [pipeline.prompt_of(e, "chat", tok) for e in EXAMPLES]
  rows = [
      dict(
          instruction=e["instruction"], input=e["input"], prompt=p, response="r"
      )
      for e, p in zip(EXAMPLES, prompts)
  ]
  path = tmp_path / "train.jsonl"
  seqkd.write(rows, path)
  for line, prompt in zip(path.read_text().splitlines(), prompts):
    record = instruct_jsonl.parse(json.loads(line))
    assert pipeline.prompt_of(record, "chat", tok) == prompt


# The token each family's template writes after an assistant turn's content.
END_OF_TURN = {
    "qwen2.5": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
}


def test_the_end_of_turn_token_is_a_stop_id(family):
  name, tok, eos_id, hf = family
  end = hf.convert_tokens_to_ids(END_OF_TURN[name])
  assert tok.end_of_turn_id() == end
  stops = tokenizer_lib.stop_ids(tok, eos_id, "chat")
  # The EOS first (it pads), then the config's eos_token and the template's
  # end-of-turn token, each once.
  want = [eos_id, hf.eos_token_id, end]
  assert stops == tuple(dict.fromkeys(want))
  # A text template has no turns: its stop ids are the EOS ids only.
  assert tokenizer_lib.stop_ids(tok, eos_id, "minillm") == tuple(
      dict.fromkeys([eos_id, hf.eos_token_id])
  )


def test_generation_config_eos_ids_are_stop_ids(tmp_path):
  path = _save(tmp_path / "llama", "llama3")
  gen = tmp_path / "llama" / "generation_config.json"
  tok, eos_id = tokenizer_lib.load(path)
  eot = tok.token_to_id("<|eot_id|>")
  assert tok.generation_eos_ids == ()
  for value in ([eos_id, 300, eot], 300):
    gen.write_text(json.dumps({"bos_token_id": 0, "eos_token_id": value}))
    tok, eos_id = tokenizer_lib.load(path)
    # transformers reads the same ids from the file.
    want = transformers.GenerationConfig.from_pretrained(path).eos_token_id
    assert list(tok.generation_eos_ids) == (
        want if isinstance(want, list) else [want]
    )
    assert tokenizer_lib.stop_ids(tok, eos_id, "chat") == tuple(
        dict.fromkeys([eos_id, eot, *tok.generation_eos_ids])
    )
  gen.write_text(json.dumps({"eos_token_id": ["<|eot_id|>"]}))
  with pytest.raises(ValueError, match="must be a token id or a list"):
    tokenizer_lib.load(path)


def test_an_export_carries_the_template_and_special_tokens(family, tmp_path):
  """A student saved with an HF tokenizer renders and ends turns as it did."""
  name, tok, _, hf = family
  student = models_lib.create(
      "tiny-llama", rngs=nnx.Rngs(0), vocab_size=tok.get_vocab_size()
  )
  models_lib.save_hf(student, str(tmp_path), tokenizer=tok)
  back = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert back.eos_token == hf.eos_token
  for messages in _conversations(name):
    assert back.apply_chat_template(messages, tokenize=False) == (
        hf.apply_chat_template(messages, tokenize=False)
    )
