"""Data stage: documents -> train/held-out split -> preference pairs and evaluation prompts.

Preference pairs are built from the training split only and evaluation prompts from
the held-out split only (the original code built pairs from evaluation texts; SPEC 1.5).
Everything is written as JSONL into the stage folder, which later stages read.
"""

from __future__ import annotations

from slmrl_ray.artifacts import Reporter, RunPaths, no_report
from slmrl_ray.config import PipelineConfig
from slmrl_ray.data import (
    build_preference_pairs,
    degenerate_pairs,
    eval_examples,
    load_documents,
    save_jsonl,
    split_documents,
    split_pairs,
)


def run_data(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    corpus, data = config.corpus_config, config.data
    docs = load_documents(
        corpus.kind,
        corpus.source,
        corpus.path,
        data.num_documents,
        data.seed,
        hub_config=corpus.hub_config,
        split=corpus.split,
    )
    train, heldout = split_documents(docs, data.seed, data.heldout_fraction, data.max_heldout)
    pairs = build_preference_pairs(corpus.kind, train, data.seed)
    train_pairs, heldout_pairs = split_pairs(
        pairs, data.seed, data.pair_heldout_fraction, data.max_heldout_pairs
    )
    train_pairs += degenerate_pairs(train_pairs, data.degenerate_pairs, data.seed)
    heldout_pairs += degenerate_pairs(heldout_pairs, data.degenerate_pairs, data.seed + 1)
    examples = eval_examples(corpus.kind, heldout, config.eval.num_prompts, config.eval.prompt_chars,
                             config.eval.prompt_format)
    folder = paths.data
    save_jsonl(folder / "train.jsonl", train)
    save_jsonl(folder / "heldout.jsonl", heldout)
    save_jsonl(folder / "pairs_train.jsonl", train_pairs)
    save_jsonl(folder / "pairs_heldout.jsonl", heldout_pairs)
    save_jsonl(folder / "eval.jsonl", examples)
    metrics = {
        "documents": len(docs),
        "train_documents": len(train),
        "heldout_documents": len(heldout),
        "train_pairs": len(train_pairs),
        "heldout_pairs": len(heldout_pairs),
        "degenerate_train_pairs": sum(p.kind != "study" for p in train_pairs),
        "eval_examples": len(examples),
    }
    report({f"data/{k}": v for k, v in metrics.items()})
    return metrics
