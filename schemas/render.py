"""Messages → text, the way a model sees them: the contract between `prefdata tokenize` (which
stores the rendered prompts' ids) and the model side (`generate`, `eval`), which must render a
prompt to exactly the text the shards were made from and stop where a completion ends.

The tokenizer's own chat template where it has one, else a plain template for base models. What a
chat template does is learned once, from a probe conversation rendered with and without the
generation prompt (docs/tokenize.md, the table of families):

  * end of turn: the special tokens the template renders right after an assistant answer
    (`<end_of_turn>` for Gemma, `<|end|><|endoftext|>` for Phi-4-mini, `<|eot_id|>` for Llama 3),
    not `tokenizer.eos_token`. A completion ends with exactly those; a template that renders no
    special token there gets the tokenizer's EOS appended, as the plain template does, because a
    model must be taught a token to stop at.
  * the prompt: the generation prompt where it is a prefix of the rendered conversation (ChatML,
    Llama 3, Gemma, …). Where it is not (DeepSeek-R1 distills end it with `<think>\\n`, which a
    rendered conversation never holds), the prompt is what both renderings share — their longest
    common prefix, never cutting a special token — and the completion is the rest of the
    conversation's rendering. The left-out tail is one string per template, so generate and eval
    cut it from their prompts too.
  * system turns: a template that raises on (or silently drops) a system turn gets it folded into
    the first user turn, as those families' model cards advise, or the record refused
    (`--system-turn drop`, reason `system_not_supported`).
A conversation the template raises on is refused with `template_error`; the others in its batch
are rendered as usual.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BeforeValidator

from schemas.errors import UserError, first_line

# The plain template for base models (no chat template): the Anthropic HH layout, which base
# models have seen and which the DPO paper's HH experiments used. The completion starts with a
# space after "Assistant:" and the tokenizer's EOS is appended.
PLAIN_ROLE_PREFIX = {"system": "System: ", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
PLAIN_GENERATION_PROMPT = "\n\nAssistant:"

TEMPLATE_ERROR = "template_error"  # the template raised on this conversation
TEMPLATE_MISMATCH = "template_mismatch"  # the conversation's rendering does not continue the prompt's
SYSTEM_NOT_SUPPORTED = "system_not_supported"  # --system-turn drop, and the template has no system role
# A message's text holds a special token's string (</s>, <|im_end|>, <|endoftext|>): encoded, it
# would be that token, an end of turn or of text inside the answer the model learns from.
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
SpecialTokensInText = Literal["drop", "keep"]
SystemTurn = Literal["fold", "drop"]

# Probe texts: plain words no template rewrites, starting with a letter no template's generation
# prompt tail ends on by accident (the common-prefix cut is checked against special tokens anyway).
_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "Probe system words.", "Probe question words?", "Zq probe answer words."
# apply_chat_template's own parameters: a template option of the same name would collide with them.
_RESERVED_KWARGS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
                    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
                    "return_assistant_tokens_mask", "tokenizer_kwargs", "messages"}


def parse_chat_template_kwargs(value: Any) -> Any:
    """`--chat-template-kwargs`: a JSON object (`{"enable_thinking": false}`) or comma-separated
    key=value pairs (`enable_thinking=false`), each value read as JSON where it parses (false,
    3, "x") and as a string where it does not. A dict (a --config file) passes through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"--chat-template-kwargs: not a JSON object ({exc.msg})") from None
        else:
            value = dict(_key_value(item) for item in text.split(",") if item.strip())
    if not isinstance(value, dict):
        raise UserError("--chat-template-kwargs: expected a JSON object or key=value pairs (e.g. enable_thinking=false)")
    clashing = sorted(set(value) & _RESERVED_KWARGS)
    if clashing:
        raise UserError(f"--chat-template-kwargs: {', '.join(clashing)} is set by prefdata itself, not a template option")
    return value


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, raw = (part.strip() for part in item.partition("="))
    if not sep or not key:
        raise UserError(f"--chat-template-kwargs: '{item}' is not key=value (e.g. enable_thinking=false)")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


ChatTemplateKwargs = Annotated[dict[str, Any], BeforeValidator(parse_chat_template_kwargs)]
CHAT_TEMPLATE_KWARGS_HELP = ("Options the chat template reads, as JSON or key=value pairs (e.g. enable_thinking=false); "
                             "saved in the manifest, and a later stage must be given the same.")


class Rendered(NamedTuple):
    """Texts of a batch, and for each one that could not be rendered (None) its reason."""

    texts: list[str | None]
    reasons: list[str | None]


def _all_rendered(texts: list[str]) -> Rendered:
    return Rendered(list(texts), [None] * len(texts))


