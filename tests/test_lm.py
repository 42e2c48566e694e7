"""Key extraction on tiny GPT-2 and Llama models, checked against transformers' own outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from knn_store import ConfigError, DimensionMismatch, KnnlmSettings, load_language_model

TEXT = "def add(a, b):\n    return a + b\nclass Stack:\n    def push(self, x):\n"


def _load(model: Path, key_type: str, tmp_path: Path):
    return load_language_model(
        KnnlmSettings(model=str(model), key_type=key_type, model_cache=tmp_path / "cache")
    )


def _post_attention_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm whose output feeds the last MLP, located by hand for each test architecture."""
    if hasattr(model, "transformer"):  # GPT-2
        return model.transformer.h[-1].ln_2
    return model.model.layers[-1].post_attention_layernorm  # Llama


def test_final_key_is_the_state_feeding_the_lm_head(tiny_model: Path, tmp_path: Path) -> None:
    lm = _load(tiny_model, "final", tmp_path)
    ids = lm.encode(TEXT)[None]  # [1, n]
    out = lm.forward(ids, with_logits=True)
    with torch.no_grad():
        ref = lm.model(torch.from_numpy(ids), output_hidden_states=True)
    torch.testing.assert_close(out.keys, ref.hidden_states[-1])
    torch.testing.assert_close(out.logits, ref.logits)


def test_ffn_input_key_is_the_normed_input_of_the_last_mlp(
    tiny_model: Path, tmp_path: Path
) -> None:
    lm = _load(tiny_model, "ffn_input", tmp_path)
    ids = lm.encode(TEXT)[None]
    seen: list[torch.Tensor] = []
    handle = _post_attention_norm(lm.model).register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        out = lm.forward(ids, with_logits=False)
    finally:
        handle.remove()
    torch.testing.assert_close(out.keys, seen[-1])
    assert out.logits is None
    assert lm.dim == 32


@pytest.mark.parametrize("key_type", ["final", "ffn_input"])
def test_early_stop_gives_the_same_keys(
    tiny_models: dict[str, Path], tmp_path: Path, key_type: str
) -> None:
    lm = _load(tiny_models["llama"], key_type, tmp_path)
    ids = lm.encode(TEXT)[None]
    full = lm.forward(ids, with_logits=True)
    fast = lm.forward(ids, with_logits=False)
    torch.testing.assert_close(full.keys, fast.keys)


def test_right_padded_batch_matches_single_sequences(tiny_model: Path, tmp_path: Path) -> None:
    lm = _load(tiny_model, "ffn_input", tmp_path)
    a, b = lm.encode(TEXT), lm.encode("x = 1\n")
    batch = np.full((2, len(a)), lm.pad_id)
    batch[0], batch[1, : len(b)] = a, b
    mask = (np.arange(len(a))[None] < np.array([[len(a)], [len(b)]])).astype(np.int64)
    out = lm.forward(batch, attention_mask=mask, with_logits=True)
    single = lm.forward(b[None], with_logits=True)
    torch.testing.assert_close(out.keys[1, : len(b)], single.keys[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits[1, : len(b)], single.logits[0], atol=1e-5, rtol=1e-4)


def test_encode_prefixes_bos(tiny_model: Path, tmp_path: Path) -> None:
    lm = _load(tiny_model, "final", tmp_path)
    ids = lm.encode("hello")
    assert ids[0] == lm.tokenizer.bos_token_id and len(ids) > 1


def test_collection_meta_identifies_model_and_key(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    a = _load(tiny_models["llama"], "final", tmp_path).collection_meta()
    again = _load(tiny_models["llama"], "final", tmp_path).collection_meta()
    other = _load(tiny_models["gpt2"], "final", tmp_path).collection_meta()
    assert a == again
    assert a.model_fingerprint != other.model_fingerprint
    assert (a.dim, a.vocab_size, a.key_type) == (32, 320, "final")


def test_a_model_changed_in_a_middle_layer_is_another_model(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint covers every parameter on the way to the keys (scheme 2), and is
    hashed once per checkpoint; the old scheme (the embeddings and the last block only)
    missed a change to the first block, and stays readable for older records."""
    import shutil

    from transformers import AutoModelForCausalLM

    import knn_store.lm as lm_module

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_models["llama"], tuned)
    model = AutoModelForCausalLM.from_pretrained(tuned)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)  # "fine-tuned" in layer 0 of 2
    model.save_pretrained(tuned)
    base = _load(tiny_models["llama"], "ffn_input", tmp_path)
    changed = _load(tuned, "ffn_input", tmp_path)
    assert base.fingerprint() != changed.fingerprint()
    assert base.fingerprint(1) == changed.fingerprint(1)  # what the partial hash missed
    old = base.collection_meta(scheme=1)
    assert old.fingerprint_scheme == 1 and old.model_fingerprint == base.fingerprint(1)
    with pytest.raises(DimensionMismatch):
        base.collection_meta().check_compatible(changed.collection_meta(), collection="c")

    def no_hashing(model: torch.nn.Module) -> str:
        raise AssertionError("hashed again: the cache was not used")

    monkeypatch.setattr(lm_module, "_full_fingerprint", no_hashing)
    assert _load(tuned, "ffn_input", tmp_path).fingerprint() == changed.fingerprint()


def test_bad_model_paths_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_language_model(KnnlmSettings(model=str(tmp_path / "missing.gguf")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="cannot load model"):
        load_language_model(KnnlmSettings(model=str(tmp_path / "empty")))
