"""TextStream: incremental text deltas, held-back characters, stop sequences (no model)."""

from __future__ import annotations

import pytest

from service.serving.textstream import TextStream

PIECES = ["Hel", "lo", " wor", "ld", ".\n\n", "Bye"]


def decode(tokens: list[int]) -> str:
    """Token i is PIECES[i]: a stand-in for a tokenizer."""
    return "".join(PIECES[t] for t in tokens)


def run(stream: TextStream, count: int) -> list[str]:
    deltas = [stream.push(list(range(n + 1))) for n in range(count)]
    return [*deltas, stream.flush()]


def test_without_stops_every_piece_is_handed_out_at_once() -> None:
    stream = TextStream(decode, ())

    assert run(stream, len(PIECES)) == [*PIECES, ""]
    assert stream.text == "".join(PIECES) and not stream.stopped


def test_a_stop_sequence_ends_the_text_before_it() -> None:
    stream = TextStream(decode, ["\n\n"])
    deltas = [stream.push(list(range(n + 1))) for n in range(5)]

    assert stream.stopped
    assert stream.text == "Hello world."
    assert "".join(deltas) == "Hello world."


def test_a_possible_stop_prefix_is_held_back_until_it_is_not() -> None:
    stream = TextStream(decode, ["world!"])

    assert stream.push([0]) == "Hel"
    assert stream.push([0, 1]) == "lo"
    assert stream.push([0, 1, 2]) == " "  # "wor" may begin "world!"
    assert stream.push([0, 1, 2, 3]) == ""  # "world" still may
    assert stream.push([0, 1, 2, 3, 4]) == "world.\n\n"  # it did not
    assert not stream.stopped


def test_a_stop_across_tokens_is_found() -> None:
    stream = TextStream(decode, ["o wo"])

    assert "".join(stream.push(list(range(n + 1))) for n in range(3)) == "Hell"
    assert stream.stopped and stream.text == "Hell"


def test_an_incomplete_character_waits_for_its_bytes() -> None:
    texts = {1: "caf\ufffd", 2: "café", 3: "café!"}
    stream = TextStream(lambda tokens: texts[len(tokens)], ())

    assert stream.push([0]) == "caf"
    assert stream.push([0, 0]) == "é"
    assert stream.push([0, 0, 0]) == "!"


@pytest.mark.parametrize("stops", [[""], []])
def test_empty_stops_are_ignored(stops: list[str]) -> None:
    assert "".join(run(TextStream(decode, stops), 3)) == "Hello wor"
