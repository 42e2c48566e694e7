"""Request and response bodies of knnlm's own routes (score, explain, health), the error
body every route shares, and the text checks the OpenAI routes use too
(``openai_protocol`` holds those routes' models).

Requests are strict: a number must be a JSON number, a string a JSON string, and unknown
fields are refused by name rather than ignored, so a client never believes a setting took
effect when it did not. Texts must be valid Unicode (a lone surrogate such as ``"\\ud800"``
is refused, naming the field). Floats are finite; a log-probability of -inf (probability 0)
is ``null``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from knn_store.results import TokenExplanation
from knn_store.settings import MAX_TOP_K


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


def valid_unicode(value: str) -> str:
    """Refuse a string that UTF-8 cannot encode: JSON's ``\\ud800`` escapes decode to lone
    surrogates, which the tokenizer would fail on deep inside a batch.

    >>> valid_unicode("ab\\ud800cd")
    Traceback (most recent call last):
    pydantic_core._pydantic_core.PydanticCustomError: holds a lone surrogate (U+D800 at ...
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise PydanticCustomError(
            "invalid_text",
            "holds a lone surrogate (U+{code} at character {at}), which is not valid "
            "Unicode: send UTF-8 text",
            {"code": f"{ord(bad):04X}", "at": exc.start},
        ) from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty: give some text")
    return value


UnicodeText = Annotated[str, AfterValidator(valid_unicode)]
Text = Annotated[str, AfterValidator(valid_unicode), AfterValidator(_not_blank)]


# /v1/score's older names of its retrieval settings -> their names now (the same names mean
# sampling on the completion routes)
SCORE_RENAMED = {"temperature": "knn_temperature", "top_k": "knn_top_k"}
RENAMED_ON = "@1796515200"  # RFC 9745's Deprecation date (2026-12-06), for those names


class ScoreRequest(_Request):
    """Score a text as `knnlm eval` would; the optional fields act as its flags."""

    text: Text = Field(description="Text to score (it gets the BOS prefix, as in eval).")
    lmbda: float | None = Field(
        default=None,
        alias="lambda",
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="A fixed lambda at every position, without the retrieval gate "
        "(`--lambda`). Default: the server's policy.",
    )
    knn_temperature: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="The kNN softmax's temperature over -d^2 (`--temperature`).",
    )
    knn_top_k: int | None = Field(
        default=None, ge=1, le=MAX_TOP_K, description="Neighbours per query (`--top-k`)."
    )
    temperature: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="Deprecated: the older name of knn_temperature (on the completion "
        "routes, temperature means sampling's).",
        json_schema_extra={"deprecated": True},
    )
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=MAX_TOP_K,
        description="Deprecated: the older name of knn_top_k (on the completion routes, "
        "top_k means sampling's).",
        json_schema_extra={"deprecated": True},
    )

    @field_validator("temperature", "top_k")
    @classmethod
    def _not_both_names(cls, value: Any, info: ValidationInfo) -> Any:
        new = SCORE_RENAMED[str(info.field_name)]
        if value is not None and info.data.get(new) is not None:  # new names come first
            raise PydanticCustomError(
                "renamed_parameter",
                "the older name of {new}; send {new} alone",
                {"new": new},
            )
        return value

    @property
    def neighbours(self) -> int | None:
        return self.knn_top_k if self.knn_top_k is not None else self.top_k

    @property
    def softmax_temperature(self) -> float | None:
        return self.knn_temperature if self.knn_temperature is not None else self.temperature

    def deprecated_names(self) -> list[str]:
        """The older names this request used."""
        return [old for old in SCORE_RENAMED if getattr(self, old) is not None]


class ScoreResponse(BaseModel):
    """Per predicted token (arrays of length ``tokens_count``), then the totals."""

    tokens: list[str] = Field(description="Each predicted token, as text.")
    base_logprobs: list[float | None] = Field(description="ln p_LM(token).")
    knn_logprobs: list[float | None] = Field(
        description="ln p of the kNN-LM (the interpolation); null where it is 0."
    )
    lambdas: list[float]
    searched: list[bool] = Field(description="False where the retrieval gate skipped it.")
    tokens_count: int
    base_perplexity: float | None
    knn_perplexity: float | None = Field(description="null where it is infinite (see note).")
    note: str | None = None


class ExplainRequest(_Request):
    """Explain a text token by token, as `knnlm explain --json` does."""

    text: Text = Field(description="Text to explain.")
    top: int = Field(default=3, ge=1, le=1000, description="Predictions shown per distribution.")
    neighbours: int = Field(
        default=3, ge=0, le=MAX_TOP_K, description="Nearest neighbours shown per token."
    )


class ExplainResponse(BaseModel):
    """One row per predicted token: `knnlm explain --json`'s lines (the fields are
    ``knn_store.results.TokenExplanation``'s)."""

    tokens: list[TokenExplanation]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    """Ready to answer, with what the batcher has done so far."""

    status: str
    points: int
    requests: int
    batches: int
    lm_forwards: int
    largest_batch: int


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong and what to do, in one line.")
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(default=None, description="The request field at fault.")
    code: str | None = Field(default=None, description="A machine-readable reason.")


class ErrorBody(BaseModel):
    """OpenAI's error body, on every route."""

    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route may answer."""
    return {code: {"model": ErrorBody} for code in codes}
