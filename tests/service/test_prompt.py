"""The question side of the prompt: a chat's instructions and earlier turns, laid out by the
model's own chat template after the cached context (service.engine.prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.engine.prompt import INSTRUCTION, build_layout, question_ids
from service.errors import InvalidInputError
from service.types import Turn

CONTEXT = "The museum opens at nine. Tickets cost twelve euros."


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def full_prompt(tokenizer: Any, system: str | None, question_side: list[int]) -> str:
    """prefix + context + question side, decoded (special tokens kept)."""
    layout = build_layout(tokenizer, system)
    context = tokenizer.encode(CONTEXT, add_special_tokens=False)
    return str(tokenizer.decode([*layout.prefix_ids, *context, *question_side]))


@pytest.mark.parametrize("system", [None, "You are a museum guide."])
def test_a_conversation_is_the_chat_template_of_the_same_turns(
    tokenizer: Any, system: str | None
) -> None:
    """The cached prefix + context + the question side read exactly as the template renders
    the conversation whose first user message holds the context, the request's instructions
    and the first question."""
    layout = build_layout(tokenizer, system)
    history = (Turn("user", "When does it open?"), Turn("assistant", "At nine."))
    ids = question_ids(layout, tokenizer, "And the tickets?", "Answer briefly.", history)

    first = INSTRUCTION + CONTEXT + "\n\nAnswer briefly.\n\nWhen does it open?"
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": "At nine."},
        {"role": "user", "content": "And the tickets?"},
    ]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert full_prompt(tokenizer, system, ids) == expected
    assert ids[-len(layout.postfix_ids) :] == list(layout.postfix_ids)


def test_a_single_question_is_unchanged(tokenizer: Any) -> None:
    layout = build_layout(tokenizer)
    plain = list(tokenizer.encode("\n\nWhy?", add_special_tokens=False)) + list(layout.postfix_ids)

    assert question_ids(layout, tokenizer, "Why?") == plain
    with_instructions = question_ids(layout, tokenizer, "Why?", "Be brief.")
    assert tokenizer.decode(with_instructions).startswith("\n\nBe brief.\n\nWhy?<|im_end|>")


def test_consecutive_messages_of_one_role_are_one_turn(tokenizer: Any) -> None:
    layout = build_layout(tokenizer)
    history = (Turn("user", "Hello."), Turn("user", "A question:"))
    merged = question_ids(layout, tokenizer, "Why?", "", history)

    assert tokenizer.decode(merged).startswith("\n\nHello.\n\nA question:\n\nWhy?<|im_end|>")


def test_a_conversation_opened_by_the_assistant(tokenizer: Any) -> None:
    layout = build_layout(tokenizer)
    ids = question_ids(layout, tokenizer, "Why?", "Be brief.", (Turn("assistant", "Hi!"),))

    text = tokenizer.decode(ids)
    assert text == (
        "\n\nBe brief.<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user\n"
        "Why?<|im_end|>\n<|im_start|>assistant\n"
    )


REFUSING_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ raise_exception('no turns') }}"
    "{% endif %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>"
    "{% endif %}"
)


def test_a_template_that_cannot_render_turns_refuses_them(tokenizer: Any) -> None:
    """Registration and single questions still work; earlier turns are a clear 400."""
    saved = tokenizer.chat_template
    tokenizer.chat_template = REFUSING_TEMPLATE
    try:
        layout = build_layout(tokenizer)
        assert (layout.assistant_open_ids, layout.user_open_ids) == ((), ())
        one = question_ids(layout, tokenizer, "Why?", "Be brief.", (Turn("user", "Hi."),))
        assert tokenizer.decode(one) == "\n\nBe brief.\n\nHi.\n\nWhy?<a>"
        with pytest.raises(InvalidInputError, match="earlier turns"):
            question_ids(layout, tokenizer, "Why?", "", (Turn("assistant", "Hi."),))
    finally:
        tokenizer.chat_template = saved
