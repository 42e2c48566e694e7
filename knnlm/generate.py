"""``knnlm generate`` and ``knnlm explain``: use the kNN-LM on a prompt, and look inside it."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from knn_store.errors import ConfigError
from knnlm.options import (
    LEVER_OPTIONS,
    MODEL_OPTIONS,
    SEARCH_OPTIONS,
    STORE_OPTIONS,
    options,
    search_domain_option,
    settings_from,
)
from knnlm.progress import Bars

if TYPE_CHECKING:
    from knn_store.generation import Step
    from knn_store.knn_lm import KnnLM

_QUERY_OPTIONS = (*[o for o in MODEL_OPTIONS if o not in ("window", "stride")], *STORE_OPTIONS)


@click.command()
@click.option("--prompt", "-p", required=True, help="Text to continue.")
@click.option(
    "--max-new-tokens", default=64, show_default=True, type=click.IntRange(1), help="Tokens to add."
)
@click.option(
    "--sample-temperature",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0),
    help="Sampling temperature over the interpolated distribution; 0 = greedy. "
    "(--temperature is the kNN softmax's.)",
)
@click.option(
    "--sample-top-k",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Sample among the k likeliest tokens only; 0 = all. (--top-k counts neighbours.)",
)
@click.option(
    "--sample-top-p",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Nucleus sampling: the smallest set of tokens holding this much probability.",
)
@click.option(
    "--sample-min-p",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    help="Only tokens at least this fraction as likely as the likeliest (after the "
    "temperature); 0 = all.",
)
@click.option(
    "--repetition-penalty",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0, min_open=True),
    help="Above 1 discourages every token already in the prompt or the output "
    "(ln p times the penalty), as vLLM's; 1 = off.",
)
@click.option(
    "--min-new-tokens",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="No end-of-text token before this many new tokens.",
)
@click.option(
    "--ignore-eos", is_flag=True, help="Go on past an end-of-text token, to --max-new-tokens."
)
@click.option(
    "--seed",
    type=click.IntRange(-(2**63), 2**64 - 1),
    help="Random seed, for repeatable samples (-2**63 to 2**64 - 1).",
)
@click.option("--no-knn", is_flag=True, help="Generate with the base LM alone, to compare.")
@search_domain_option
@options(*_QUERY_OPTIONS, *SEARCH_OPTIONS, *LEVER_OPTIONS)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming."
)
def generate(
    prompt: str,
    max_new_tokens: int,
    sample_temperature: float,
    sample_top_k: int,
    sample_top_p: float,
    sample_min_p: float,
    repetition_penalty: float,
    min_new_tokens: int,
    ignore_eos: bool,
    seed: int | None,
    no_knn: bool,
    search_domains: tuple[str, ...],
    as_json: bool,
    **params: Any,
) -> None:
    """Continue a prompt, sampling from the kNN-LM's distribution, streaming as it goes.

    Every step searches the datastore with the newest position's key and interpolates
    with the LM exactly as `knnlm eval` does, using the collection's tuned policy unless
    --lambda/--temperature say otherwise. So do pointer following (--pointer-min: a step
    follows the last one's neighbours instead of searching) and the document cache
    (--cache-weight: the prompt's and the generated text's own earlier positions).

    \b
    Examples:
      knnlm generate -p "The scheduler" --max-new-tokens 40 --seed 1
      knnlm generate -p "def parse(" --sample-temperature 0     # greedy
    """
    from knn_store import open_session
    from knn_store.generation import Sampling, decode

    settings = settings_from(params)
    if min_new_tokens > max_new_tokens:
        raise ConfigError(
            f"--min-new-tokens ({min_new_tokens}) is more than --max-new-tokens ({max_new_tokens})"
        )
    sampling = Sampling(
        temperature=sample_temperature,
        top_k=sample_top_k,
        top_p=sample_top_p,
        seed=seed,
        max_new_tokens=max_new_tokens,
        knn=not no_knn,
        min_p=sample_min_p,
        repetition_penalty=repetition_penalty,
        min_tokens=min_new_tokens,
        ignore_eos=ignore_eos,
    )
    with open_session(settings, search_domains=search_domains) as session:
        lm = session.lm
        prompt_ids = lm.encode(prompt)
        knn_lm = session.knn_lm
        streamer = None if as_json else _Streamer(lm.tokenizer, prompt)
        followed = 0  # steps scored from followed pointers (with --pointer-min)

        def on_token(row: int, step: Step) -> None:
            nonlocal followed
            followed += bool(step.followed)
            if streamer is not None:
                streamer.add(row, step)

        started = time.perf_counter()
        (new,) = decode(knn_lm, [prompt_ids], [sampling], on_token=on_token)
        seconds = time.perf_counter() - started
        if streamer is not None:
            streamer.end()
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "prompt": prompt,
                    "completion": text,
                    "new_tokens": len(new),
                    "seconds": round(seconds, 2),
                    "knn": not no_knn,
                    "policy": session.resolved.policy.to_dict(),
                    "temperature": session.resolved.temperature,
                    **_levers(knn_lm, followed, no_knn),
                }
            )
        )
        return
    source = "base LM only" if no_knn else session.describe()
    if knn_lm.pointer_min and not no_knn:
        source += f"; {followed} of {len(new)} tokens from followed pointers"
    click.echo(f"[{len(new)} tokens in {seconds:.1f}s; {source}]", err=True)


def _levers(knn_lm: KnnLM, followed: int, no_knn: bool) -> dict[str, Any]:
    """The JSON fields of pointer following and the document cache, where they are on (as
    ``knnlm eval`` reports them), with the steps that followed pointers."""
    out: dict[str, Any] = {}
    if knn_lm.pointer_min and not no_knn:
        out["pointer_min"] = knn_lm.pointer_min
        out["followed_pointers"] = followed
    if knn_lm.cache is not None and not no_knn:
        out["cache"] = {"weight": knn_lm.cache.weight, "temperature": knn_lm.cache.temperature}
    return out


class _Streamer:
    """Prints the prompt, then decoded text as tokens come, holding back an incomplete
    multi-byte character until its last byte arrives."""

    def __init__(self, tokenizer: Any, prompt: str) -> None:
        self.tokenizer = tokenizer
        self.prompt: str | None = prompt
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, _row: int, step: Step) -> None:
        token = step.token
        if self.prompt is not None:  # only once generation really started
            click.echo(self.prompt, nl=False)
            self.prompt = None
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a split character
            click.echo(text[self.printed :], nl=False)
            self.printed = len(text)

    def end(self) -> None:
        if self.prompt is not None:
            click.echo(self.prompt, nl=False)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        click.echo(text[self.printed :])


@click.command()
@click.option("--text", "-t", required=True, help="Text to explain, token by token.")
@click.option(
    "--top",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Predictions shown per distribution.",
)
@click.option(
    "--neighbours",
    "show_neighbours",
    default=3,
    show_default=True,
    type=click.IntRange(0),
    help="Nearest neighbours shown per token.",
)
@search_domain_option
@options(*MODEL_OPTIONS, *STORE_OPTIONS, *SEARCH_OPTIONS, *LEVER_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one per token.")
def explain(
    text: str,
    top: int,
    show_neighbours: int,
    search_domains: tuple[str, ...],
    as_json: bool,
    **params: Any,
) -> None:
    """Show, per token of TEXT, what the LM and the datastore predicted and why.

    For each token: its probability under the kNN-LM, the LM and the kNN distribution,
    lambda, the top predictions of both, and the nearest neighbours with the source,
    position and text they were memorized from. With the levers of `knnlm tune
    --fit-levers` on, a token served by followed pointers (no search) says so, and the
    document cache's probability and weight are shown.

    \b
    Example:
      knnlm explain -t "The kernel schedules tasks" --neighbours 2
    """
    from knn_store import open_session
    from knn_store.explain import explain_text

    if not text.strip():
        raise ConfigError("--text is empty: give some text to explain")
    settings = settings_from(params)
    with open_session(settings, search_domains=search_domains) as session:
        if not as_json:
            click.echo(session.describe())
        with Bars(quiet=as_json) as bars:
            rows = explain_text(
                session.knn_lm, text, top=top, show_neighbours=show_neighbours, on_progress=bars
            )
            for row in rows:  # printed as each batch of windows is scored
                if as_json:
                    click.echo(json.dumps(row.to_dict()))
                    continue
                how = (
                    ", from followed pointers (no search)"
                    if row.followed
                    else ("" if row.searched else ", search skipped by the gate")
                )
                if row.cache_weight and row.cache_prob is not None:
                    how += f", cache {row.cache_prob:.3f} weight {row.cache_weight:.2f}"
                click.echo(
                    f"\n{row.position:4d} {row.token!r:16} p={row.prob:.3f}  "
                    f"(LM {row.lm_prob:.3f}, kNN {row.knn_prob:.3f}, "
                    f"lambda {row.lmbda:.2f}{how})"
                )
                click.echo(f"     LM : {_tops(row.lm_top)}")
                click.echo(f"     kNN: {_tops(row.knn_top)}")
                for i, n in enumerate(row.neighbours, 1):
                    where = f"{n.source or '?'}:{n.offset if n.offset is not None else '?'}"
                    snippet = (n.context or "").replace("\n", "\u21b5")[-60:]
                    click.echo(
                        f"     {i}. d2={n.sq_distance:<9.4g} -> {n.token!r:12} {where} [{n.domain}]"
                        + (
                            f"\n        \u2026{snippet}\u2016{n.token}"
                            if n.context is not None
                            else ""
                        )
                    )


def _tops(pairs: list[tuple[str, float]]) -> str:
    return " | ".join(f"{t!r} {p:.3f}" for t, p in pairs) or "-"
