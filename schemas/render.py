"""Messages → text, the way a model sees them: the contract between `prefdata tokenize` (which
stores the rendered prompts' ids) and the model side (`generate`, `eval`), which must render a
prompt to exactly the text the shards were made from.

The tokenizer's own chat template where it has one, else a plain template for base models.
"""

from __future__ import annotations

from typing import Any

from schemas.errors import UserError

# The plain template for base models (no chat template): the Anthropic HH layout, which base
# models have seen and which the DPO paper's HH experiments used. The completion starts with a
# space after "Assistant:" and the tokenizer's EOS is appended.
PLAIN_ROLE_PREFIX = {"system": "System: ", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}
PLAIN_GENERATION_PROMPT = "\n\nAssistant:"


class ChatRenderer:
    """The tokenizer's own chat template. The completion is what the template adds after the
    generation prompt, cut after the last end-of-turn token (dropping the template's trailing
    newline, which a model never generates)."""

    kind = "chat"
    add_bos_id = False  # a chat template renders its own BOS where the model wants one

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn = tokenizer.eos_token

    def prompts(self, prompts: list[list[dict]]) -> list[str]:
        return self.tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)

    def completions(self, prompts: list[list[dict]], prompt_texts: list[str], answers: list[list[dict]]) -> list[str | None]:
        full_texts = self.tokenizer.apply_chat_template([p + a for p, a in zip(prompts, answers)], tokenize=False)
        return [self._completion(full, prompt) for full, prompt in zip(full_texts, prompt_texts)]

    def conversations(self, prompts: list[list[dict]], answers: list[str]) -> list[str]:
        """Each prompt with its answer as the last assistant turn, as a reward model reads it."""
        return self.tokenizer.apply_chat_template([p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)],
                                                  tokenize=False)

    def _completion(self, full: str, prompt: str) -> str | None:
        if not full.startswith(prompt):
            return None  # the template renders history differently from a generation prompt
        completion = full[len(prompt):]
        end = completion.rfind(self.end_of_turn) if self.end_of_turn else -1
        return completion[: end + len(self.end_of_turn)] if end >= 0 else completion.rstrip()


class PlainRenderer:
    """HH-style text for base models; EOS appended as a token id."""

    kind = "plain"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        # Prepend BOS exactly when the tokenizer itself would (Llama-style), so a base model sees
        # what it saw in pre-training — and never twice.
        probe = tokenizer("a").input_ids
        self.add_bos_id = bos is not None and bool(probe) and probe[0] == bos

    @staticmethod
    def _render(messages: list[dict]) -> str:
        return "".join(PLAIN_ROLE_PREFIX[m["role"]] + m["content"] for m in messages)

    def prompts(self, prompts: list[list[dict]]) -> list[str]:
        return [(self._render(p) + PLAIN_GENERATION_PROMPT).lstrip("\n") for p in prompts]

    def conversations(self, prompts: list[list[dict]], answers: list[str]) -> list[str]:
        return [text + " " + answer for text, answer in zip(self.prompts(prompts), answers)]

    def completions(self, prompts: list[list[dict]], prompt_texts: list[str], answers: list[list[dict]]) -> list[str | None]:
        # The answer's own "\n\nAssistant: " prefix is already in the prompt's generation prompt.
        return [" " + self._render(a)[len(PLAIN_ROLE_PREFIX["assistant"]):] for a in answers]


def make_renderer(tokenizer: Any, template: str) -> ChatRenderer | PlainRenderer:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_template:
        raise UserError("--template chat: this tokenizer has no chat template; use --template plain (or auto)")
    if template == "chat" or (template == "auto" and has_template):
        return ChatRenderer(tokenizer)
    return PlainRenderer(tokenizer)


def prompt_token_ids(renderer: ChatRenderer | PlainRenderer, prompts: list[list[dict]]) -> list[list[int]]:
    """The ids `prefdata tokenize` stores as `prompt_input_ids` for these prompts: rendered,
    encoded without special tokens, BOS in front where the renderer adds it."""
    bos = [renderer.tokenizer.bos_token_id] if renderer.add_bos_id else []
    texts = renderer.prompts(prompts)
    return [bos + ids for ids in renderer.tokenizer(texts, add_special_tokens=False).input_ids] if texts else []
