"""OpenAI request reading, on hand-written requests: what the chat template gets, what identifies a
message sent back, which sampling options the trainer keeps."""

import pytest

from retrain.core.episode import ToolCall
from retrain.environment import openai_api as api

TRAINER = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def test_messages_become_what_chat_templates_read():
    request = api.read_chat_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "3?"}]},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]}, TRAINER, "override")
    assert request.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}, "id": "call_1"}]},
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
    ]
    assert request.model == "m" and request.tools is None and request.sampling.n == 1


def test_a_message_sent_back_is_recognised_whatever_ids_and_extra_fields_it_carries():
    ours = api.assistant_message('ok <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', [ToolCall("add", {"a": 1})])
    assert ours["content"] == "ok" and ours["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    echoed = {**ours, "refusal": None, "annotations": [], "tool_calls": [{**ours["tool_calls"][0], "id": "call_other"}]}
    assert api.message_key(api.template_message(echoed)) == api.message_key(api.template_message(ours))
    edited = {**ours, "content": "changed"}
    assert api.message_key(api.template_message(edited)) != api.message_key(api.template_message(ours))


def test_sampling_options_the_trainer_owns_are_overridden_or_refused():
    body = {"messages": [{"role": "user", "content": "a"}], "temperature": 0.7, "top_p": 1.0, "presence_penalty": 0.0, "logit_bias": {"5": 3}, "seed": 1}
    sampling = api.read_sampling(body, TRAINER, "override")
    # top_p equals the trainer's and presence_penalty is neutral: nothing to say about them.
    assert sampling.overridden == {"temperature": {"requested": 0.7, "used": 1.0}, "logit_bias": {"requested": {"5": 3}, "used": None}}
    assert sampling.ignored == ["seed"]
    with pytest.raises(api.RequestError, match="'temperature'=0.7: this endpoint samples with the trainer's settings") as caught:
        api.read_sampling(body, TRAINER, "refuse")
    assert caught.value.param == "temperature" and caught.value.status == 400


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "a"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(api.RequestError) as caught:
        api.read_chat_request(body, TRAINER, "override")
    assert caught.value.param == param and caught.value.body()["error"]["type"] == "invalid_request_error"


def test_text_completions_take_text_or_token_ids():
    assert api.read_completion_request({"prompt": "hi"}, TRAINER, "override").prompt == "hi"
    assert api.read_completion_request({"prompt": [[5, 6, 7]]}, TRAINER, "override").prompt == [5, 6, 7]
    with pytest.raises(api.RequestError, match="'prompt' must be"):
        api.read_completion_request({"prompt": [5, -1]}, TRAINER, "override")