def _added_texts(tokenizer: Any, special_only: bool = False) -> list[str]:
    """The strings of the tokenizer's added tokens (its special ones only), longest first, so a
    token that contains another is the one found."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.content and (t.special or not special_only)},
                  key=len, reverse=True)


def _special_text(tokenizer: Any, special_tokens_in_text: SpecialTokensInText) -> re.Pattern[str] | None:
    """What `_without_specials` refuses: the strings the tokenizer encodes as its special tokens
    wherever they appear in a text; None with `keep` (encoded as the tokens themselves, as TRL and
    the tokenizer do)."""
    specials = _added_texts(tokenizer, special_only=True) if special_tokens_in_text == "drop" else []
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _without_specials(pattern: re.Pattern[str] | None, conversations: Sequence[list[dict]], rendered: Rendered) -> Rendered:
    """`rendered`, with each conversation a message of which holds a special token's string refused
    (SPECIAL_TOKEN_IN_TEXT)."""
    if pattern is None:
        return rendered
    texts, reasons = list(rendered.texts), list(rendered.reasons)
    for i, messages in enumerate(conversations):
        if reasons[i] is None and any(pattern.search(m["content"]) for m in messages):
            texts[i], reasons[i] = None, SPECIAL_TOKEN_IN_TEXT
    return Rendered(texts, reasons)


class ChatRenderer:
    """The tokenizer's own chat template, with the end of turn, prompt rule and system-role
    support found by probing it (module docstring)."""

    kind = "chat"
    add_bos_id = False  # a chat template renders its own BOS where the model wants one

    def __init__(self, tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None, system_turn: SystemTurn = "fold",
                 special_tokens_in_text: SpecialTokensInText = "drop") -> None:
        self.tokenizer = tokenizer
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.system_turn = system_turn
        self.special_text = _special_text(tokenizer, special_tokens_in_text)
        self._specials = _added_texts(tokenizer)
        exchange = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
        try:
            conversation = self._apply([exchange], generation_prompt=False)[0]
            generation = self._apply([exchange[:1]], generation_prompt=True)[0]
        except Exception as exc:  # noqa: BLE001 - any template failure on a plain exchange is the user's template
            raise UserError(f"the chat template cannot render a user/assistant exchange ({first_line(exc)}); "
                            "fix --chat-template-kwargs or use --template plain") from None
        if _PROBE_ANSWER not in conversation:
            raise UserError("the chat template does not render an assistant answer's text; use --template plain")
        tail = conversation[conversation.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
        self.end_of_turn = tail[: self._end_of_turn_end(tail)]
        self.end_of_turn_ids = self._special_ids(self.end_of_turn)
        self.appended_ids = [] if self.end_of_turn_ids else [tokenizer.eos_token_id]
        shared = self._common_prefix(generation, conversation)
        self.generation_tail_left_out = generation[shared:]
        self.prompt_rule = "shared_prefix" if self.generation_tail_left_out else "generation_prompt"
        self.system_role = self._renders_system()

    # -- probing

    def _apply(self, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
        return self.tokenizer.apply_chat_template(conversations, add_generation_prompt=generation_prompt, tokenize=False,
                                                  **self.template_kwargs)

    def _occurrences(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every special token in `text`, leftmost-longest as the tokenizer splits them."""
        found, i = [], 0
        while i < len(text):
            token = next((s for s in self._specials if text.startswith(s, i)), None)
            if token is None:
                i += 1
            else:
                found.append((i, i + len(token)))
                i += len(token)
        return found

    def _end_of_turn_end(self, tail: str) -> int:
        """Where the end of turn after an answer stops: the first special token and the ones right
        after it (Phi-4's `<|end|><|endoftext|>`), not text beyond them (Phi-3's `<|end|>\n` and
        the EOS it renders at the end of a conversation: the model stops at `<|end|>`)."""
        spans = self._occurrences(tail)
        end = spans[0][1] if spans else 0
        for start, stop in spans[1:]:
            if start != end:
                break
            end = stop
        return end

    def _special_ids(self, text: str) -> list[int]:
        return [self.tokenizer.convert_tokens_to_ids(text[a:b]) for a, b in self._occurrences(text)]

    def _common_prefix(self, a: str, b: str) -> int:
        """Length of the longest common prefix of `a` and `b`, moved back to the start of any
        special token it would cut in two: the prompt/completion boundary is a token boundary."""
        n = len(os.path.commonprefix([a, b]))
        for start, end in self._occurrences(a):
            if start < n < end:
                return start
        return n

    def _renders_system(self) -> bool:
        messages = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
        try:
            return _PROBE_SYSTEM in self._apply([messages], generation_prompt=True)[0]
        except Exception:  # noqa: BLE001 - Gemma-style templates raise on a system turn: no system role
            return False

    # -- rendering

    def _fit_roles(self, messages: list[dict]) -> tuple[list[dict] | None, str | None]:
        """The messages as this template can take them: a leading system turn folded into the
        first user turn (or refused) where the template has no system role."""
        if self.system_role or not messages or messages[0]["role"] != "system":
            return messages, None
        if self.system_turn == "drop":
            return None, SYSTEM_NOT_SUPPORTED
        system, rest = messages[0], messages[1:]
        if rest and rest[0]["role"] == "user":
            return [{"role": "user", "content": system["content"] + "\n\n" + rest[0]["content"]}, *rest[1:]], None
        return [{"role": "user", "content": system["content"]}, *rest], None

    def _render(self, conversations: Sequence[list[dict]], generation_prompt: bool) -> Rendered:
        """Each conversation rendered; one the template raises on gets `template_error`, and the
        rest of the batch is rendered one by one so it never fails with it."""
        fitted = [self._fit_roles(c) for c in conversations]
        texts: list[str | None] = [None] * len(fitted)
        reasons = [reason for _, reason in fitted]
        rows = [i for i, (messages, _) in enumerate(fitted) if messages is not None]
        try:
            for i, text in zip(rows, self._apply([fitted[i][0] for i in rows], generation_prompt) if rows else []):
                texts[i] = text
        except Exception:  # noqa: BLE001 - a template raises whatever its author wrote; find the record(s)
            for i in rows:
                try:
                    texts[i] = self._apply([fitted[i][0]], generation_prompt)[0]
                except Exception:  # noqa: BLE001
                    reasons[i] = TEMPLATE_ERROR
        return _without_specials(self.special_text, conversations, Rendered(texts, reasons))

    def prompts(self, prompts: Sequence[list[dict]]) -> Rendered:
        rendered = self._render(prompts, generation_prompt=True)
        if not self.generation_tail_left_out:
            return rendered
        tail = self.generation_tail_left_out
        texts = [t[: len(t) - len(tail)] if t is not None and t.endswith(tail) else None for t in rendered.texts]
        reasons = [r or (TEMPLATE_MISMATCH if t is None else None) for t, r in zip(texts, rendered.reasons)]
        return Rendered(texts, reasons)

    def completions(self, prompts: Sequence[list[dict]], prompt_texts: Sequence[str | None], answers: Sequence[list[dict]]) -> Rendered:
        """What the conversation's rendering adds after the prompt text, cut after the end of
        turn (the template's newline after it is not something a model generates)."""
        full = self._render([p + a for p, a in zip(prompts, answers)], generation_prompt=False)
        texts: list[str | None] = []
        reasons = list(full.reasons)
        for i, (text, prompt) in enumerate(zip(full.texts, prompt_texts)):
            completion = self._completion(text, prompt) if text is not None and prompt is not None else None
            if completion is None and reasons[i] is None:
                reasons[i] = TEMPLATE_MISMATCH
            texts.append(completion)
        return Rendered(texts, reasons)

    def _completion(self, full: str, prompt: str) -> str | None:
        if not full.startswith(prompt):
            return None  # this conversation's history renders differently from its prompt
        completion = full[len(prompt):]
        if not self.end_of_turn:
            return completion.rstrip()
        end = completion.rfind(self.end_of_turn)
        return completion[: end + len(self.end_of_turn)] if end >= 0 else None

    def conversations(self, prompts: Sequence[list[dict]], answers: Sequence[str]) -> Rendered:
        """Each prompt with its answer as the last assistant turn, as a reward model reads it."""
        return self._render([p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)], generation_prompt=False)

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the rendering rule."""
        return {"template": self.kind, "end_of_turn": self.end_of_turn, "eos_appended": bool(self.appended_ids),
                "prompt_rule": self.prompt_rule, "generation_tail_left_out": self.generation_tail_left_out,
                "system_role": "native" if self.system_role else self.system_turn}


class PlainRenderer:
    """HH-style text for base models; EOS appended as a token id."""

    kind = "plain"

    def __init__(self, tokenizer: Any, special_tokens_in_text: SpecialTokensInText = "drop") -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        # Prepend BOS exactly when the tokenizer itself would (Llama-style), so a base model sees
        # what it saw in pre-training — and never twice.
        probe = tokenizer("a").input_ids
        self.add_bos_id = bos is not None and bool(probe) and probe[0] == bos
        self.end_of_turn_ids = self.appended_ids = [tokenizer.eos_token_id]
        self.system_role = True  # "System: …" is part of the layout
        self.special_text = _special_text(tokenizer, special_tokens_in_text)

    @staticmethod
    def _render(messages: list[dict]) -> str:
        return "".join(PLAIN_ROLE_PREFIX[m["role"]] + m["content"] for m in messages)

    def prompts(self, prompts: Sequence[list[dict]]) -> Rendered:
        rendered = _all_rendered([(self._render(p) + PLAIN_GENERATION_PROMPT).lstrip("\n") for p in prompts])
        return _without_specials(self.special_text, prompts, rendered)

    def conversations(self, prompts: Sequence[list[dict]], answers: Sequence[str]) -> Rendered:
        rendered = self.prompts(prompts)
        texts = [text + " " + answer if text is not None else None for text, answer in zip(rendered.texts, answers)]
        return _without_specials(self.special_text, [[{"content": a}] for a in answers], Rendered(texts, rendered.reasons))

    def completions(self, prompts: Sequence[list[dict]], prompt_texts: Sequence[str | None], answers: Sequence[list[dict]]) -> Rendered:
        # The answer's own "\n\nAssistant: " prefix is already in the prompt's generation prompt.
        rendered = _all_rendered([" " + self._render(a)[len(PLAIN_ROLE_PREFIX["assistant"]):] for a in answers])
        return _without_specials(self.special_text, answers, rendered)

    def describe(self) -> dict[str, Any]:
        return {"template": self.kind, "end_of_turn": self.tokenizer.eos_token, "eos_appended": True,
                "prompt_rule": "generation_prompt", "generation_tail_left_out": "", "system_role": "native"}


Renderer = ChatRenderer | PlainRenderer


def make_renderer(tokenizer: Any, template: str, chat_template_kwargs: dict[str, Any] | None = None,
                  system_turn: SystemTurn = "fold", special_tokens_in_text: SpecialTokensInText = "drop") -> Renderer:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_template:
        raise UserError("--template chat: this tokenizer has no chat template; use --template plain (or auto)")
    if template == "chat" or (template == "auto" and has_template):
        return ChatRenderer(tokenizer, chat_template_kwargs, system_turn, special_tokens_in_text)
    return PlainRenderer(tokenizer, special_tokens_in_text)


def prompt_token_ids(renderer: Renderer, prompts: Sequence[list[dict]]) -> tuple[list[list[int] | None], list[str | None]]:
    """The ids `prefdata tokenize` stores as `prompt_input_ids` for these prompts — rendered,
    encoded without special tokens, BOS in front where the renderer adds it — and for each prompt
    the template refused (None) its reason."""
    bos = [renderer.tokenizer.bos_token_id] if renderer.add_bos_id else []
    rendered = renderer.prompts(prompts)
    kept = [t for t in rendered.texts if t is not None]
    encoded = iter(renderer.tokenizer(kept, add_special_tokens=False).input_ids if kept else [])
    return [bos + next(encoded) if t is not None else None for t in rendered.texts], rendered.reasons


def conversation_token_ids(renderer: Renderer, prompts: Sequence[list[dict]],
                           answers: Sequence[str]) -> tuple[list[list[int] | None], list[str | None]]:
    """Each prompt followed by its answer as `prefdata tokenize` stores a pair's row:
    `prompt_input_ids` + the answer's completion ids (ending at the template's end of turn, EOS
    after it only where the template renders none) — what a reward model trained on the shards
    read — and for each the reason the template refused it (None where it did not)."""
    prompt_ids, prompt_reasons = prompt_token_ids(renderer, prompts)
    completions = renderer.completions(prompts, renderer.prompts(prompts).texts,
                                       [[{"role": "assistant", "content": answer}] for answer in answers])
    kept = [t for t in completions.texts if t is not None]
    encoded = iter(renderer.tokenizer(kept, add_special_tokens=False).input_ids if kept else [])
    answer_ids = [next(encoded) + list(renderer.appended_ids) if t is not None else None for t in completions.texts]
    reasons = [p or c for p, c in zip(prompt_reasons, completions.reasons)]
    return [p + a if reason is None else None for p, a, reason in zip(prompt_ids, answer_ids, reasons)], reasons


def stop_token_ids(renderer: Renderer, generation_eos: int | list[int] | None) -> list[int]:
    """The ids a sampled answer ends at: the template's end of turn, the tokenizer's EOS, and the
    model's generation-config EOS ids. generate and eval both stop on this set, so a sample ends
    where a tokenized completion does."""
    configured = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return sorted({i for i in [*renderer.end_of_turn_ids, renderer.tokenizer.eos_token_id, *configured] if i is not None})


def check_template_kwargs(given: dict[str, Any], tokenized_with: dict[str, Any], where: str) -> None:
    """A later stage renders prompts the way the shards were made, or refuses to run."""
    if given != tokenized_with:
        raise UserError(f"{where} were tokenized with --chat-template-kwargs '{json.dumps(tokenized_with)}', this run has "
                        f"'{json.dumps(given)}'; pass the same (or re-run prefdata tokenize with these)")

