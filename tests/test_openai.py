"""``knnlm serve``'s OpenAI-compatible routes, read by the real ``openai`` client over a real
uvicorn server on loopback, with the tiny GPT-2 given a chat template.

The numbers are checked against references: greedy text against `knnlm generate`, token
log-probabilities against `/v1/score` on the prompt plus the completion, echoed prompt
log-probabilities against `/v1/score` on the prompt, seeded choices against single
requests with the seed each choice uses, streams against the same request unstreamed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.serving import UvicornThread, clean_environment, tiny_collection

SECRET = "openai-key-61c0b2"
MODEL = "tiny-chat"
PROMPT = "def add(a, b):\n   "
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "def mul(a, b):"},
]


@dataclass
class Server:
    base: str
    app: Any
    session: Any
    generated: str  # `knnlm generate`'s greedy 8 tokens after PROMPT


def _cli(args: list[str], cache: Path) -> dict[str, Any]:
    from click.testing import CliRunner

    from knnlm.cli import cli

    result = CliRunner().invoke(cli, args, env={"KNNLM_MODEL_CACHE": str(cache)})
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def server(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    from transformers import AutoTokenizer

    from knn_store import open_session
    from knnlm.service.app import Limits, create_app

    root = tmp_path_factory.mktemp("openai")
    model = root / MODEL
    shutil.copytree(tiny_models["gpt2"], model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(model)
    with clean_environment():
        # one window holds the whole context: scores see what generation saw
        made = tiny_collection(
            root, model, collection="chat", backend="local", window=128, stride=64
        )
        settings, cache, store = made.settings, made.cache, made.store_flags
        greedy = ["--max-new-tokens", "8", "--sample-temperature", "0", "--top-k", "8"]
        generated = _cli(
            ["generate", "-p", PROMPT, "--model", str(model), *store, *greedy, "--json"], cache
        )["completion"]
        session = open_session(settings)
        limits = Limits(max_completion_tokens=48, max_text_tokens=120)
        app = create_app(session, api_key=SECRET, limits=limits, max_batch=16, batch_wait_ms=20)
        try:
            with UvicornThread(app) as served:
                yield Server(served.url, app, session, generated)
        finally:
            session.close()


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=SECRET, max_retries=0)


@pytest.fixture(scope="module")
def raw(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {SECRET}"}
    with httpx.Client(base_url=server.base, headers=headers, timeout=60) as http:
        yield http


def _score(raw: httpx.Client, text: str, **flags: Any) -> dict[str, Any]:
    response = raw.post("/v1/score", json={"text": text, **flags})
    assert response.status_code == 200, response.text
    return response.json()


# --- models ---------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: Any) -> None:
    (card,) = client.models.list().data
    assert card.id == MODEL and card.object == "model" and card.owned_by == "knnlm"
    assert card.model_extra["collection"] == "chat"
    assert card.model_extra["max_model_len"] == 128
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as refused:
        client.models.retrieve("gpt-4o")
    assert refused.value.code == "model_not_found"
    assert MODEL in refused.value.message


# --- completions ----------------------------------------------------------------------------


def test_greedy_completion_equals_generate_and_its_logprobs_equal_score(
    client: Any, raw: httpx.Client, server: Server
) -> None:
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    )
    (choice,) = got.choices
    assert choice.text == server.generated
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [
        len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))
    ]
    # the kNN-LM's numbers for the same tokens, scored as a text
    ids = server.session.lm.encode(PROMPT + choice.text)
    assert len(ids) == got.usage.prompt_tokens + got.usage.completion_tokens  # same tokens
    scored = _score(raw, PROMPT + choice.text)["knn_logprobs"]
    tail = scored[-len(logprobs.token_logprobs) :]
    assert logprobs.token_logprobs == pytest.approx(tail, rel=1e-5, abs=1e-5)
    for chosen, lp, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(top) <= 2
        assert max(top.values()) == pytest.approx(lp, abs=1e-6)  # greedy takes the likeliest
        assert top[chosen] == pytest.approx(lp, abs=1e-6)


def test_knn_false_samples_the_base_lm(client: Any, server: Server) -> None:
    """Greedy with ``knn: false`` is the plain LM's greedy, token by token, with its ln p."""
    import torch

    lm = server.session.lm
    ids = lm.encode(PROMPT).tolist()
    expected: list[float] = []
    with torch.inference_mode():
        for _ in range(6):  # the transformers model alone, no cache, no retrieval
            logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0, -1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            ids.append(int(log_probs.argmax()))
            expected.append(float(log_probs[ids[-1]]))
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
        extra_body={"knn": False},
    )  # fmt: skip
    (choice,) = got.choices
    new = ids[len(lm.encode(PROMPT)) :]
    assert choice.text == lm.tokenizer.decode(new, skip_special_tokens=True)
    assert choice.logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)
    with_knn = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0
    )
    assert with_knn.choices[0].logprobs.token_logprobs != pytest.approx(expected, abs=1e-5)


