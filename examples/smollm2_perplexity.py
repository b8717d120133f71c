"""Decompose SmolLM2-135M-Instruct into 3 device-sized sub-models and report next-token perplexity.

Sizes are proportional to the seed paper's devices (Jetson Nano 235.8, Jetson TX2 665.6, Orin
Nano 640 GFLOPS) via :func:`coformer.offline.decompose.proportional_specs`; units are assigned by
importance measured on a calibration batch of real BBC News text (training split). Perplexity
is measured on fixed BBC News test articles, for the teacher and for each sub-model *before*
calibration (no distillation): it shows how much each slice keeps on its own.

Run from the repository root::

    .venv/bin/python examples/smollm2_perplexity.py [--calib-docs 8] [--eval-docs 4] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import coformer
from coformer.offline.decompose import proportional_specs
from coformer.measure import count_flops, count_params

DEVICE_GFLOPS = {"jetson-nano": 235.8, "jetson-tx2": 665.6, "orin-nano": 640.0}


def main() -> None:
    """Parse options, decompose, measure, print a table (and optionally write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-docs", type=int, default=8, help="training articles for importance")
    parser.add_argument("--eval-docs", type=int, default=4, help="test articles for perplexity (fixed: the first N)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per article")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = coformer.create_backbone("llama")
    start = time.perf_counter()
    teacher = backbone.load(max_length=args.max_length)
    load_s = time.perf_counter() - start
    shape = backbone.shape(teacher)

    data = coformer.load_dataset("bbc_news")
    calib = backbone.prepare(teacher, data.train.examples[: args.calib_docs])
    evaluation = backbone.prepare(teacher, data.test.examples[: args.eval_docs])
    n_tokens = int(evaluation["attention_mask"].sum())

    start = time.perf_counter()
    importance = backbone.importance(teacher, calib)
    importance_s = time.perf_counter() - start
    specs = proportional_specs(shape, list(DEVICE_GFLOPS.values()))
    subs = backbone.decompose(teacher, specs, importance=importance)

    one = {k: v[:1] for k, v in evaluation.items()}
    rows = [{"model": "teacher", "layers": shape.layers, "embed_dim": shape.embed_dim,
             "heads": shape.heads[0], "mlp": shape.mlp[0], "params": count_params(teacher.hf),
             "gflops_1doc": count_flops(lambda: backbone.lm_logits(teacher, one)) / 1e9,
             "perplexity": backbone.perplexity(teacher, evaluation)}]
    for device, spec, sub in zip(DEVICE_GFLOPS, specs, subs, strict=True):
        rows.append({"model": device, "layers": spec.layers, "embed_dim": spec.embed_dim,
                     "heads": spec.heads[0], "mlp": spec.mlp[0], "params": count_params(sub),
                     "gflops_1doc": count_flops(lambda s=sub: s.lm_logits(**one)) / 1e9,
                     "perplexity": backbone.perplexity(sub, evaluation)})

    print(f"SmolLM2-135M-Instruct: {shape.layers} layers, d={shape.embed_dim}, {shape.heads[0]} heads "
          f"({shape.heads[0] // shape.head_group} KV), MLP {shape.mlp[0]}; load {load_s:.1f}s, "
          f"importance on {args.calib_docs} train articles {importance_s:.1f}s")
    print(f"perplexity on the first {args.eval_docs} BBC News test articles ({n_tokens} tokens, "
          f"max {args.max_length} each), sub-models before calibration:")
    print(f"{'model':<12}{'layers':>7}{'d':>6}{'heads':>6}{'mlp':>6}{'params':>12}{'GFLOPs':>9}{'ppl':>12}")
    for r in rows:
        print(f"{r['model']:<12}{r['layers']:>7}{r['embed_dim']:>6}{r['heads']:>6}{r['mlp']:>6}"
              f"{r['params']:>12,}{r['gflops_1doc']:>9.2f}{r['perplexity']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tokens": n_tokens, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
