"""`agentserve serve` against the official openai client and raw HTTP: generation, prefix hits,
streaming, and clear 4xx errors for bad requests while the server stays up."""

import httpx
import openai
import pytest

from tests.conftest import TEST_MAX_MODEL_LEN

pytestmark = pytest.mark.slow

AGENT_PROMPT = [
    {"role": "system", "content": "You are a software agent. Answer with one bash command."},
    {"role": "user", "content": "Find the failing test in the repository and fix it. " * 12},
]


def test_models_lists_the_served_model(openai_client):
    assert [m.id for m in openai_client.models.list().data] == ["tiny"]


def test_chat_generates_and_repeated_prompt_reports_cached_tokens(openai_client):
    first = openai_client.chat.completions.create(model="tiny", messages=AGENT_PROMPT, max_tokens=8)
    assert first.choices[0].message.content
    assert first.usage.completion_tokens == 8
    second = openai_client.chat.completions.create(model="tiny", messages=AGENT_PROMPT, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    assert cached == (second.usage.prompt_tokens - 1) // 32 * 32


def test_chat_streaming_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="tiny", messages=AGENT_PROMPT, max_tokens=10, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    text, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text)
    assert usage.completion_tokens == 10
    # the same prompt was served just before (test above): the stream's usage reports that hit too
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 32 * 32


def test_completions_route(openai_client):
    out = openai_client.completions.create(model="tiny", prompt="import os\nimport sys\n", max_tokens=5,
                                           extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5


def test_health_and_metrics(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "vllm:prefix_cache_queries" in metrics
    assert "vllm:num_requests_running" in metrics


def test_metrics_are_documented(server):
    """docs/metrics.md lists every metric family the server exports, and the Grafana dashboard
    queries only metrics it exports."""
    import re

    from tests.test_dashboard import documented, queried

    text = httpx.get(server.base_url + "/metrics").text
    families = {n for n in re.findall(r"^# HELP (\S+) ", text, re.M) if not n.endswith("_created")}
    assert any(n.startswith("agentserve_") for n in families) and any(n.startswith("vllm:") for n in families)
    assert not families - documented(), f"exported but not in docs/metrics.md: {sorted(families - documented())}"
    assert not queried() - families, f"on the dashboard but not exported: {sorted(queried() - families)}"


def test_unknown_model_is_404_naming_the_model(openai_client):
    with pytest.raises(openai.NotFoundError, match="nope"):
        openai_client.chat.completions.create(model="nope", messages=AGENT_PROMPT, max_tokens=4)


def test_over_long_prompt_is_400_with_context_length_message(openai_client):
    long_prompt = [{"role": "user", "content": "word " * (TEST_MAX_MODEL_LEN * 2)}]
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="tiny", messages=long_prompt, max_tokens=4)
    assert "context length" in str(e.value).lower() or "maximum" in str(e.value).lower()


@pytest.mark.parametrize("body, field", [
    (b"{not json", "json"),
    (b'{"model": "tiny"}', "messages"),
    (b'{"model": "tiny", "messages": "hello"}', "messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}', "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
])
def test_malformed_bodies_get_400_naming_the_problem_and_server_stays_up(server, body, field):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert field in r.text.lower()
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_openapi_spec_documents_the_wire_contract(server):
    spec = httpx.get(server.base_url + "/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    assert schemas["ProgramFields"]["required"] == ["program_id"]
    assert set(schemas["ProgramFields"]["properties"]) == {"program_id", "turn", "is_last_turn", "ends_program",
                                                           "tool", "parent_program_id", "share", "tools_done",
                                                           "priority", "ttl_s", "expected_tool_s", "output_tokens"}
    assert schemas["SharedPrompt"]["required"] == ["template", "parts"]  # KV sharing (--kvshare)
    assert set(schemas["PromptPart"]["properties"]) == {"text", "token_ids", "shared"}
    assert schemas["ChatCompletionRequest"]["properties"]["agentserve"]["$ref"].endswith("/ProgramFields")
    tool_route = spec["paths"]["/v1/programs/{program_id}/tool"]["post"]
    assert tool_route["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ToolEvent")
    assert "/v1/programs/{program_id}/end" in spec["paths"]
