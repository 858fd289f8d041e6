"""Text encoder: pooling, normalisation, batching, the content-hash cache, product text.

Most tests use a tiny random BERT saved to tmp_path (fast); one loads the real all-MiniLM-L6-v2
from the offline package and checks the properties we rely on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from encoders.text import TextEncoder, product_text, resolve_device, resolve_model_path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"), local_files_only=True)
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture()
def enc(tiny_bert) -> TextEncoder:
    return TextEncoder(tiny_bert, device="cpu", batch_size=3, max_length=32)


def test_shape_norm_and_dtype(enc):
    out = enc.encode(["red ceramic mug", "a blue lamp", "", "x" * 500])
    assert out.shape == (4, 16) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-6)


def test_mean_pooling_matches_a_manual_computation(enc):
    text = "white hanging heart t-light holder"
    batch = enc.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        tokens = enc.model(**batch).last_hidden_state[0]
    want = F.normalize(tokens.mean(0), dim=0)
    assert torch.allclose(enc.encode([text])[0], want, atol=1e-6)


def test_batching_and_padding_do_not_change_results(enc):
    texts = [f"product number {i} " + "word " * i for i in range(10)]
    together = enc.encode(texts)
    alone = torch.stack([TextEncoder(enc.path, device="cpu", batch_size=1).encode([t])[0] for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_cache_never_re_encodes_unchanged_text(enc):
    enc.encode(["a", "b", "a"])
    assert enc.encoded_count == 2 and len(enc) == 2
    first = enc.encode(["b"])
    enc.encode(["a", "b"])
    assert enc.encoded_count == 2
    assert torch.equal(enc.encode(["b"]), first)
    enc.encode(["c"])
    assert enc.encoded_count == 3


def test_cache_key_includes_the_model(enc, tiny_bert):
    assert enc.model_id.startswith("tiny-bert") and "@" in enc.model_id
    assert enc.cache_key("x") != enc.cache_key("y")
    other = TextEncoder(resolve_model_path("all-MiniLM-L6-v2"), device="cpu")
    assert other.model_id != enc.model_id and other.cache_key("x") != enc.cache_key("x")


def test_cache_persists_to_and_from_a_file(enc, tiny_bert, tmp_path):
    vecs = enc.encode(["mug", "lamp", "vase"])
    enc.save_cache(tmp_path / "cache.safetensors")
    fresh = TextEncoder(tiny_bert, device="cpu")
    assert fresh.load_cache(tmp_path / "cache.safetensors") == 3
    assert torch.equal(fresh.encode(["lamp", "vase", "mug"]), vecs[[1, 2, 0]])
    assert fresh.encoded_count == 0


def test_an_empty_cache_saves_and_loads(tiny_bert, tmp_path):
    empty = TextEncoder(tiny_bert, device="cpu")
    empty.save_cache(tmp_path / "empty.safetensors")
    assert TextEncoder(tiny_bert, device="cpu").load_cache(tmp_path / "empty.safetensors") == 0


def test_cache_of_another_model_is_ignored(enc, tmp_path):
    enc.encode(["mug"])
    enc.save_cache(tmp_path / "c.safetensors")
    enc.model_id = "something-else@0"
    assert enc.load_cache(tmp_path / "c.safetensors") == 0


def test_cache_can_be_bounded(tiny_bert):
    enc = TextEncoder(tiny_bert, device="cpu", batch_size=2, cache_max_entries=2)
    out = enc.encode(["a", "b", "c", "d"])
    assert out.shape == (4, 16) and len(enc) == 2
    enc.encode(["c", "d"])
    assert enc.encoded_count == 4


def test_product_text_layout():
    props = {
        "title": "  WHITE HANGING  HEART ",
        "description": ["Lovely.", "Hangs."],
        "brand": "Acme",
        "categories": ["Home", "Decor"],
        "price": 2.55,
        "attributes": {"colour": "white"},
    }
    assert product_text(props) == "WHITE HANGING HEART\nBrand: Acme\nCategory: Home > Decor\nLovely. Hangs."
    assert (
        product_text({"title": "Mug", "categories": [["Kitchen", "Mugs"], ["Gifts"]]}) == "Mug\nCategory: Kitchen > Mugs | Gifts"
    )
    assert product_text({}) == ""
    assert product_text({"description": "only text"}) == "only text"


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(FileNotFoundError):
        resolve_model_path("/no/such/model")


def test_real_minilm_properties():
    enc = TextEncoder("all-MiniLM-L6-v2", device="cpu")
    assert enc.dim == 384 and enc.model_id.startswith("all-MiniLM-L6-v2@")
    v = enc.encode(["wireless bluetooth headphones", "bluetooth wireless earbuds with mic", "organic dry dog food, 5 kg", ""])
    assert v.shape == (4, 384)
    assert torch.allclose(v.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > 0.6 > sim[0, 2] and sim[0, 1] > sim[1, 2] + 0.3
