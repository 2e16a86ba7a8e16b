#!/usr/bin/env python
"""T5 encoder: time to encode a batch of prompts, ours (jitted, after warm-up) vs transformers'
T5EncoderModel at the same small random config, in the same run.

    python benchmarks/t5.py [--batch 8] [--length 256] [--d-model 256] [--layers 4] ... [--out FILE]
    python benchmarks/t5.py --smoke --out /tmp/t5.json   # a 1-layer model, 2 short prompts, 1 rep (the test)

Both sides tokenise with their own tokenizer (from one tiny SentencePiece model trained here) and
run in float32 on the host CPU; the weights are the reference's, passed through convert_t5.
Prints a table and writes benchmarks/results/t5.json (--out; --smoke: a temporary folder unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, from any directory
# --smoke: the smallest run, to check that it runs
SMOKE = dict(batch=2, length=16, d_model=32, layers=1, heads=2, d_kv=16, d_ff=64, reps=1, torch_threads=1)
CORPUS = [
    "A hand with delicate fingers picks up a bright yellow lemon from a wooden bowl filled with lemons.",
    "The quick brown fox jumps over the lazy dog while the camera slowly pans to the right.",
    "A video of a sunset over the ocean, with waves crashing on the shore and birds flying.",
    "Close-up of a cat's face, soft window light, shallow depth of field, 35mm film grain.",
]


def prompts(batch: int) -> list[str]:
    """Prompts of different lengths, one of them long enough to be truncated at 256 tokens."""
    out = [" ".join(CORPUS * 3)]  # ~1000 characters
    out += [" ".join(CORPUS[: 1 + i % len(CORPUS)]) for i in range(batch - 2)]
    return (out + [""])[:batch]


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=256, help="tokens per prompt (padded/truncated)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-kv", type=int, default=64)
    ap.add_argument("--d-ff", type=int, default=640)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch's CPU threads (0: its default, all cores)")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/t5.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    if not args.out:
        args.out = str(Path(tempfile.gettempdir()) / "t5_smoke.json" if args.smoke
                       else ROOT / "benchmarks" / "results" / "t5.json")

    import jax
    import numpy as np
    import sentencepiece as spm
    import torch
    import transformers

    from mochi_jax.checkpoints.t5 import convert_t5, load_t5
    from mochi_jax.lib.text import T5Tokenizer, encode

    torch.manual_seed(0)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus.txt").write_text("\n".join(CORPUS * 5))
        spm.SentencePieceTrainer.train(
            input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "spiece"), vocab_size=200, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            hard_vocab_limit=False, minloglevel=2)
        hf_tok = transformers.T5Tokenizer.from_pretrained(str(tmp))
        tok = T5Tokenizer(tmp, max_length=args.length)
        hf_cfg = transformers.T5Config(
            vocab_size=len(hf_tok), d_model=args.d_model, d_kv=args.d_kv, d_ff=args.d_ff, num_layers=args.layers,
            num_heads=args.heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
        model = transformers.T5EncoderModel(hf_cfg).eval()
        model.save_pretrained(tmp / "hf")
        out, _ = convert_t5(tmp / "hf", tmp / "ours", dtype="float32", progress=False)
        cfg, params = load_t5(out, compute_dtype="float32")

    batch = prompts(args.batch)

    def ours():
        feats, mask = encode(batch, tok, cfg, params)
        return jax.block_until_ready(feats), mask

    def theirs():
        enc = hf_tok(batch, padding="max_length", max_length=args.length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state

    t0 = time.perf_counter()
    feats, mask = ours()  # compiles
    compile_s = time.perf_counter() - t0
    ref = theirs()  # warm-up
    m = np.asarray(mask)
    err = float(np.linalg.norm(np.asarray(feats)[m] - ref.numpy()[m]) / np.linalg.norm(ref.numpy()[m]))

    t_ours = timed(ours, args.reps)
    t_theirs = timed(theirs, args.reps)
    t_tok = timed(lambda: tok(batch), args.reps)
    t_hf_tok = timed(lambda: hf_tok(batch, padding="max_length", max_length=args.length, truncation=True,
                                    return_tensors="pt"), args.reps)
    med = statistics.median
    ratio = med(t_theirs) / med(t_ours)

    rows = [
        ("mochi_jax encode (jit, f32)", med(t_ours), min(t_ours)),
        ("transformers T5EncoderModel (torch, f32)", med(t_theirs), min(t_theirs)),
        ("  of which: our tokenizer", med(t_tok), min(t_tok)),
        ("  of which: transformers tokenizer", med(t_hf_tok), min(t_hf_tok)),
    ]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    print(f"T5 encoder, batch {args.batch} x {args.length} tokens, d_model {cfg.d_model}, {cfg.num_layers} layers, "
          f"{cfg.num_heads}x{cfg.d_kv} heads, d_ff {cfg.d_ff}, {n_params / 1e6:.1f} M params; "
          f"{args.reps} reps after warm-up; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"{'':44s} {'median ms':>10s} {'min ms':>10s}")
    for name, a, b in rows:
        print(f"{name:44s} {a * 1e3:10.1f} {b * 1e3:10.1f}")
    print(f"speed-up (transformers median / ours median): {ratio:.2f}x; first call incl. compile "
          f"{compile_s:.2f} s; relative L2 difference on valid tokens {err:.1e}")

    result = {
        "benchmark": "t5_encode", "batch": args.batch, "length": args.length,
        "config": cfg.arch(), "params_m": n_params / 1e6, "reps": args.reps,
        "ours_s": t_ours, "transformers_s": t_theirs, "our_tokenizer_s": t_tok, "transformers_tokenizer_s": t_hf_tok,
        "ours_median_s": med(t_ours), "transformers_median_s": med(t_theirs), "speedup": ratio,
        "ours_first_call_s": compile_s, "relative_l2": err,
        "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