def test_n_choices_use_seed_plus_index(client: Any) -> None:
    body = {"model": MODEL, "prompt": ["for i in", "x ="], "max_tokens": 6, "temperature": 1.3}
    both = client.completions.create(**body, n=2, seed=11, logprobs=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for choice in both.choices:
        prompt = body["prompt"][choice.index // 2]
        alone = client.completions.create(**{**body, "prompt": prompt}, seed=11 + choice.index)
        assert alone.choices[0].text == choice.text
    assert both.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in both.choices)
    assert both.usage.prompt_tokens == sum(
        alone.usage.prompt_tokens
        for alone in (
            client.completions.create(**{**body, "prompt": p, "max_tokens": 1})
            for p in body["prompt"]
        )
    )


def test_vllm_sampling_parameters_equal_decode(client: Any, server: Server) -> None:
    """min_p, repetition_penalty and min_tokens over HTTP sample what ``decode`` samples
    with the same ``Sampling`` (the library's own tests check it against references)."""
    from knn_store.generation import Sampling, decode

    extra = {"min_p": 0.05, "repetition_penalty": 1.4, "min_tokens": 3}
    for seed in (1, 2):
        got = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.2, seed=seed,
            extra_body=extra,
        )  # fmt: skip
        sampling = Sampling(temperature=1.2, seed=seed, max_new_tokens=8, **extra)
        ids = server.session.lm.encode(PROMPT)
        (new,) = decode(server.session.knn_lm, [ids], [sampling])
        assert got.choices[0].text == server.session.lm.tokenizer.decode(
            new, skip_special_tokens=True
        )
        assert got.usage.completion_tokens == len(new) >= 3
    # chat too: greedy repeats a token within 12, a strong penalty never does (byte tokens
    # of a cut character all show as U+FFFD: they are told apart by nothing here)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}

    def shown(extra: dict[str, Any]) -> list[str]:
        got = client.chat.completions.create(**body, logprobs=True, extra_body=extra)
        return [t.token for t in got.choices[0].logprobs.content if t.token != "\ufffd"]

    plain = shown({})
    assert len(set(plain)) < len(plain)
    penalized = shown({"repetition_penalty": 50.0})
    assert len(set(penalized)) == len(penalized) > 0


