"""CLIP: tokenizer, image preprocessing, converter and model against transformers (CLIPTokenizer,
CLIPImageProcessor, CLIPModel).

Everything is tiny and built here: a byte-level BPE vocabulary with merges learned from a few
sentences, two random CLIPModels saved with save_pretrained, the same weights rewritten in
OpenAI's layout by the inverse key map (q|k|v fused, projections transposed), our converter and loader.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mochi_jax.lib.clip import CLIP_MEAN, CLIP_STD, preprocess  # noqa: E402
from mochi_jax.lib.clip import BOS, EOS, CLIPTokenizer, bytes_to_unicode, normalize, split_words  # noqa: E402
from mochi_jax.checkpoints.clip import convert_clip, load_clip  # noqa: E402
from mochi_jax.checkpoints.safetensors_io import ConversionError  # noqa: E402
from mochi_jax.models import clip as clip_model  # noqa: E402

CORPUS = ("a photo of a cat sitting on the table. the cat is orange and the table is wooden; "
          "a video of the ocean at sunset, with waves on the shore. there's a dog that isn't sleeping")

PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO OF THE Ocean!!!",
    "the year 2024, 3.14 and 1,000,000 waves",
    "  extra   whitespace\t\nhere  ",
    "don't stop; it's what we'll do, THEY'RE sure I'd've",
    "Hello,world?!... (parens) [brackets] {braces} #tag @user",
    "café naïve über ÉCOLE e\u0301",
    "日本語のテキスト 😀 emoji — «quotes»",
    "a<|endoftext|>b <|startoftext|> c <|ENDOFTEXT|>",
    "x\u3000y\xa0z\u200bw\x1cv\x85u",
    "ΟΔΟΣ Σ",
    "O'Neil's dog''s toy",
    "&amp; html &lt;b&gt;",
    "the cat sat on the table " * 20,  # longer than 77 tokens
]

# Two random configurations, every size different. 'a' pools the text at the first EOS
# (eos_token_id = the tokenizer's EOS; its vocabulary has 8 ids above EOS, so argmax would differ),
# 'b' at argmax(ids) (eos_token_id 2, transformers' legacy value).
CONFIGS = {
    "a": dict(vision=dict(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                          intermediate_size=40),
              text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48),
              projection_dim=16, act="quick_gelu", eps=1e-5, eos="tokenizer", extra_vocab=8),
    "b": dict(vision=dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64),
              text=dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=24),
              projection_dim=8, act="gelu", eps=1e-6, eos=2, extra_vocab=0),
}


# ----------------------------------------------------------------------------- fixtures

def learn_merges(text: str, n: int) -> list[tuple[str, str]]:
    """A tiny BPE trainer: the n most frequent adjacent symbol pairs, merged greedily."""
    table = bytes_to_unicode()
    words = collections.Counter(split_words(normalize(text)))
    seqs = {w: [table[b] for b in w.encode()][:-1] + [table[w.encode()[-1]] + "</w>"] for w in words}
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for pair in zip(s, s[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip_tokenizer")
    merges = learn_merges(CORPUS, 40)
    chars = sorted(bytes_to_unicode().values(), key=ord)  # OpenAI's order: printable bytes first, "!" = 0
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return d


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return CLIPTokenizer(tok_dir)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name == "logit_scale":
                p.fill_(2.3)
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def hf_model(name: str, vocab_size: int, eos_id: int, seed: int = 0):
    c = CONFIGS[name]
    eos = eos_id if c["eos"] == "tokenizer" else c["eos"]
    text = dict(c["text"], vocab_size=vocab_size, max_position_embeddings=77, hidden_act=c["act"],
                layer_norm_eps=c["eps"], eos_token_id=eos, bos_token_id=eos_id - 1, pad_token_id=eos_id)
    vision = dict(c["vision"], hidden_act=c["act"], layer_norm_eps=c["eps"])
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=c["projection_dim"])
    model = transformers.CLIPModel(cfg).eval()
    _randomise(model, seed)
    return model


def openai_state_dict(hf_sd: dict) -> dict:
    """The transformers state dict rewritten in OpenAI's layout (the inverse of our converter's map)."""
    out = {}
    for k, v in hf_sd.items():
        v = v.detach().clone()
        if k.endswith("position_ids") or any(f"self_attn.{c}_proj" in k for c in "kv"):
            continue
        for tower, prefix in (("vision_model.", "visual."), ("text_model.", "")):
            if not k.startswith(tower):
                continue
            rest = k[len(tower):]
            if rest.startswith("encoder.layers."):
                n, sub = rest[len("encoder.layers."):].split(".", 1)
                base, base_hf = f"{prefix}transformer.resblocks.{n}.", f"{tower}encoder.layers.{n}.self_attn."
                if sub.startswith("self_attn.q_proj."):
                    what = sub.rsplit(".", 1)[1]
                    out[base + f"attn.in_proj_{what}"] = torch.cat(
                        [hf_sd[base_hf + f"{c}_proj.{what}"] for c in "qkv"])
                    continue
                sub = (sub.replace("self_attn.out_proj", "attn.out_proj").replace("layer_norm1", "ln_1")
                       .replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
                out[base + sub] = v
            else:
                out[prefix + {
                    "embeddings.class_embedding": "class_embedding",
                    "embeddings.patch_embedding.weight": "conv1.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "embeddings.token_embedding.weight": "token_embedding.weight",
                    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
                    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
                }[rest]] = v
        if k == "visual_projection.weight":
            out["visual.proj"] = v.T.contiguous()
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k == "logit_scale":
            out[k] = v
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """name -> (HF model, transformers folder, OpenAI-layout folder)."""
    from safetensors.torch import save_file

    out = {}
    for i, name in enumerate(CONFIGS):
        model = hf_model(name, len(tokenizer.vocab) + CONFIGS[name]["extra_vocab"], tokenizer.eos_id, seed=i)
        hf_dir = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(hf_dir)
        oa_dir = tmp_path_factory.mktemp(f"openai_{name}")
        save_file(openai_state_dict(model.state_dict()), oa_dir / "open_clip_model.safetensors")
        out[name] = (model, hf_dir, oa_dir)
    return out


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_transformers(tok_dir, tokenizer):
    hf = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    ids = tokenizer(PROMPTS)
    ref = hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    for i, p in enumerate(PROMPTS):
        assert ids[i].tolist() == ref[i], repr(p)
    assert tokenizer.pad_id == hf.pad_token_id == tokenizer.eos_id  # transformers pads with <|endoftext|>
    assert ids[0, :2].tolist() == [tokenizer.bos_id, tokenizer.eos_id]  # "" is BOS EOS
    assert ids[-1, -1] == tokenizer.eos_id and (ids[-1] != tokenizer.pad_id).sum() == 76  # truncated, EOS kept
    assert len(tokenizer.encode(PROMPTS[1])) < len(PROMPTS[1].split()) + 4  # merges were applied


def test_tokenizer_json_and_configured_pad(tok_dir, tokenizer, tmp_path):
    """tokenizer.json (as save_pretrained writes it) gives the same ids; a pad_token named in
    tokenizer_config.json (open_clip's '!' = 0) is followed, as transformers does."""
    hf = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    hf.save_pretrained(tmp_path / "saved")
    only_json = tmp_path / "json"
    only_json.mkdir()
    shutil.copy(tmp_path / "saved" / "tokenizer.json", only_json / "tokenizer.json")
    np.testing.assert_array_equal(CLIPTokenizer(only_json)(PROMPTS), tokenizer(PROMPTS))

    bang = tmp_path / "bang"
    shutil.copytree(tok_dir, bang)
    (bang / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    hf_bang = transformers.CLIPTokenizer.from_pretrained(str(bang))
    ours = CLIPTokenizer(bang)
    assert ours.pad_id == hf_bang.pad_token_id == 0
    ref = hf_bang(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ours(PROMPTS).tolist() == ref


# ----------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("shape,size,crop", [((37, 53), 224, None), ((90, 31), 224, None), ((61, 47), 40, 48)])
def test_preprocess_matches_image_processor(shape, size, crop):
    try:  # transformers 5: the PIL backend by name (CLIPImageProcessor falls back to it without torchvision)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as proc_cls
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        proc_cls = transformers.CLIPImageProcessor
    crop = crop or size
    proc = proc_cls(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})
    frames = np.random.default_rng(0).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    ref = proc(images=list(frames), return_tensors="np", input_data_format="channels_last")["pixel_values"]
    ours = preprocess(frames, size=size, crop_size=crop)
    assert ours.shape == (2, crop, crop, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.transpose(0, 2, 3, 1))
    assert tuple(proc.image_mean) == CLIP_MEAN and tuple(proc.image_std) == CLIP_STD


# ----------------------------------------------------------------------------- model

def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, checkpoints, tokenizer, tmp_path):
    model, hf_dir, oa_dir = checkpoints[name]
    c = CONFIGS[name]
    out, cfg = convert_clip(hf_dir, tmp_path / "clip", dtype="float32", progress=False)
    cfg2, params = load_clip(out)
    assert cfg2.arch() == cfg.arch() and (cfg2.param_dtype, cfg2.compute_dtype) == ("float32", "float32")
    v, t = c["vision"], c["text"]
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp) == (
        v["image_size"], v["patch_size"], v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
        v["intermediate_size"])
    assert (cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp, cfg.vocab_size, cfg.context_length) == (
        t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["intermediate_size"],
        len(tokenizer.vocab) + c["extra_vocab"], 77)
    assert (cfg.projection_dim, cfg.activation, cfg.layer_norm_eps) == (c["projection_dim"], c["act"], c["eps"])
    assert cfg.eos_token_id == (tokenizer.eos_id if c["eos"] == "tokenizer" else None)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: tuple(x.shape), tree)  # noqa: E731
    assert shapes(params) == shapes(clip_model.abstract_params(cfg2))

    s = cfg.image_size
    pixels = np.random.default_rng(1).standard_normal((3, s, s, 3)).astype(np.float32)
    ids = tokenizer(PROMPTS[:6] + PROMPTS[-1:])
    # and random ids with one EOS at a random place (any id, above EOS too where the vocabulary has them)
    rng = np.random.default_rng(2)
    noise = rng.integers(0, cfg.vocab_size, (4, 77)).astype(np.int32)
    noise[noise == tokenizer.eos_id] = 0
    noise[np.arange(4), rng.integers(1, 77, 4)] = tokenizer.eos_id
    if c["extra_vocab"]:  # the two pooling rules disagree on these rows
        assert (noise.argmax(-1) != (noise == tokenizer.eos_id).argmax(-1)).any()
    ids = np.concatenate([ids, noise])
    img = np.asarray(clip_model.encode_image(cfg2, params, pixels))
    txt = np.asarray(clip_model.encode_text(cfg2, params, ids))
    logits = np.asarray(clip_model.logits(params, img, txt))
    with torch.no_grad():
        tp, ti = torch.from_numpy(pixels.transpose(0, 3, 1, 2)), torch.from_numpy(ids).long()
        ref_img = model.get_image_features(pixel_values=tp).pooler_output.numpy()
        ref_txt = model.get_text_features(input_ids=ti).pooler_output.numpy()
        ref_logits = model(input_ids=ti, pixel_values=tp).logits_per_image.numpy()
    assert img.shape == (3, cfg.projection_dim) and txt.shape == (len(ids), cfg.projection_dim)
    errs = dict(image=rel(img, ref_img), text=rel(txt, ref_txt), logits=rel(logits, ref_logits))
    print(f"\n{name}: relative L2 errors {', '.join(f'{k} {e:.1e}' for k, e in errs.items())}")
    assert max(errs.values()) <= 1e-5, errs

    # the OpenAI layout of the same weights converts to identical parameters
    overrides = dict(vision_heads=cfg.vision_heads, text_heads=cfg.text_heads, eos_token_id=cfg.eos_token_id)
    if name == "b":  # open_clip's config file gives heads and activation; eps is overridden
        (oa_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
            "vision_cfg": {"head_width": cfg.vision_width // cfg.vision_heads, "width": cfg.vision_width},
            "text_cfg": {"heads": cfg.text_heads}}}))
        overrides = dict(layer_norm_eps=c["eps"])
    oa_out, oa_cfg = convert_clip(oa_dir / "open_clip_model.safetensors", tmp_path / "oa", dtype="float32",
                                  progress=False, **overrides)
    assert oa_cfg == cfg
    _, oa_params = load_clip(oa_out)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), oa_params, params)
    assert all(jax.tree_util.tree_leaves(same)), same


