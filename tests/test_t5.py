"""T5 v1.1 encoder: tokenizer, converter and model against transformers (tokenizer + T5EncoderModel).

Everything is tiny and built here: a SentencePiece model trained in a second on a few sentences,
random T5EncoderModels saved as sharded safetensors (index JSON), our converter and loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from mochi_jax.checkpoints.safetensors_io import ConversionError  # noqa: E402
from mochi_jax.checkpoints.t5 import convert_t5, load_t5  # noqa: E402
from mochi_jax.models import t5 as t5_model  # noqa: E402
from mochi_jax.lib.text import T5Tokenizer, TextEncoder, encode  # noqa: E402

CORPUS = [
    "A hand with delicate fingers picks up a bright yellow lemon from a wooden bowl.",
    "The quick brown fox jumps over the lazy dog!",
    "Cats, dogs and birds: 3 animals; 42 legs?",
    "A video of a sunset over the ocean, with waves crashing on the shore.",
    "Hello world. This is a test of the tokenizer (with punctuation) -- and numbers 12345.",
]

PROMPTS = [
    "",
    "A cat.",
    "The quick brown fox jumps over the lazy dog, twice!",
    "A video of waves crashing on the shore at sunset; the camera pans slowly (left to right). " * 3,
]

TOKENIZER_PROMPTS = PROMPTS + [
    " ", "  leading and trailing  ", "Hello,world!!...?;:", "über café 日本語 😀 — «quotes»", "new\nline\ttab",
    "ﬁ ① Ａ", "x  ,  y", "a<extra_id_0>b", "x </s> y", "<pad>", "<unk>hello", "word " * 300,
]

# Two random v1.1 configurations, every size different; max_len is the tokenizer length used.
CONFIGS = {
    "small": dict(d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20, layer_norm_epsilon=1e-6, max_len=24),
    "wide": dict(d_model=48, d_kv=16, num_heads=2, d_ff=64, num_layers=3, relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, layer_norm_epsilon=1e-5, max_len=40),
}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 3))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, minloglevel=2)
    return d


@pytest.fixture(scope="module")
def hf_tokenizer(tok_dir):
    return transformers.T5Tokenizer.from_pretrained(str(tok_dir))


def hf_encoder(name: str, vocab_size: int, seed: int = 0):
    """A random transformers T5EncoderModel (v1.1 settings); norms and the position bias randomised too."""
    kw = {k: v for k, v in CONFIGS[name].items() if k != "max_len"}
    cfg = transformers.T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                dropout_rate=0.0, **kw)
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "layer_norm" in key:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in key:
                p.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok_dir):
    """name -> (HF model, folder of sharded safetensors)."""
    vocab = spm.SentencePieceProcessor(model_file=str(tok_dir / "spiece.model")).get_piece_size() + 100
    out = {}
    for name in CONFIGS:
        model = hf_encoder(name, vocab_size=vocab + 10)  # padded, like 32100 -> 32128
        d = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(d, max_shard_size="20KB")
        out[name] = (model, d)
    return out


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


def edit_shard(path: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("max_length", [16, 256])
def test_tokenizer_matches_transformers(tok_dir, hf_tokenizer, max_length):
    ours = T5Tokenizer(tok_dir, max_length=max_length)
    ids, mask = ours(TOKENIZER_PROMPTS)
    ref = hf_tokenizer(TOKENIZER_PROMPTS, padding="max_length", max_length=max_length, truncation=True)
    assert ids.shape == mask.shape == (len(TOKENIZER_PROMPTS), max_length)
    assert ids.dtype == np.int32 and mask.dtype == bool
    for i, p in enumerate(TOKENIZER_PROMPTS):
        assert ids[i].tolist() == ref["input_ids"][i], repr(p)
        assert mask[i].astype(int).tolist() == ref["attention_mask"][i], repr(p)
    assert ids[0, 0] == 1 and mask[0].sum() == 1  # "" is just EOS
    assert mask[-1].all() and ids[-1, -1] == 1  # truncated, EOS kept as the last token


def test_tokenizer_finds_spiece_and_sentinels(tok_dir, hf_tokenizer, tmp_path):
    repo = tmp_path / "repo"
    (repo / "tokenizer").mkdir(parents=True)
    shutil.copy(tok_dir / "spiece.model", repo / "tokenizer" / "spiece.model")
    for path in (repo, repo / "tokenizer", repo / "tokenizer" / "spiece.model"):
        assert T5Tokenizer(path).path == repo / "tokenizer" / "spiece.model"
    ours = T5Tokenizer(repo)
    assert ours.vocab_size == len(hf_tokenizer)
    for i in (0, 1, 99):
        assert ours.special[f"<extra_id_{i}>"] == hf_tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>")
    with pytest.raises(FileNotFoundError):
        T5Tokenizer(tmp_path / "nothing")


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 10)])
def test_relative_position_buckets_match_reference(buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 256
    pos = torch.arange(length)
    ref = T5Attention._relative_position_bucket(pos[None, :] - pos[:, None], bidirectional=True,
                                                num_buckets=buckets, max_distance=max_distance)
    ours = t5_model.relative_position_buckets(length, buckets, max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, checkpoints, tok_dir, tmp_path):
    model, folder = checkpoints[name]
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 2
    out, cfg = convert_t5(folder, tmp_path / "t5", dtype="float32", progress=False)
    cfg2, params = load_t5(out, compute_dtype="float32")
    c = CONFIGS[name]
    assert cfg.arch() == cfg2.arch() and cfg.param_dtype == "float32"
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.num_buckets, cfg.max_distance,
            cfg.eps) == (c["d_model"], c["num_layers"], c["num_heads"], c["d_kv"], c["d_ff"],
                         c["relative_attention_num_buckets"], c["relative_attention_max_distance"],
                         c["layer_norm_epsilon"])
    assert (cfg2.param_dtype, cfg2.compute_dtype) == ("float32", "float32")
    # the converted tree is exactly the model's tree
    shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)  # noqa: E731
    assert shapes(params) == shapes(t5_model.abstract_params(cfg2))

    tok = T5Tokenizer(tok_dir, max_length=c["max_len"])
    feats, mask = encode(PROMPTS, tok, cfg2, params)
    ids, ref_mask = tok(PROMPTS)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(ref_mask).long()).last_hidden_state.numpy()
    feats, mask = np.asarray(feats), np.asarray(mask)
    assert feats.shape == (len(PROMPTS), c["max_len"], cfg.d_model) and feats.dtype == np.float32
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask[-1].all()  # the last prompt is truncated
    errs = [np.linalg.norm(feats[b][mask[b]] - ref[b][mask[b]]) / np.linalg.norm(ref[b][mask[b]])
            for b in range(len(PROMPTS))]
    print(f"\n{name}: relative L2 error per prompt on valid positions: {['%.2e' % e for e in errs]}")
    assert max(errs) <= 1e-5, (name, errs)

    # genmo's behaviour: the empty prompt's features zeroed and its mask cleared, the rest unchanged
    z_feats, z_mask = map(np.asarray, encode(PROMPTS, tok, cfg2, params, zero_empty=True))
    assert not z_mask[0].any() and not z_feats[0].any()
    np.testing.assert_array_equal(z_mask[1:], mask[1:])
    np.testing.assert_allclose(z_feats[1:], feats[1:], rtol=0, atol=1e-6)


def test_logical_axes_cover_every_weight():
    cfg = t5_model.T5Config(d_model=16, num_layers=2, num_heads=2, d_kv=4, d_ff=24, vocab_size=40, num_buckets=8)
    params = t5_model.abstract_params(cfg)
    axes = t5_model.logical_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree_util.tree_structure(axes, is_leaf=is_axes) == jax.tree_util.tree_structure(params)
    for a, p in zip(jax.tree_util.tree_leaves(axes, is_leaf=is_axes), jax.tree_util.tree_leaves(params)):
        assert len(a) == p.ndim
    assert axes["shared"]["embedding"] == ("vocab", "embed")
    assert axes["relative_attention_bias"]["embedding"] == ("buckets", "heads")
    assert axes["blocks"]["attn"]["q"]["kernel"] == ("layers", "embed", "heads")
    assert axes["blocks"]["attn"]["o"]["kernel"] == ("layers", "heads", "embed")
    assert axes["blocks"]["ff"]["wo"]["kernel"] == ("layers", "mlp", "embed")
    assert axes["final_norm"]["weight"] == ("embed",)


# ----------------------------------------------------------------------------- converter

def test_bf16_conversion_and_tied_embedding_in_a_diffusers_repo(checkpoints, tok_dir, tmp_path):
    """Default bf16 output, run in bf16 through TextEncoder; a repo root with text_encoder/ is
    accepted; a tied duplicate encoder.embed_tokens.weight is accepted when equal, refused when not."""
    model, folder = checkpoints["small"]
    repo = tmp_path / "repo"
    te = copy_ckpt(folder, repo / "text_encoder")
    edit_shard(shard_of(te, "encoder.final_layer_norm.weight"),
               lambda t: t.update({"encoder.embed_tokens.weight": model.shared.weight.detach().numpy().copy()}))
    out, cfg = convert_t5(repo, tmp_path / "bf16", progress=False)
    cfg2, params = load_t5(out)
    assert cfg2.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(params))
    np.testing.assert_allclose(np.asarray(params["shared"]["embedding"], np.float32),
                               model.shared.weight.detach().numpy(), rtol=1e-2)
    _, p32 = load_t5(out, dtype="float32")
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(p32))

    text = TextEncoder.load(out, tok_dir, max_length=CONFIGS["small"]["max_len"])
    assert (text.cfg.param_dtype, text.cfg.compute_dtype) == ("bfloat16", "bfloat16")
    feats, mask = map(np.asarray, text(PROMPTS))
    ids, _ = text.tokenizer(PROMPTS)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.tensor(mask).long()).last_hidden_state.numpy()
    err = np.linalg.norm(feats[mask] - ref[mask]) / np.linalg.norm(ref[mask])
    print(f"\nbf16 weights + bf16 compute vs float32 reference: relative L2 error {err:.2e}")
    assert feats.dtype == np.float32 and err < 3e-2

    bad = shard_of(te, "encoder.final_layer_norm.weight")
    edit_shard(bad, lambda t: t["encoder.embed_tokens.weight"].__setitem__((3, 0), 7.0))
    with pytest.raises(ConversionError, match=r"encoder\.embed_tokens\.weight.*differs") as e:
        convert_t5(repo, tmp_path / "tied_bad", progress=False)
    assert str(bad) in str(e.value)
    assert not (tmp_path / "tied_bad").exists()


def _refused(folder, out, *needles):
    with pytest.raises(ConversionError) as e:
        convert_t5(folder, out, dtype="float32", progress=False)
    for n in needles:
        assert str(n) in str(e.value), (n, str(e.value))
    assert not out.exists()
    return str(e.value)


def test_refuses_missing_key(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints["small"][1], tmp_path / "ckpt")
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    edit_shard(shard_of(d, key), lambda t: t.pop(key))
    msg = _refused(d, tmp_path / "out", key, d)
    assert "missing" in msg


def test_refuses_extra_key(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints["small"][1], tmp_path / "ckpt")
    key, where = "encoder.block.0.layer.0.SelfAttention.q.bias", shard_of(d, "encoder.final_layer_norm.weight")
    edit_shard(where, lambda t: t.update({key: np.zeros(32, np.float32)}))
    msg = _refused(d, tmp_path / "out", key, where)
    assert "unexpected" in msg


def test_refuses_decoder_weights(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints["small"][1], tmp_path / "ckpt")
    key, where = "decoder.final_layer_norm.weight", shard_of(d, "shared.weight")
    edit_shard(where, lambda t: t.update({key: np.ones(32, np.float32)}))
    _refused(d, tmp_path / "out", key, where)


def test_refuses_wrong_shape(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints["small"][1], tmp_path / "ckpt")
    key = "encoder.block.1.layer.0.SelfAttention.o.weight"
    where = shard_of(d, key)
    edit_shard(where, lambda t: t.update({key: np.zeros((32, 16), np.float32)}))
    msg = _refused(d, tmp_path / "out", key, where)
    assert "(32, 16)" in msg and "(32, 32)" in msg


def test_refuses_truncated_file(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints["small"][1], tmp_path / "ckpt")
    where = shard_of(d, "encoder.block.1.layer.1.DenseReluDense.wo.weight")
    data = where.read_bytes()
    where.write_bytes(data[: len(data) - 100])
    msg = _refused(d, tmp_path / "out", where)
    assert "truncated" in msg


def test_refuses_missing_shard(checkpoints, tmp_path):
    d = copy_ckpt(checkpoints["small"][1], tmp_path / "ckpt")
    where = shard_of(d, "shared.weight")
    where.unlink()
    _refused(d, tmp_path / "out", where.name)