def test_ignore_eos_and_min_tokens_over_http(
    client: Any, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the greedy first token made an end-of-text token: a plain request stops at it,
    ignore_eos goes on to the limit (finish "length"), min_tokens draws around it."""
    from knn_store.generation import Sampling, decode

    lm = server.session.lm
    greedy = Sampling(temperature=0, max_new_tokens=1)
    end = decode(server.session.knn_lm, [lm.encode(PROMPT)], [greedy])[0][0]
    first = lm.tokenizer.decode([end])
    monkeypatch.setitem(lm.__dict__, "stop_ids", (end,))
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0}
    stopped = client.completions.create(**body).choices[0]
    assert stopped.finish_reason == "stop" and stopped.logprobs.tokens == [first]
    passed = client.completions.create(**body, extra_body={"ignore_eos": True}).choices[0]
    assert passed.finish_reason == "length" and len(passed.logprobs.tokens) == 5
    assert passed.logprobs.tokens[0] == first
    held = client.completions.create(**body, extra_body={"min_tokens": 5}).choices[0]
    assert len(held.logprobs.tokens) == 5 and first not in held.logprobs.tokens


def _stop_in(text: str) -> str:
    """A stop string from the middle of ``text`` (two characters, likely across tokens)."""
    middle = len(text) // 2
    return text[middle : middle + 2]


def test_stop_ends_the_text_before_it(client: Any, server: Server) -> None:
    stop = _stop_in(server.generated)
    cut = server.generated[: server.generated.index(stop)]
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop, "@@never"]
    )
    (choice,) = got.choices
    assert choice.text == cut
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    assert got.usage.completion_tokens < 8 or server.generated.endswith(stop)


def test_streamed_completions_with_stop_logprobs_and_n(client: Any) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 5}
    plain = client.completions.create(**body, n=2, logprobs=2)
    stop = _stop_in(plain.choices[0].text)
    expected = client.completions.create(**body, n=2, logprobs=2, stop=stop)
    texts: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, list[str]] = {0: [], 1: []}
    token_logprobs: dict[int, list[float]] = {0: [], 1: []}
    finish: dict[int, str] = {}
    usage = None
    stream = client.completions.create(
        **body, n=2, logprobs=2, stop=stop, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.logprobs is not None:
            tokens[choice.index] += choice.logprobs.tokens
            token_logprobs[choice.index] += choice.logprobs.token_logprobs
        if choice.finish_reason is not None:
            finish[choice.index] = choice.finish_reason
    for want in expected.choices:
        assert texts[want.index] == want.text
        assert finish[want.index] == want.finish_reason
        assert tokens[want.index] == want.logprobs.tokens
        assert token_logprobs[want.index] == pytest.approx(want.logprobs.token_logprobs)
        unstopped = plain.choices[want.index].text
        assert want.text == unstopped.split(stop)[0]
    assert expected.choices[0].finish_reason == "stop"
    assert usage is not None and usage.completion_tokens == expected.usage.completion_tokens


def test_echo_logprobs_equal_score(client: Any, raw: httpx.Client) -> None:
    got = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    (choice,) = got.choices
    assert choice.text.startswith(PROMPT)
    prompt_tokens = got.usage.prompt_tokens - 1  # BOS is not echoed
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens[:prompt_tokens]) == PROMPT
    scored = _score(raw, PROMPT)["knn_logprobs"]
    assert logprobs.token_logprobs[:prompt_tokens] == pytest.approx(scored, rel=1e-5, abs=1e-6)
    assert logprobs.top_logprobs[:prompt_tokens] == [None] * prompt_tokens
    # max_tokens 0 with echo scores the prompt only
    only = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0
    )
    assert only.choices[0].text == PROMPT
    assert only.choices[0].logprobs.token_logprobs == logprobs.token_logprobs[:prompt_tokens]


def test_token_id_prompts_and_max_tokens_null(client: Any, server: Server) -> None:
    ids = server.session.lm.encode(PROMPT).tolist()[1:]  # without BOS, as a client sends
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == server.generated
    unlimited = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=None, temperature=0
    )
    assert unlimited.choices[0].text.startswith(server.generated.split("<")[0][:4])
    assert unlimited.usage.completion_tokens <= 48  # the server's limit


# --- chat -----------------------------------------------------------------------------------


def test_chat_applies_the_template_and_equals_a_completion(
    client: Any, raw: httpx.Client, server: Server
) -> None:
    lm = server.session.lm
    rendered = lm.tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    reference = client.completions.create(
        model=MODEL, prompt=rendered, max_tokens=6, temperature=0
    ).choices[0]
    got = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3, user="someone",
    )  # fmt: skip
    (choice,) = got.choices
    assert got.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.message.content == reference.text
    assert choice.finish_reason == reference.finish_reason
    assert got.usage.prompt_tokens == len(lm.encode(rendered))
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == choice.message.content
    scored = _score(raw, rendered + choice.message.content)["knn_logprobs"]
    assert [e.logprob for e in entries] == pytest.approx(scored[-len(entries) :], abs=1e-5)
    assert all(len(e.top_logprobs) <= 3 for e in entries)


def test_chat_streams_role_first_then_content(client: Any) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 10, "temperature": 0}
    plain = client.chat.completions.create(**body)
    chunks = list(
        client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


# --- refusals -------------------------------------------------------------------------------

REFUSED: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty",
     "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias",
     "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}, "best_of",
     "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ("/v1/completions", {"prompt": "ab\ud800cd"}, "prompt", "invalid_text"),
    ("/v1/completions", {"prompt": ["ok", "ab\udfffcd"]}, "prompt.1", "invalid_text"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", "\ud800"]}, "stop.1", "invalid_text"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options", None),
    ("/v1/completions", {"prompt": "x", "n": 9, "best_of": 9, "max_tokens": 1,
                         "seed": 1, "top_k": 0, "presence_penalty": 0}, None, None),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 9}, "n", None),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p", None),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens", None),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos", None),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "min_tokens": 3},
     "min_tokens", None),
    ("/v1/completions", {"prompt": "x", "min_p": 0, "repetition_penalty": 1,
                         "min_tokens": 0, "ignore_eos": False}, None, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]},
     "messages.0.content", "invalid_text"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]},
     "tools", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}},
     "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]},
     "messages.0.role", None),
    ("/v1/chat/completions", {"messages": []}, "messages", None),
    ("/v1/score", {"text": "ab\ud800cd"}, "text", "invalid_text"),
    ("/v1/explain", {"text": "\udc00"}, "text", "invalid_text"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param", "code"), REFUSED)
def test_refusals_name_the_field_in_openai_shape(
    raw: httpx.Client, path: str, body: dict[str, Any], param: str | None, code: str | None
) -> None:
    # json.dumps keeps a lone surrogate as the \ud800 escape a client would send
    content = json.dumps({"model": MODEL, **body} if path != "/v1/score" and
                         path != "/v1/explain" else body)  # fmt: skip
    response = raw.post(path, content=content, headers={"content-type": "application/json"})
    if param is None and code is None:  # neutral values of unsupported parameters pass
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert error["message"].startswith(f"{param}:") or param in error["message"]
    assert "\n" not in error["message"] and "Extra inputs" not in error["message"]


def test_a_client_sees_openai_errors(server: Server) -> None:
    wrong = openai.OpenAI(base_url=f"{server.base}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=f"{server.base}/v1", api_key=SECRET, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        right.completions.create(model=MODEL, prompt="x", frequency_penalty=1.0)
    assert bad.value.param == "frequency_penalty"
    with pytest.raises(openai.NotFoundError):
        right.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")


def test_a_form_encoded_json_body_is_read_as_json(raw: httpx.Client) -> None:
    """D1: `curl -d '{...}'` declares application/x-www-form-urlencoded."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = json.dumps({"text": PROMPT})
    scored = raw.post("/v1/score", content=body, headers=form)
    assert scored.status_code == 200, scored.text
    assert scored.json() == _score(raw, PROMPT)
    not_json = raw.post("/v1/score", content="text=abc", headers=form)
    assert not_json.status_code == 400
    assert "Content-Type: application/json" in not_json.json()["error"]["message"]


def test_the_schema_documents_400_not_422(raw: httpx.Client) -> None:
    paths = raw.get("/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(paths)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/score"):
        responses = paths[path]["post"]["responses"]
        assert "400" in responses and "422" not in responses
