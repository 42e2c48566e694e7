"""Request and response bodies of the OpenAI-compatible routes, field for field as OpenAI's
API has them (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``), plus two
extensions.

What a field does here:

- supported: ``model`` (the served model's id, or left out: another id is a 404),
  ``prompt`` (a string, a list of strings, a list of token ids or a list of those: one set
  of ``n`` choices per prompt), ``messages`` (text content, as a string or a list of text
  parts), ``max_tokens`` / ``max_completion_tokens`` (null: up to the server's limit and
  the model's context), ``temperature``, ``top_p``, ``n``, ``stop`` (a string or a list),
  ``seed`` (choice ``index`` samples with ``seed + index``), ``stream``,
  ``stream_options.include_usage``, ``logprobs`` and ``top_logprobs`` (from the
  distribution sampled: the kNN-LM's interpolation, before temperature and top_p),
  ``echo`` (completions), ``user`` (accepted, used and logged nowhere), and ``best_of``
  equal to ``n``;
- extensions: ``knn`` (default true; false samples from the base LM alone), and vLLM's
  sampling parameters with vLLM's meaning and order (``knn_store.generation.Sampling``):
  ``top_k`` (sample among the k likeliest tokens; 0 = all), ``min_p``,
  ``repetition_penalty`` (over the prompt's and the output's tokens), ``min_tokens`` (no
  end-of-text token, and no stop string ending, within the first ``min_tokens``; at most
  the completion's token limit) and ``ignore_eos``;
- accepted only when neutral, refused by name with a 400 (code ``unsupported_parameter``)
  otherwise, since nothing here could honour them: ``presence_penalty`` and
  ``frequency_penalty`` (0), ``logit_bias`` ({}), ``suffix`` (""), ``tools`` and
  ``functions`` ([]), ``tool_choice`` and ``function_call`` ("none", "auto"),
  ``parallel_tool_calls`` (any: no tools), ``response_format`` ({"type": "text"}),
  ``modalities`` (["text"]), ``audio``, ``prediction``, ``reasoning_effort``,
  ``web_search_options`` and ``verbosity`` (null), ``store`` (false), ``metadata`` ({}),
  ``service_tier`` ("auto", "default"); ``prompt_cache_key`` and ``safety_identifier``
  are accepted and used nowhere, as ``user`` is; null is neutral for all of them;
- any other field is refused by name (code ``unknown_parameter``), as OpenAI's API does, so
  that no client believes a setting took effect when it did not.

Numbers are strict JSON (``"0.5"`` is not a number); texts must be valid Unicode.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from knn_store.generation import SEED_MAX, SEED_MIN
from knnlm.service.schemas import UnicodeText

MAX_LOGPROBS = 20  # top tokens reported per position at most
MAX_STOPS = 16  # stop strings per request at most


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


def _neutral(why: str, *allowed: Any) -> AfterValidator:
    """A standard parameter that means nothing here: null and the ``allowed`` values pass,
    anything else is refused naming it (the field's name comes from its location)."""
    shown = " or ".join(repr(a).replace("'", '"') for a in allowed) or "null"

    def check(value: Any) -> Any:
        if value is None or any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise PydanticCustomError(
            "unsupported_parameter",
            "is not supported by this server ({why}); leave it out or send {shown}",
            {"why": why, "shown": shown},
        )

    return AfterValidator(check)


_PENALTY = "it samples the kNN-LM's distribution without penalties"
Penalty = Annotated[float | None, _neutral(_PENALTY, 0.0, 0)]
LogitBias = Annotated[dict[str, float] | None, _neutral("it does not reweigh tokens", {})]
NO_TOOLS = "it has no tools or functions"
Tools = Annotated[list[dict[str, Any]] | None, _neutral(NO_TOOLS, [])]
ToolChoice = Annotated[str | dict[str, Any] | None, _neutral(NO_TOOLS, "none", "auto")]


def _stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(not s for s in stops):
        raise ValueError("a stop string must not be empty")
    return value


Stop = Annotated[UnicodeText | list[UnicodeText] | None, AfterValidator(_stops)]
Prompt = (
    UnicodeText
    | list[UnicodeText]
    | list[Annotated[int, Field(ge=0)]]
    | list[list[Annotated[int, Field(ge=0)]]]
)


class StreamOptions(_Request):
    include_usage: bool | None = Field(
        default=None, description="A last chunk with the usage of the whole request."
    )


class _Sampling(_Request):
    """What completions and chat share."""

    model: str | None = Field(
        default=None, description="The served model's id (GET /v1/models), or left out."
    )
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        allow_inf_nan=False,
        description="Sampling temperature (default 1); 0 = greedy.",
    )
    top_p: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Nucleus sampling (default 1).",
    )
    top_k: int | None = Field(
        default=None, ge=0, description="knnlm extension: the k likeliest tokens; 0 = all."
    )
    min_p: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="vLLM's: only tokens at least this fraction as likely as the likeliest "
        "(after temperature); default 0 = all.",
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="vLLM's: > 1 discourages every token already in the prompt or the "
        "output (ln p times the penalty); default 1 = off.",
    )
    min_tokens: int | None = Field(
        default=None,
        ge=0,
        description="vLLM's: no end-of-text token, and no stop string ending, within the "
        "first this many new tokens; at most the token limit.",
    )
    ignore_eos: bool | None = Field(
        default=None,
        description="vLLM's: go on past an end-of-text token, to the token limit or a stop string.",
    )
    n: int = Field(default=1, ge=1, description="Choices per prompt, sharing one batch.")
    stream: bool | None = Field(default=False, description="Server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="With stream.")
    stop: Stop = Field(
        default=None,
        description="Up to 16 strings; the text ends before the first one generated.",
    )
    seed: int | None = Field(
        default=None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Random seed, in the range `knnlm generate --seed` takes (-2**63 to "
        "2**64 - 1); choice `index` samples with seed + index.",
    )
    user: str | None = Field(default=None, description="Accepted; used and logged nowhere.")
    knn: bool = Field(
        default=True, description="knnlm extension: false samples from the base LM alone."
    )
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: LogitBias = None
    prompt_cache_key: str | None = Field(default=None, description="Accepted; unused.")
    safety_identifier: str | None = Field(default=None, description="Accepted; unused.")
    service_tier: Annotated[str | None, _neutral("it has one tier", "auto", "default")] = None
    metadata: Annotated[dict[str, str] | None, _neutral("it stores no completions", {})] = None
    store: Annotated[bool | None, _neutral("it stores no completions", False)] = None


class CompletionRequest(_Sampling):
    """OpenAI's (legacy) completions request; sampling as `knnlm generate`'s."""

    prompt: Prompt = Field(
        description="Text to continue: a string, a list of strings, or token ids "
        "(a list, or a list of lists); the model's BOS comes first in every case."
    )
    max_tokens: int | None = Field(
        default=16,
        ge=0,
        description="Tokens to add at most; null: up to the server's limit and the "
        "model's context; 0 only with echo (score the prompt).",
    )
    echo: bool | None = Field(default=False, description="The prompt before the completion.")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log-probabilities of each token and of this many likeliest ones.",
    )
    best_of: int | None = Field(default=None, ge=1, description="Only equal to n.")
    suffix: Annotated[str | None, _neutral("it does not insert text", "")] = None


class TextPart(_Request):
    type: Literal["text"]
    text: UnicodeText


_IN_MESSAGES = "messages carry text only here"


class ChatMessage(_Request):
    """One message; fields of a message the API sent back (refusal, tool calls) may come
    along when empty."""

    role: Literal["system", "developer", "user", "assistant"]
    content: UnicodeText | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: Annotated[list[dict[str, Any]] | None, _neutral(NO_TOOLS, [])] = None
    function_call: Annotated[dict[str, Any] | None, _neutral(NO_TOOLS, {})] = None
    audio: Annotated[dict[str, Any] | None, _neutral(_IN_MESSAGES)] = None
    annotations: Annotated[list[dict[str, Any]] | None, _neutral(_IN_MESSAGES, [])] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """OpenAI's chat completions request: the model's chat template turns the messages
    into a prompt, and the kNN-LM writes the reply."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Tokens to add at most; null: up to the server's limit and the "
        "model's context.",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="The older name of max_completion_tokens."
    )
    logprobs: bool | None = Field(default=False, description="Log-probabilities per token.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="With logprobs: this many likeliest tokens per position.",
    )
    tools: Tools = None
    functions: Tools = None
    tool_choice: ToolChoice = None
    function_call: ToolChoice = None
    parallel_tool_calls: bool | None = None
    response_format: Annotated[
        dict[str, Any] | None, _neutral("it writes free text", {"type": "text"})
    ] = None
    modalities: Annotated[list[str] | None, _neutral("it writes text", ["text"])] = None
    audio: Annotated[dict[str, Any] | None, _neutral("it writes text")] = None
    prediction: Annotated[dict[str, Any] | None, _neutral("it has no predicted outputs")] = None
    reasoning_effort: Annotated[str | None, _neutral("it does not reason")] = None
    verbosity: Annotated[str | None, _neutral("it has one verbosity")] = None
    web_search_options: Annotated[dict[str, Any] | None, _neutral("it does not search the web")] = (
        None
    )


# --- responses ------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens as the model sees them, BOS included.")
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token of the choice's text (prompt tokens first with echo)."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(
        description="ln p of each token; null where nothing predicts it (the first prompt "
        "token of a model without BOS) or where the probability is 0."
    )
    top_logprobs: list[dict[str, float] | None] | None = Field(
        description="The likeliest tokens at each position; null for echoed prompt tokens."
    )
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: str | None = Field(
        default=None, description="The stop string that ended the text, if one did."
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason
    stop_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str = Field(description="The LM's name: its hub id, folder or .gguf file name.")
    object: Literal["model"] = "model"
    created: int = Field(description="When this server started (Unix seconds).")
    owned_by: str = "knnlm"
    max_model_len: int = Field(description="The model's context, in tokens.")
    collection: str = Field(description="knnlm: the datastore the kNN-LM retrieves from.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
