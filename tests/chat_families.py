"""Chat layouts of the model families people train, written from their published templates
(issue 24): the Jinja reproduces each family's turn markers, BOS/EOS as the family ships them, and
the quirks tokenize must survive. Each `Family` says what a correct tokenization looks like, so
the tests check the renderer against the family, not against itself."""

from __future__ import annotations

from dataclasses import dataclass

from train.tiny import CHATML, ChatLayout

# Gemma (2): BOS rendered by the template, turns end <end_of_turn>, no system role (raises), the
# assistant is "model", contents trimmed. EOS <eos> is never rendered.
GEMMA = ChatLayout(
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
    "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"))

# Phi-4-mini: turns end <|end|>; a conversation rendered without a generation prompt ends with EOS.
PHI4_MINI = ChatLayout(
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
    "<|endoftext|>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))

# Phi-3: each turn ends `<|end|>` and a newline; a conversation rendered without a generation
# prompt also ends with EOS, after that newline (the model stops at `<|end|>`).
PHI3 = ChatLayout(
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    "<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))

# DeepSeek-R1 distills: system text right after BOS; the generation prompt opens a <think> block a
# rendered conversation never has (reasoning is stripped from assistant turns).
DEEPSEEK_R1 = ChatLayout(
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{% endif %}"
    "{% endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ("<｜User｜>", "<｜Assistant｜>"), added=("<think>", "</think>"))

# Qwen3: ChatML; assistant turns after the last user turn render an (empty) think block, earlier
# ones do not; enable_thinking=false puts the empty think block into the generation prompt.
QWEN3 = ChatLayout(
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}",
    None, "<|im_end|>", ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), added=("<think>", "</think>"))

# Llama 3: turns end <|eot_id|>; this release ships <|end_of_text|> as EOS.
LLAMA3 = ChatLayout(
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "<|begin_of_text|>", "<|end_of_text|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

# Mistral: [INST] … [/INST], the system prompt folded into the first user turn by the template
# itself, answers end with EOS, no generation prompt.
MISTRAL = ChatLayout(
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.first %}{{ '[INST] ' + system + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}",
    "<s>", "</s>", ("[INST]", "[/INST]"))


@dataclass(frozen=True)
class Family:
    name: str
    layout: ChatLayout
    add_bos: bool  # does the family's tokenizer prepend BOS by itself
    end_of_turn: str  # what a completion must end with
    generation_eos: tuple[str, ...]  # the model's generation-config EOS tokens
    system_role: bool  # does the template render a system turn
    prompt_rule: str = "generation_prompt"
    template_kwargs: tuple[tuple[str, object], ...] = ()


FAMILIES = [
    Family("chatml", CHATML, True, "<|im_end|>", ("<|im_end|>",), True),
    Family("gemma", GEMMA, True, "<end_of_turn>", ("<eos>", "<end_of_turn>"), False),
    Family("phi4-mini", PHI4_MINI, False, "<|end|><|endoftext|>", ("<|endoftext|>", "<|end|>"), True),
    Family("phi3", PHI3, True, "<|end|>", ("<|endoftext|>", "<|end|>"), True),
    Family("deepseek-r1", DEEPSEEK_R1, True, "<｜end▁of▁sentence｜>", ("<｜end▁of▁sentence｜>",), True, "shared_prefix"),
    Family("qwen3", QWEN3, False, "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), True),
    Family("qwen3-no-thinking", QWEN3, False, "<|im_end|>", ("<|im_end|>", "<|endoftext|>"), True,
           template_kwargs=(("enable_thinking", False),)),
    Family("llama3", LLAMA3, True, "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>"), True),
    Family("mistral", MISTRAL, True, "</s>", ("</s>",), True),
]
