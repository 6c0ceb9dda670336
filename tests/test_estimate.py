"""Local token estimates: which models can be estimated, how prompts are counted, and offline.

The ``byte_encoding`` fixture registers a real ``tiktoken.Encoding`` that makes one token per
UTF-8 byte, so every expected number below is a plain byte count. ``offline_tiktoken`` makes
tiktoken's downloads fail the way they do without network, through a local proxy that counts
every attempt.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from helpers import lock_is_free_in_forked_child
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from langchain_tokenledger import estimate


def test_models_tiktoken_knows_can_be_estimated_without_loading_anything() -> None:
    estimate.clear_encodings()

    assert estimate.can_estimate("gpt-4o-mini") is True
    assert estimate.can_estimate("o3-mini") is True
    assert estimate.can_estimate("ft:gpt-4o-mini-2024-07-18:acme::abc123") is True
    assert estimate.can_estimate("claude-3-5-sonnet") is False
    assert estimate.can_estimate("llama3.1:8b") is False
    assert estimate.can_estimate(None) is False
    assert estimate.can_estimate("") is False


def test_a_plain_text_counts_its_tokens(byte_encoding: Any) -> None:
    assert estimate.estimate_tokens("gpt-4o-mini", "hello") == 5
    assert estimate.estimate_tokens("gpt-4o-mini", "wörld") == 6
    assert estimate.estimate_tokens("gpt-4o-mini", "") == 0


def test_special_token_text_is_counted_as_text_not_rejected(byte_encoding: Any) -> None:
    assert estimate.estimate_tokens("gpt-4o-mini", "<|endoftext|>") == 13


def test_chat_messages_follow_openais_per_message_rule(byte_encoding: Any) -> None:
    messages = [SystemMessage("be brief"), HumanMessage("hi there", name="ann")]

    # priming 3; system: 3 + "system" 6 + "be brief" 8; user: 3 + "user" 4 + "hi there" 8
    # + name 1 + "ann" 3
    assert estimate.estimate_message_tokens("gpt-4o-mini", messages) == 3 + 17 + 15 + 4


def test_tool_calls_of_an_ai_message_are_counted(byte_encoding: Any) -> None:
    call = {"name": "add", "args": {"a": 1}, "id": "c1", "type": "tool_call"}
    message = AIMessage("", tool_calls=[call])

    # priming 3; assistant: 3 + "assistant" 9 + "" 0 + '[{"name":"add","arguments":{"a":1}}]' 36
    assert estimate.estimate_message_tokens("gpt-4o-mini", [message]) == 3 + 12 + 36


def test_content_blocks_count_their_text(byte_encoding: Any) -> None:
    message = HumanMessage(content=[{"type": "text", "text": "ab"}, "cd"])

    assert estimate.estimate_message_tokens("gpt-4o-mini", [message]) == 3 + 3 + 4 + 4


def test_output_adds_up_every_choice(byte_encoding: Any) -> None:
    assert estimate.estimate_output_tokens("gpt-4o-mini", ["echo: hi", "echo: hi"]) == 16
    assert estimate.estimate_output_tokens("gpt-4o-mini", []) == 0


def test_registered_encodings_apply_by_longest_prefix(byte_encoding: Any) -> None:
    class Halves:
        """Two characters per token."""

        def encode(self, text: str, disallowed_special: Any = ()) -> list[int]:
            return list(range((len(text) + 1) // 2))

    estimate.register_encoding("my-llama", Halves())

    assert estimate.estimate_tokens("my-llama-3", "abcdef") == 3
    assert estimate.estimate_tokens("my-other-model", "abcdef") == 6
    assert estimate.can_estimate("my-llama-3") is True


def test_registering_rejects_what_cannot_encode() -> None:
    with pytest.raises(TypeError, match="encode"):
        estimate.register_encoding("gpt-4o", object())
    with pytest.raises(TypeError, match="model_prefix"):
        estimate.register_encoding(None, object())  # type: ignore[arg-type]


def test_clear_encodings_forgets_registrations(byte_encoding: Any) -> None:
    estimate.clear_encodings()

    assert estimate.can_estimate("my-llama-3") is False


def test_unknown_models_are_not_estimated(byte_encoding: Any) -> None:
    estimate.clear_encodings()

    assert estimate.estimate_tokens("claude-3-5-sonnet", "hello") is None
    assert estimate.estimate_message_tokens("claude-3-5-sonnet", [HumanMessage("hi")]) is None
    assert estimate.estimate_output_tokens("claude-3-5-sonnet", ["hi"]) is None


def test_offline_no_estimate_is_made_and_the_failure_is_remembered(
    offline_tiktoken: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="langchain_tokenledger")

    assert estimate.estimate_tokens("gpt-4o-mini", "hello") is None
    attempts = offline_tiktoken.connections

    # gpt-4o and o3-mini share gpt-4o-mini's encoding (o200k_base): no second download attempt.
    assert estimate.estimate_tokens("gpt-4o", "hello") is None
    assert estimate.estimate_output_tokens("o3-mini", ["hello"]) is None
    assert estimate.can_estimate("gpt-4o-mini") is False

    assert attempts == 1
    assert offline_tiktoken.connections == 1
    warnings = [r for r in caplog.records if "o200k_base" in r.getMessage()]
    assert len(warnings) == 1
    assert "register_encoding" in warnings[0].getMessage()


def test_offline_another_encoding_is_tried_once_on_its_own(offline_tiktoken: Any) -> None:
    assert estimate.estimate_tokens("gpt-4o-mini", "hello") is None  # o200k_base
    assert estimate.estimate_tokens("gpt-4-0613", "hello") is None  # cl100k_base
    assert estimate.estimate_tokens("gpt-3.5-turbo", "hello") is None  # cl100k_base again

    assert offline_tiktoken.connections == 2


def test_a_registered_encoding_works_offline(offline_tiktoken: Any, byte_encoding: Any) -> None:
    assert estimate.estimate_tokens("gpt-4o-mini", "hello") == 5
    assert offline_tiktoken.connections == 0


@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # pytest's threads
def test_a_forked_child_gets_a_free_lock_even_if_the_parent_held_it() -> None:
    """A thread of the parent holding the lock at the fork would deadlock the child's estimates."""
    with estimate._lock:
        assert lock_is_free_in_forked_child(lambda: estimate._lock)
