"""Prompt layout from the model's own chat template (KVZIP.md, "Prompt layout").

prefill  = prefix (system + user header + task instruction) + context
question = "\\n\\n" + question + postfix (end of user turn + assistant header)
chat     = "\\n\\n" + instructions + "\\n\\n" + u_1 + assistant_open + a_1 + user_open + ...
           + u_n + postfix (the conversation continues the context's user turn)
x_0      = REPEAT_FIRST + postfix + chunk_0
x_k      = REPEAT_NEXT + last 8 ids of chunk_{k-1} + postfix + chunk_k
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from service.errors import InvalidInputError
from service.types import Turn

INSTRUCTION = (
    "Given the context, answer to the following question or request without explanation.\n\n"
)
REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with "
OVERLAP_TOKENS = 8
_SENTINEL = "\u2063KVZIP-CONTENT\u2063"
_TURNS = tuple(f"\u2063KVZIP-TURN-{i}\u2063" for i in range(3))


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of the fixed prompt pieces of one model (and optional system prompt)."""

    prefix_ids: tuple[int, ...]
    postfix_ids: tuple[int, ...]
    repeat_first_ids: tuple[int, ...]
    repeat_next_ids: tuple[int, ...]
    question_sep_ids: tuple[int, ...]
    assistant_open_ids: tuple[int, ...] = ()  # end of a user turn + assistant header
    user_open_ids: tuple[int, ...] = ()  # end of an assistant turn + user header

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


def _render(tokenizer: PreTrainedTokenizerBase, system: str | None, *turns: str) -> str:
    """The chat template over alternating user/assistant messages, generation prompt on."""
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _between(rendered: str, first: str, second: str) -> str:
    start = rendered.index(first) + len(first)
    return rendered[start : rendered.index(second, start)]


def build_layout(tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> PromptLayout:
    """Split the chat template around a sentinel user message into prefix and postfix, and
    around a user/assistant/user conversation into the turn separators."""
    rendered = _render(tokenizer, system, _SENTINEL)
    before, sep, after = rendered.partition(_SENTINEL)
    if not sep:
        raise ValueError("the chat template dropped the user message content")
    assistant_open, user_open = _separators(tokenizer, system)
    return PromptLayout(
        prefix_ids=_encode(tokenizer, before + INSTRUCTION),
        postfix_ids=_encode(tokenizer, after),
        repeat_first_ids=_encode(tokenizer, REPEAT_FIRST),
        repeat_next_ids=_encode(tokenizer, REPEAT_NEXT),
        question_sep_ids=_encode(tokenizer, "\n\n"),
        assistant_open_ids=_encode(tokenizer, assistant_open),
        user_open_ids=_encode(tokenizer, user_open),
    )


def _separators(tokenizer: PreTrainedTokenizerBase, system: str | None) -> tuple[str, str]:
    """What the template puts between a user and an assistant message, and back; empty
    when it cannot render a conversation (then only single questions are possible)."""
    try:
        rendered = _render(tokenizer, system, *_TURNS)
        return _between(rendered, _TURNS[0], _TURNS[1]), _between(rendered, _TURNS[1], _TURNS[2])
    except Exception:  # a template that refuses this conversation (raise_exception, ...)
        return "", ""


def _merged(turns: Sequence[Turn]) -> list[Turn]:
    """Consecutive messages of one role as one turn (their texts a paragraph apart)."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1].role == turn.role:
            merged[-1] = Turn(turn.role, merged[-1].text + "\n\n" + turn.text)
        else:
            merged.append(turn)
    return merged


def question_ids(
    layout: PromptLayout,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    instructions: str = "",
    history: Sequence[Turn] = (),
) -> list[int]:
    """ "\\n\\n" + question + postfix, as token ids; with `instructions` and earlier turns,
    the conversation (see the module docstring): the request's instructions open the context's
    user turn, each later turn starts with the template's own separator."""
    turns = _merged([*history, Turn("user", question)])
    if len(turns) > 1 and not (layout.assistant_open_ids and layout.user_open_ids):
        raise InvalidInputError("this model's chat template cannot render earlier turns")
    if turns[0].role != "user":  # the context's user turn holds only the instructions
        turns.insert(0, Turn("user", ""))
    opening = "\n\n".join(text for text in (instructions, turns[0].text) if text)
    ids = list(_encode(tokenizer, "\n\n" + opening))
    for turn in turns[1:]:
        ids += layout.assistant_open_ids if turn.role == "assistant" else layout.user_open_ids
        ids += _encode(tokenizer, turn.text)
    return ids + list(layout.postfix_ids)