def test_presets_have_the_released_sizes():
    count = lambda cfg: sum(x.size for x in jax.tree_util.tree_leaves(clip_model.abstract_params(cfg)))  # noqa: E731
    assert count(clip_model.CLIPConfig.preset("ViT-B/32")) == 151_277_313  # transformers' CLIPModel sizes
    assert count(clip_model.CLIPConfig.preset("ViT-B/16")) == 149_620_737
    assert count(clip_model.CLIPConfig.preset("ViT-L/14")) == 427_616_513


def test_bf16_default_openai_defaults_and_cli(checkpoints, tmp_path, capsys):
    """bf16 by default; an OpenAI-layout file with no config gets quick_gelu, argmax pooling and
    width // 64 heads (here 0 for 24 wide: refused, naming the fix); tools/convert_weights.py clip."""
    import importlib.util

    model, _, oa_dir = checkpoints["a"]
    with pytest.raises(ConversionError, match="vision_heads"):
        convert_clip(oa_dir, tmp_path / "x", progress=False)
    out, cfg = convert_clip(oa_dir, tmp_path / "bf16", progress=False, vision_heads=3, text_heads=4)
    assert (cfg.activation, cfg.eos_token_id, cfg.param_dtype) == ("quick_gelu", None, "bfloat16")
    cfg2, params = load_clip(out, compute_dtype="bfloat16")
    assert cfg2.param_dtype == "bfloat16" and params["logit_scale"].shape == ()
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree_util.tree_leaves(params))
    pixels = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    img = np.asarray(clip_model.encode_image(cfg2, params, pixels))
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output
    err = rel(img, ref.numpy())
    with capsys.disabled():
        print(f"\nbf16 weights + bf16 compute vs float32 reference: image features relative L2 error {err:.1e}")
    assert img.dtype == np.float32 and err < 3e-2

    spec = importlib.util.spec_from_file_location("convert_weights", Path(__file__).parents[1] / "tools" /
                                                  "convert_weights.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["clip", str(oa_dir), str(tmp_path / "cli"), "--dtype", "float32", "--quiet"]
    assert cli.main(args + ["--vision-heads", "3", "--text-heads", "4"]) == 0
    assert "3 heads" in capsys.readouterr().out
    assert load_clip(tmp_path / "cli")[0].arch() == cfg.arch()
    assert cli.main(args) == 2 and "vision_heads" in capsys.readouterr().err


# ----------------------------------------------------------------------------- converter refusals

def edit(path: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _refused(src, out, *needles):
    with pytest.raises(ConversionError) as e:
        convert_clip(src, out, dtype="float32", progress=False)
    for n in needles:
        assert str(n) in str(e.value), (n, str(e.value))
    assert not out.exists()
    return str(e.value)


def test_refuses_missing_key(checkpoints, tmp_path):
    d = shutil.copytree(checkpoints["a"][1], tmp_path / "ckpt")
    key = "text_model.encoder.layers.1.mlp.fc2.bias"
    edit(d / "model.safetensors", lambda t: t.pop(key))
    assert "missing" in _refused(d, tmp_path / "out", key, d)


def test_refuses_wrong_shape(checkpoints, tmp_path):
    d = shutil.copytree(checkpoints["a"][1], tmp_path / "ckpt")
    key = "vision_model.encoder.layers.2.self_attn.k_proj.weight"
    edit(d / "model.safetensors", lambda t: t.update({key: np.zeros((24, 12), np.float32)}))
    msg = _refused(d, tmp_path / "out", key, d / "model.safetensors")
    assert "(24, 12)" in msg and "(24, 24)" in msg


def test_refuses_extra_key_but_ignores_position_ids(checkpoints, tmp_path):
    d = shutil.copytree(checkpoints["a"][1], tmp_path / "ckpt")
    ids = {"vision_model.embeddings.position_ids": np.arange(17)[None], "text_model.embeddings.position_ids":
           np.arange(77)[None]}
    edit(d / "model.safetensors", lambda t: t.update(ids))
    convert_clip(d, tmp_path / "ok", dtype="float32", progress=False)
    key = "text_model.encoder.layers.0.self_attn.q_norm.weight"
    edit(d / "model.safetensors", lambda t: t.update({key: np.ones(32, np.float32)}))
    assert "unexpected" in _refused(d, tmp_path / "out", key, d / "model.safetensors")


def test_refuses_openai_layout_errors_and_pickles(checkpoints, tmp_path):
    f = tmp_path / "oa.safetensors"
    shutil.copy(checkpoints["a"][2] / "open_clip_model.safetensors", f)
    key = "visual.transformer.resblocks.1.attn.in_proj_bias"
    edit(f, lambda t: t.update({key: np.zeros(24, np.float32), "input_resolution": np.array(32)}))
    with pytest.raises(ConversionError) as e:
        convert_clip(f, tmp_path / "out", vision_heads=3, text_heads=4, progress=False)
    assert key in str(e.value) and str(f) in str(e.value) and "(72,)" in str(e.value)
    assert "input_resolution" not in str(e.value)
    both = tmp_path / "both"
    shutil.copytree(checkpoints["a"][1], both)
    shutil.copy(f, both / "open_clip_model.safetensors")
    _refused(both, tmp_path / "out", "appears twice", both / "model.safetensors", both / "open_clip_model.safetensors")
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"not read")
    _refused(pickle, tmp_path / "out", "pickle")
