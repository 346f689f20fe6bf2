"""Data stage: documents -> train/held-out split -> preference pairs and evaluation prompts.

Preference pairs are built from the training split only and evaluation prompts from
the held-out split only (the original code built pairs from evaluation texts; SPEC 1.5).
Both splits hold out whole prompt groups (`data.split_documents`, `data.split_pairs`): no
evaluation prompt and no held-out pair's prompt is a training pair's prompt. The stage
counts this on what it writes and refuses to write data that breaks it.
Everything is written as JSONL into the stage folder, which later stages read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from slmrl_ray.artifacts import Reporter, RunPaths, no_report
from slmrl_ray.config import PipelineConfig
from slmrl_ray.data import (
    Document,
    EvalExample,
    PreferencePair,
    build_preference_pairs,
    degenerate_pairs,
    document_prompt,
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
    train, heldout = split_documents(corpus.kind, docs, data.seed, data.heldout_fraction, data.max_heldout)
    pairs = build_preference_pairs(corpus.kind, train, data.seed)
    train_pairs, heldout_pairs = split_pairs(
        pairs, data.seed, data.pair_heldout_fraction, data.max_heldout_pairs
    )
    train_pairs += degenerate_pairs(train_pairs, data.degenerate_pairs, data.seed)
    heldout_pairs += degenerate_pairs(heldout_pairs, data.degenerate_pairs, data.seed + 1)
    examples = eval_examples(corpus.kind, heldout, config.eval.num_prompts, config.eval.prompt_chars,
                             config.eval.prompt_format)
    leaks = prompt_leaks(corpus.kind, heldout, train_pairs, heldout_pairs, examples)
    if any(leaks.values()):  # a bug in the split, not in the data: stop before writing
        raise RuntimeError(f"data stage: held-out prompts are also training prompts: {leaks}")
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
        **prompt_group_counts(corpus.kind, docs, heldout),
        **leaks,
    }
    report({f"data/{k}": v for k, v in metrics.items()})
    return metrics


def prompt_group_counts(corpus: str, docs: Sequence[Document], heldout: Sequence[Document]) -> dict[str, int]:
    """How the documents group by prompt: what the split holds out whole."""
    unique = list(dict.fromkeys(docs))
    sizes = Counter(document_prompt(corpus, doc) for doc in unique)
    return {
        "duplicate_documents": len(docs) - len(unique),  # exact duplicates, dropped
        "prompt_groups": len(sizes),
        "documents_sharing_a_prompt": sum(n for n in sizes.values() if n > 1),
        "heldout_prompts": len({document_prompt(corpus, doc) for doc in heldout}),
    }


def prompt_leaks(
    corpus: str,
    heldout: Sequence[Document],
    train_pairs: Sequence[PreferencePair],
    heldout_pairs: Sequence[PreferencePair],
    examples: Sequence[EvalExample],
) -> dict[str, int]:
    """Held-out records whose prompt a training pair (reward model, PPO) also has: all must be 0.

    Counted on the records the stage writes. `heldout_document_prompts_in_training` covers the
    "prefix" evaluation format too, whose prompts are not pair prompts but open held-out documents.
    """
    trained = {pair.prompt for pair in train_pairs}
    return {
        "eval_prompts_in_training": sum(ex.prompt in trained for ex in examples),
        "heldout_pair_prompts_in_training": sum(pair.prompt in trained for pair in heldout_pairs),
        "heldout_document_prompts_in_training": sum(document_prompt(corpus, d) in trained for d in heldout),
    }
