"""OpenAI's completions, chat completions and models over the ``Batcher``: requests become
decoding rows, and the rows' tokens become OpenAI's responses or server-sent events.

- Each prompt gets ``n`` rows, submitted together so that they share the batch (and with
  ``seed``, row ``index`` samples with ``seed + index``: choice 1 of a request with seed 7
  is choice 0 of the same request with seed 8).
- Stop strings are matched in the decoded text on the model's worker thread, so a row ends
  at the token that completes one; the text ends before it, ``finish_reason`` is "stop" and
  ``stop_reason`` names it. An end-of-text token also gives "stop" (``stop_reason`` null);
  running out of ``max_tokens`` gives "length".
- Log-probabilities are those of the distribution sampled from (the kNN-LM's interpolation,
  or the LM's with ``knn: false``), before the sampling parameters (temperature, top_p,
  repetition_penalty, ...) reshape it: the numbers
  ``/v1/score`` gives for the same text. Echoed prompt tokens take theirs from the same
  scoring as ``/v1/score``; their ``top_logprobs`` are null (scoring keeps only the token
  that came).
- A stream ends its rows when its client goes away.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from knnlm.service.batcher import Batcher, KnnOptions
from knnlm.service.detokenize import ChoiceText, TokenEntry, finite, token_offsets
from knnlm.service.errors import ApiError, one_line
from knnlm.service.openai_choices import (
    OnStep,
    Prompt,
    Row,
    Scores,
    abandon,
    chat_logprobs,
    completion_logprobs,
    shifted,
    usage_of,
)
from knnlm.service.openai_protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    _Sampling,
)
from knnlm.service.openai_stream import ChatEvents, CompletionEvents, Events, sse
from knnlm.service.waiting import result_or_cancel

if TYPE_CHECKING:
    from knn_store.generation import Sampling
    from knn_store.lm import LanguageModel


class OpenAIServing:
    """Turns OpenAI requests into batcher calls, and the batcher's tokens into answers.

    Args:
        batcher: the model's worker.
        lm: the served LM (its tokenizer decodes; its name is the model id).
        collection: the datastore's name, shown on the model card.
        max_completion_tokens: the most tokens one choice may ask for.
        max_text_tokens: the most tokens of one prompt.
        max_choices: prompts times n at most per request.
    """

    def __init__(
        self,
        batcher: Batcher,
        lm: LanguageModel,
        *,
        collection: str,
        max_completion_tokens: int,
        max_text_tokens: int,
        max_choices: int = 16,
    ) -> None:
        self.batcher = batcher
        self.lm = lm
        self.model_id = lm.name
        self.collection = collection
        self.max_completion_tokens = max_completion_tokens
        self.max_text_tokens = max_text_tokens
        self.max_choices = max_choices
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # --- models ----------------------------------------------------------------------------

    def card(self) -> ModelCard:
        return ModelCard(
            id=self.model_id,
            created=self.created,
            max_model_len=self.lm.max_positions,
            collection=self.collection,
        )

    def models(self) -> ModelList:
        return ModelList(data=[self.card()])

    def model(self, model_id: str) -> ModelCard:
        self._check_model(model_id, param=None)
        return self.card()

    def _check_model(self, model_id: str | None, *, param: str | None = "model") -> None:
        if model_id is not None and model_id != self.model_id:
            raise ApiError(
                404,
                f"the model {model_id!r} does not exist: this server serves "
                f"{self.model_id!r} (GET /v1/models); name it or leave 'model' out",
                param=param,
                code="model_not_found",
            )

    # --- completions -----------------------------------------------------------------------

    async def completions(
        self, body: CompletionRequest, request: Request
    ) -> CompletionResponse | StreamingResponse:
        """OpenAI's completions: ``n`` choices per prompt, as `knnlm generate` would write
        them with the same seed."""
        self._check_common(body)
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(
                400,
                f"best_of: only equal to n ({body.n}) here: this server returns every "
                "choice it samples",
                param="best_of",
                code="unsupported_parameter",
            )
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(
                400,
                "max_tokens: 0 only with echo (to score the prompt); ask for at least 1 token",
                param="max_tokens",
            )
        prompts = await self._completion_prompts(body)
        rows = self._submit(prompts, body, top=body.logprobs or 0)
        echo = bool(body.echo)
        want = body.logprobs is not None
        scores = None
        if echo and want:
            try:
                scores = await self._prompt_scores(prompts, body, request)
            except BaseException:
                abandon(rows, self.batcher)
                raise
        head = self._head("cmpl")
        if body.stream:
            format_ = CompletionEvents(self, head, rows, echo=echo, want=want, scores=scores)
            return self._stream(rows, format_, body)
        await self._finish(rows, request)
        choices = [
            CompletionChoice(
                index=row.index,
                text=(row.prompt.text if echo else "") + row.text.text,
                logprobs=completion_logprobs(self.entries(row, echo, scores)) if want else None,
                finish_reason=self.finish_reason(row),
                stop_reason=row.text.stop_reason,
            )
            for row in rows
        ]
        return CompletionResponse(**head, choices=choices, usage=usage_of(rows))

    async def _completion_prompts(self, body: CompletionRequest) -> list[Prompt]:
        prompt = body.prompt
        if isinstance(prompt, str):
            given: list[str | list[int]] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            given = [list(prompt)]  # type: ignore[arg-type]
        else:
            given = list(prompt)  # type: ignore[arg-type]
        if not given:
            raise ApiError(400, "prompt: give at least one prompt", param="prompt")
        self._check_choices(len(given), body.n)
        out = []
        for i, one in enumerate(given):
            field = "prompt" if len(given) == 1 else f"prompt.{i}"
            if isinstance(one, str):
                ids = await self._encode(one, field)
                text = one
            else:
                ids, text = await self._token_prompt(one, field)
            asked = body.max_tokens
            if "max_tokens" not in body.model_fields_set and asked is not None:
                asked = min(asked, self.max_completion_tokens)  # OpenAI's default of 16, capped
            out.append(Prompt(ids, text, self._max_new(ids, asked, "max_tokens")))
        return out

    async def _token_prompt(self, ids: list[int], field: str) -> tuple[np.ndarray, str]:
        vocab = self.lm.vocab_size
        if not ids:
            raise ApiError(400, f"{field}: give at least one token id", param=field)
        if max(ids) >= vocab:
            raise ApiError(
                400,
                f"{field}: token id {max(ids)} is past the vocabulary ({vocab} tokens)",
                param=field,
            )
        full = np.asarray(self.lm.prefix_ids + ids, dtype=np.int64)
        self._check_length(full, field)
        text = await run_in_threadpool(self._decode, ids)
        return full, text

    # --- chat ------------------------------------------------------------------------------

    async def chat(
        self, body: ChatCompletionRequest, request: Request
    ) -> ChatCompletionResponse | StreamingResponse:
        """OpenAI's chat completions: the model's chat template makes the prompt, and the
        kNN-LM writes the assistant's reply."""
        self._check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(
                400,
                "top_logprobs: only with logprobs: true",
                param="top_logprobs",
            )
        limit = body.max_completion_tokens
        if body.max_tokens is not None:
            if limit is not None and limit != body.max_tokens:
                raise ApiError(
                    400,
                    "max_tokens and max_completion_tokens differ: send one of them",
                    param="max_tokens",
                )
            limit = body.max_tokens
        self._check_choices(1, body.n)
        ids = await self._chat_prompt(body)
        field = "max_completion_tokens" if body.max_tokens is None else "max_tokens"
        prompts = [Prompt(ids, "", self._max_new(ids, limit, field))]
        want = bool(body.logprobs)
        rows = self._submit(prompts, body, top=(body.top_logprobs or 0) if want else 0)
        head = self._head("chatcmpl")
        if body.stream:
            return self._stream(rows, ChatEvents(self, head, rows, want=want), body)
        await self._finish(rows, request)
        choices = [
            ChatChoice(
                index=row.index,
                message=ChatResponseMessage(content=row.text.text),
                logprobs=chat_logprobs(row.text.kept_entries()) if want else None,
                finish_reason=self.finish_reason(row),
                stop_reason=row.text.stop_reason,
            )
            for row in rows
        ]
        return ChatCompletionResponse(**head, choices=choices, usage=usage_of(rows))

    async def _chat_prompt(self, body: ChatCompletionRequest) -> np.ndarray:
        tokenizer = self.lm.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(
                400,
                f"the model {self.model_id!r} has no chat template: use /v1/completions with "
                "a prompt in the model's own format",
                param="messages",
                code="no_chat_template",
            )
        messages = [
            # templates know system, user and assistant; OpenAI's developer is the system
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]

        def render() -> str:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )

        try:
            text = await run_in_threadpool(render)
        except Exception as exc:  # the template's own refusal (roles out of order, ...)
            raise ApiError(
                400, f"messages: the chat template refused them: {one_line(exc)}", param="messages"
            ) from exc
        bos = tokenizer.bos_token
        if bos and self.lm.prefix_ids and text.startswith(bos):
            text = text[len(bos) :]  # encode puts the BOS first, as for every text
        return await self._encode(text, "messages")

    # --- shared ----------------------------------------------------------------------------

    def _check_common(self, body: _Sampling) -> None:
        self._check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only with stream: true", param="stream_options")

    def _check_choices(self, prompts: int, n: int) -> None:
        if prompts * n > self.max_choices:
            raise ApiError(
                400,
                f"n: {prompts} prompts times n = {n} is {prompts * n} choices, more than this "
                f"server makes per request ({self.max_choices})",
                param="n",
            )

    async def _encode(self, text: str, field: str) -> np.ndarray:
        ids = await run_in_threadpool(self.lm.encode, text)
        self._check_length(ids, field)
        return ids

    def _check_length(self, ids: np.ndarray, field: str) -> None:
        if len(ids) > self.max_text_tokens:
            raise ApiError(
                413,
                f"{field}: {len(ids):,} tokens, more than this server takes "
                f"({self.max_text_tokens:,})",
                param=field,
            )

    def _max_new(self, ids: np.ndarray, asked: int | None, field: str) -> int:
        room = self.lm.max_positions - len(ids)
        if asked is None:  # as many as the server and the context allow
            if room < 1:
                raise ApiError(
                    400,
                    f"the prompt ({len(ids)} tokens) fills the model's context "
                    f"({self.lm.max_positions} tokens): shorten it",
                    param=field,
                    code="context_length_exceeded",
                )
            return min(room, self.max_completion_tokens)
        if asked > self.max_completion_tokens:
            raise ApiError(
                400, f"{field}: at most {self.max_completion_tokens} on this server", param=field
            )
        if asked > room:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus {field} ({asked}) exceeds the model's "
                f"context ({self.lm.max_positions} tokens)",
                param=field,
                code="context_length_exceeded",
            )
        return asked

    def _submit(self, prompts: Sequence[Prompt], body: _Sampling, *, top: int) -> list[Row]:
        """n rows per prompt, submitted back to back so that they share a batch."""
        from knn_store.generation import Sampling

        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        plans: list[tuple[Prompt, Sampling | None]] = []
        for p, prompt in enumerate(prompts):
            for i in range(body.n):
                index = p * body.n + i
                seed = None if body.seed is None else body.seed + index
                sampling = None
                if (body.min_tokens or 0) > prompt.max_new:
                    raise ApiError(
                        400,
                        f"min_tokens: {body.min_tokens} is more than the tokens this "
                        f"completion may add ({prompt.max_new})",
                        param="min_tokens",
                    )
                if prompt.max_new:
                    sampling = Sampling(
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p,
                        top_k=body.top_k or 0,
                        seed=seed,
                        max_new_tokens=prompt.max_new,
                        knn=body.knn,
                        min_p=body.min_p or 0.0,
                        repetition_penalty=(
                            1.0 if body.repetition_penalty is None else body.repetition_penalty
                        ),
                        min_tokens=body.min_tokens or 0,
                        ignore_eos=bool(body.ignore_eos),
                    )
                plans.append((prompt, sampling))
        rows: list[Row] = []
        try:
            for index, (prompt, sampling) in enumerate(plans):
                text = ChoiceText(
                    self._decode,
                    decode_one=self._decode_one,
                    stops=stops,
                    min_tokens=body.min_tokens or 0,
                )
                on_step = None
                if sampling is None:
                    future: Future[list[int]] = Future()
                    future.set_result([])
                else:
                    on_step = OnStep(text, want_top=top > 0)
                    future = self.batcher.complete(
                        prompt.ids, sampling, on_step=on_step, top_logprobs=top
                    )
                rows.append(Row(index, prompt, text, future, on_step, bool(body.ignore_eos)))
        except BaseException:
            abandon(rows, self.batcher)
            raise
        return rows

    async def _finish(self, rows: list[Row], request: Request) -> None:
        """Wait for every row; if the client leaves or one row fails, end the others."""
        try:
            for row in rows:  # one at a time: one listener on the client's disconnect
                await result_or_cancel(request, row.future, self.batcher)
        except BaseException:
            abandon(rows, self.batcher)
            raise

    async def _prompt_scores(
        self, prompts: Sequence[Prompt], body: CompletionRequest, request: Request
    ) -> Scores:
        """/v1/score's numbers for every prompt that has a token to predict."""
        futures = [
            self.batcher.score(p.ids, KnnOptions()) if len(p.ids) >= 2 else None for p in prompts
        ]
        scores = [
            None if f is None else await result_or_cancel(request, f, self.batcher) for f in futures
        ]
        return Scores(scores, n=body.n, knn=body.knn)

    def entries(self, row: Row, echo: bool, scores: Scores | None) -> list[TokenEntry]:
        """The row's token records, the echoed prompt's first."""
        generated = row.text.kept_entries()
        if not echo:
            return generated
        shift = len(row.prompt.text)
        return [*self.prompt_entries(row, scores), *(shifted(e, shift) for e in generated)]

    def prompt_entries(self, row: Row, scores: Scores | None) -> list[TokenEntry]:
        """The echoed prompt's tokens (BOS left out), with /v1/score's log-probabilities."""
        prefix = len(self.lm.prefix_ids)
        ids = row.prompt.ids.tolist()[prefix:]
        log_probs: list[float | None] = [None] * len(ids)
        score = None if scores is None else scores.of(row)
        if score is not None:
            values = score.knn_log_probs if scores.knn else score.base_log_probs
            for i in range(len(ids)):
                at = prefix + i - 1  # values[j] is ln p of prompt.ids[j + 1]
                if at >= 0:
                    log_probs[i] = finite(float(values[at]))
        offsets = token_offsets(self._decode, ids)
        return [
            TokenEntry(self._decode_one(t), lp, None, off)
            for t, lp, off in zip(ids, log_probs, offsets, strict=True)
        ]

    def finish_reason(self, row: Row) -> str:
        tokens = row.text.tokens
        if row.text.stop_reason is not None:
            return "stop"
        if tokens and tokens[-1] in self.lm.stop_ids and not row.ignore_eos:
            return "stop"
        return "length"

    def _head(self, prefix: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.model_id,
        }

    def _decode(self, ids: Sequence[int]) -> str:
        """Text as `knnlm generate` decodes it."""
        return self.lm.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _decode_one(self, token: int) -> str:
        """One token as text, special tokens by name (an end-of-text shows)."""
        text = self._token_text.get(token)
        if text is None:
            text = self.lm.tokenizer.decode([token])
            self._token_text[token] = text
        return text

    def _stream(self, rows: list[Row], events: Events, body: _Sampling) -> StreamingResponse:
        options = body.stream_options
        usage = bool(options and options.include_usage)
        return StreamingResponse(
            sse(rows, events, usage=usage, batcher=self.batcher),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
