"""Chat prompts: rendering a conversation with the model's Jinja chat template.

Owns turning messages ([{'role': 'user', 'content': '...'}, ...]) into the prompt text a chat model
expects, the way Hugging Face's apply_chat_template does (a sandboxed jinja2 environment with
trim_blocks and lstrip_blocks, raise_exception(), strftime_now(), a tojson that keeps non-ASCII),
plus built-in Llama 3 and ChatML (Qwen) templates for files that carry none, and the interactive
loop of `python -m mpillama chat` (rank 0; the server lives in server.py). Never imports mpi4py.

The rendered text usually starts with the BOS token's text when the template writes bos_token
itself (Llama 3's does); Tokenizer.encode does not add a second BOS in that case.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Callable, TextIO

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mpillama.errors import MpillamaError

# Llama 3 / 3.1 / 3.2 instruct format, without their tool-calling and date preamble.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ChatML, as Qwen 2/2.5/3 use it (Qwen3's own template adds thinking and tool handling on top).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FALLBACK_TEMPLATES = {"llama": LLAMA3_TEMPLATE, "qwen3": CHATML_TEMPLATE, "qwen3moe": CHATML_TEMPLATE}


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    arch_hint: str = "llama",
    extra_vars: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for `messages`; template None uses the built-in one for arch_hint ('llama' | 'qwen3').

    extra_vars are passed to the template as well (e.g. {'enable_thinking': False} for Qwen3's).
    Message content given as OpenAI-style parts ([{'type': 'text', 'text': ...}]) is joined into one string.
    """
    if template is None:
        if arch_hint not in FALLBACK_TEMPLATES:
            raise MpillamaError(f"no chat template in the model and no built-in one for {arch_hint!r} "
                                f"(built-in: {', '.join(FALLBACK_TEMPLATES)}); pass a model whose file has one")
        template = FALLBACK_TEMPLATES[arch_hint]
    compiled = _compile(template)
    variables = dict(extra_vars or {})
    variables.update(messages=[_plain_message(m) for m in messages], bos_token=bos_token, eos_token=eos_token,
                     add_generation_prompt=add_generation_prompt)
    try:
        return compiled.render(**variables)
    except MpillamaError:
        raise
    except jinja2.TemplateError as e:
        raise MpillamaError(f"the chat template failed to render: {e}; fix the template or the messages") from None


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise MpillamaError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                            "fix it or run without a template") from None


def _raise_exception(message: str) -> None:
    raise MpillamaError(f"the chat template refused the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping) or "role" not in message:
        raise MpillamaError(f"chat message {message!r} has no 'role': "
                            "give dicts like {'role': 'user', 'content': 'hi'}")
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = "".join(part.get("text", "") for part in content
                          if isinstance(part, Mapping) and part.get("type") == "text")
    return {**message, "content": "" if content is None else content}


CHAT_HELP = ("commands: /exit or /quit ends the chat, /reset starts a new conversation, /help shows this; "
             "anything else is a message to the model")


def chat_loop(engine: Any, system: str | None, steps: int, sampler: Any, lines: TextIO,
              write: Callable[[str], None], prompt: Callable[[], None]) -> Any:
    """Rank 0: read a message per line from lines, answer it with the conversation so far, until
    /exit, /quit or end of input. Returns the last Generation (or None).

    The commands matter under mpirun: Open MPI 5's mpirun never passes end of input to rank 0.
    The engine keeps the conversation's K/V rows, so each turn prefills only its new tokens.
    """
    from mpillama.errors import ContextFull
    from mpillama.output import say

    tok = engine.tokenizer
    first = [{"role": "system", "content": system}] if system else []
    messages: list[dict[str, str]] = list(first)
    last = None
    while True:
        prompt()
        line = lines.readline()
        if not line:
            return last
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return last
        if text == "/help":
            say(0, CHAT_HELP)
            continue
        if text == "/reset":
            messages = list(first)
            engine.reset()
            say(0, "mpillama: new conversation")
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        rendered = render_chat(tok.chat_template, messages, bos_token=tok.bos_text, eos_token=tok.eos_text,
                               add_generation_prompt=True, arch_hint=engine.cfg.arch)
        try:
            ids = tok.encode(rendered)  # adds BOS only if the template did not write it
        except MpillamaError as e:  # e.g. bytes that are not UTF-8: refuse this line, keep the chat
            say(0, f"mpillama: {e}")
            messages.pop()
            continue
        try:
            last = engine.generate(ids, steps, sampler, on_text=write)
        except ContextFull as e:
            say(0, f"mpillama: {e}; starting a new conversation")
            messages = list(first)
            engine.reset()
            continue
        write("\n")
        messages.append({"role": "assistant", "content": last.text.strip()})
