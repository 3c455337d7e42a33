"""Prompt layout from the model's own chat template (KVZIP.md, "Prompt layout").

prefill  = prefix (system + user header + task instruction) + context
question = "\\n\\n" + question + postfix (end of user turn + assistant header)
x_0      = REPEAT_FIRST + postfix + chunk_0
x_k      = REPEAT_NEXT + last 8 ids of chunk_{k-1} + postfix + chunk_k
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

INSTRUCTION = (
    "Given the context, answer to the following question or request without explanation.\n\n"
)
REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "
OVERLAP_TOKENS = 8
_SENTINEL = "\u2063KVZIP-CONTENT\u2063"


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of the fixed prompt pieces of one model (and optional system prompt)."""

    prefix_ids: tuple[int, ...]
    postfix_ids: tuple[int, ...]
    repeat_first_ids: tuple[int, ...]
    repeat_next_ids: tuple[int, ...]
    question_sep_ids: tuple[int, ...]

    def reconstruction_ids(self, chunk: Sequence[int], previous: Sequence[int] | None) -> list[int]:
        """x_k: the repeat prompt, the overlap (k >= 1), the postfix, then the chunk itself."""
        if previous is None:
            head = list(self.repeat_first_ids)
        else:
            head = list(self.repeat_next_ids) + list(previous[-OVERLAP_TOKENS:])
        return head + list(self.postfix_ids) + list(chunk)

    def reconstruction_prompt_len(self, previous: Sequence[int] | None) -> int:
        """Number of x_k tokens before the chunk starts."""
        return len(self.reconstruction_ids([], previous))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def build_layout(tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> PromptLayout:
    """Split the chat template around a sentinel user message into prefix and postfix."""
    messages = [{"role": "user", "content": _SENTINEL}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, sep, after = str(rendered).partition(_SENTINEL)
    if not sep:
        raise ValueError("the chat template dropped the user message content")
    return PromptLayout(
        prefix_ids=_encode(tokenizer, before + INSTRUCTION),
        postfix_ids=_encode(tokenizer, after),
        repeat_first_ids=_encode(tokenizer, REPEAT_FIRST),
        repeat_next_ids=_encode(tokenizer, REPEAT_NEXT),
        question_sep_ids=_encode(tokenizer, "\n\n"),
    )


def question_ids(
    layout: PromptLayout, tokenizer: PreTrainedTokenizerBase, question: str
) -> list[int]:
    """ "\\n\\n" + question + postfix, as token ids."""
    return list(_encode(tokenizer, "\n\n" + question)) + list(layout.postfix_ids)
