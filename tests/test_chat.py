"""Chat templates: a Llama-3-style template, real templates shipped in vocabulary files, the fallbacks.

Expected prompts are written out by hand from each format's published layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mpillama.chat import render_chat
from mpillama.errors import MpillamaError

# Written in the style of Meta's Llama 3.1 template: system message pulled out, strict roles,
# {%- -%} whitespace control, bos_token written by the template.
LLAMA3_STYLE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- if system_message %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
CONVERSATION = [
    {"role": "system", "content": "You are terse. "},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]
LLAMA3_EXPECTED = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_llama3_style_template() -> None:
    assert render_chat(LLAMA3_STYLE, CONVERSATION, bos_token=BOS, eos_token=EOT) == LLAMA3_EXPECTED
    without_prompt = render_chat(LLAMA3_STYLE, CONVERSATION, bos_token=BOS, eos_token=EOT, add_generation_prompt=False)
    assert without_prompt == LLAMA3_EXPECTED.removesuffix("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama3_fallback_gives_the_same_prompt() -> None:
    assert render_chat(None, CONVERSATION, bos_token=BOS, eos_token=EOT, arch_hint="llama") == LLAMA3_EXPECTED


def test_chatml_fallback() -> None:
    prompt = render_chat(None, CONVERSATION[1:], bos_token="", eos_token="<|im_end|>", arch_hint="qwen3")
    assert prompt == ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                      "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_templates_shipped_in_vocabulary_files() -> None:
    from tests.test_tokenizer import meta

    qwen = meta("qwen2")["tokenizer.chat_template"]
    assert render_chat(qwen, [{"role": "user", "content": "Hi"}], bos_token="", eos_token="<|endoftext|>") == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")
    phi3 = meta("phi-3")["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Q"}]
    assert render_chat(phi3, messages, bos_token="<s>", eos_token="<|endoftext|>") == (
        "<s><|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n<|user|>\nQ<|end|>\n<|assistant|>\n")


def test_rendered_prompt_tokenizes_to_control_ids() -> None:
    from tests.test_tokenizer import gguf_tokenizer

    tok = gguf_tokenizer("llama-bpe")
    prompt = render_chat(None, [{"role": "user", "content": "Hello"}], bos_token=tok.bos_text, eos_token=tok.eos_text)
    assert tok.encode(prompt) == [128000, 128006, 882, 128007, 271, 9906, 128009, 128006, 78191, 128007, 271]


def test_hf_helpers_and_options() -> None:
    template = (
        "{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n{% endfor %}"
        "{{ ns.n }} {{ enable_thinking }} {{ strftime_now('%Y') | length }}"
    )
    messages = [{"role": "user", "content": "café <b> & 'x'"}]
    out = render_chat(template, messages, bos_token="", eos_token="", extra_vars={"enable_thinking": False})
    assert out == '{"role": "user", "content": "café <b> & \'x\'"}\n1 False 4'


def test_trim_and_lstrip_blocks() -> None:
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n"
                "    {% endif %}\n{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    out = render_chat(template, messages, bos_token="", eos_token="")
    assert out == "U:a\nU:b\n"


def test_openai_content_parts_are_joined() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "image_url"},
                                             {"type": "text", "text": "world"}]}]
    out = render_chat(None, messages, bos_token="", eos_token="", arch_hint="qwen3", add_generation_prompt=False)
    assert out == "<|im_start|>user\nHello world<|im_end|>\n"


def test_errors() -> None:
    with pytest.raises(MpillamaError, match="Unknown role tool"):
        render_chat(LLAMA3_STYLE, [{"role": "tool", "content": "x"}], bos_token=BOS, eos_token=EOT)
    with pytest.raises(MpillamaError, match="not valid Jinja"):
        render_chat("{% for m in messages %}", CONVERSATION, bos_token="", eos_token="")
    with pytest.raises(MpillamaError, match="no built-in one for 'mistral'"):
        render_chat(None, CONVERSATION, bos_token="", eos_token="", arch_hint="mistral")
    with pytest.raises(MpillamaError, match="failed to render"):  # the sandbox stops attribute escapes
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", CONVERSATION, bos_token="", eos_token="")
    with pytest.raises(MpillamaError, match="no 'role'"):
        render_chat(None, [{"content": "x"}], bos_token="", eos_token="")


def test_chat_commands_end_and_reset_without_end_of_input(models: dict[str, Path]) -> None:
    """Under mpirun stdin never ends: /reset and /exit must work, and are never sent to the model."""
    import subprocess
    import sys

    script = "Hello\n/reset\nHello\n/help\n/exit\nnever answered\n"
    done = subprocess.run([sys.executable, "-m", "mpillama", "chat", "--model", str(models["tiny-q40"]), "--steps", "5"],
                          input=script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and answers[0] == answers[1], done.stdout  # a reset conversation answers alike
    assert "new conversation" in done.stderr and "/exit or /quit" in done.stderr


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(models: dict[str, Path]) -> None:
    import subprocess
    import sys

    script = b"Hello\n\xff\xfe not text\nHello\n/exit\n"
    done = subprocess.run([sys.executable, "-m", "mpillama", "chat", "--model", str(models["tiny-q40"]), "--steps", "5"],
                          input=script, capture_output=True, timeout=300)
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, stderr
    answers = [line for line in done.stdout.decode(errors="replace").splitlines() if line.strip()]
    assert len(answers) == 2, answers
    assert "UTF-8" in stderr and "Traceback" not in stderr, stderr
