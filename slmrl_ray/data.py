"""Corpora, train/held-out splits, preference pairs, evaluation prompts and THE prompt format.

Pipeline order (each step deterministic by seed):
  load_documents -> split_documents -> (train) build_preference_pairs -> split_pairs
                                    -> (held-out) eval_examples
SFT trains on `sft_text` of the training documents; the reward model on the training pairs;
PPO samples `ppo_prompts` of the training pairs; evaluation uses only held-out documents.

The prompt format. Every text a reward model sees, in training and when scoring, is built by
`reward_text(prompt, response)` = prompt + "\\n\\n" + response. The study used three different
CNN/DailyMail formats (SFT "Article: ...\\n\\nSummary: ...", reward/PPO "Summarize: " + article);
here one format serves SFT, reward model, PPO and evaluation:
`cnn_prompt(article)` = "Article: " + article[:800] + "\\n\\nSummary:". Departure from the study,
on purpose: the SFT policy learned "Article: ...\\n\\nSummary: ...", so PPO and evaluation ask it
the question it was trained to answer, and the reward model scores what the policy writes.

Other departures from the study, each small:
  * Sampling walks the records in a seeded random order and keeps the first `num_documents`
    that pass the filters. That is a uniform sample of the filtered corpus, as in the study,
    without materialising a 2-million-row hub corpus in Python first.
  * Exact duplicate documents (and pairs) are dropped before splitting, so a duplicate cannot
    sit on both sides of the train/held-out line.
  * TinyStories pairs end every sentence list with one ".": a plain ". ".join of shuffled
    sentences leaves "..", a typo the reward model could learn instead of story order.

Records are frozen dataclasses; stage artifacts are JSON lines (`save_jsonl` / `load_jsonl`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from slmrl_ray.corpora import generate_rows

RESPONSE_SEPARATOR = "\n\n"
CNN_PROMPT_CHARS = 800  # article characters in RM/PPO/eval prompts (the study's value)
CNN_SFT_CHARS = 1500  # article characters in SFT text (the study's value)
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


@dataclass(frozen=True)
class Document:
    text: str  # story / article / paragraph
    summary: str | None = None  # cnn_dailymail highlights; None otherwise


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    # "study": built by the corpus's strategy (SPEC 1.1); "empty" / "fragment": the same prompt
    # and chosen answer against an empty or fragment rejected one (`degenerate_pairs`).
    kind: str = "study"


@dataclass(frozen=True)
class EvalExample:
    prompt: str
    reference: str


@dataclass(frozen=True)
class CorpusSpec:
    """Where the study got a corpus and which record fields hold its text."""

    hub_path: str
    hub_config: str | None
    text_field: str
    summary_field: str | None = None


CORPORA: Mapping[str, CorpusSpec] = MappingProxyType({
    "tinystories": CorpusSpec("roneneldan/TinyStories", None, "text"),
    "cnn_dailymail": CorpusSpec("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "wikitext": CorpusSpec("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
})


def corpus_spec(corpus: str) -> CorpusSpec:
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known corpora: {', '.join(CORPORA)}")
    return CORPORA[corpus]


# ----------------------------------------------------------------------------- prompt format

def reward_text(prompt: str, response: str) -> str:
    """The only way any code builds the text a reward model sees (training and scoring)."""
    return prompt + RESPONSE_SEPARATOR + response.strip()


def cnn_prompt(article: str) -> str:
    return "Article: " + article[:CNN_PROMPT_CHARS] + "\n\nSummary:"


def sft_text(corpus: str, doc: Document) -> str:
    """The text SFT trains on: the document, or for CNN the article followed by its summary."""
    corpus_spec(corpus)
    if corpus != "cnn_dailymail":
        return doc.text
    if doc.summary is None:
        raise ValueError("a cnn_dailymail document needs a summary (its highlights)")
    return "Article: " + doc.text[:CNN_SFT_CHARS] + "\n\nSummary: " + doc.summary


# ----------------------------------------------------------------------------- loading

def keep_document(corpus: str, doc: Document) -> bool:
    """The study's per-corpus filters."""
    corpus_spec(corpus)
    if corpus == "tinystories":
        return len(doc.text) > 50
    if corpus == "cnn_dailymail":
        return len(doc.text) > 100 and doc.summary is not None and len(doc.summary) > 20
    # WikiText rows are lines: keep real paragraphs, not " = Heading = " lines.
    text = doc.text.strip()
    return len(text) > 100 and not text.startswith("=")


def load_documents(
    corpus: str,
    source: str,
    path: str | None,
    num_documents: int,
    seed: int,
    *,
    hub_config: str | None = None,
    split: str = "train",
    text_field: str | None = None,
    summary_field: str | None = None,
) -> list[Document]:
    """Load a corpus, apply the study's filters, and sample `num_documents` of it by `seed`.

    `source` is "generated" (the offline generator; `path` unused), "hub" (a Hugging Face
    dataset id; `path` defaults to the study's, and so does `hub_config` for the study's id)
    or "local" (a .jsonl/.json/.txt/.parquet file, or a folder of them).
    """
    spec = corpus_spec(corpus)
    if source == "generated":  # records shaped like the study's hub ones, read with its fields
        # A few spare documents so the filters can never leave fewer than asked for.
        rows: Sequence[Any] = generate_rows(corpus, num_documents + num_documents // 20 + 8, seed)
        return _sample(rows, lambda row: _row_document(row, spec.text_field, spec.summary_field),
                       corpus, num_documents, seed)
    fields = (text_field or spec.text_field, summary_field or spec.summary_field)
    if source == "hub":
        hub_path = path or spec.hub_path
        if hub_config is None and hub_path == spec.hub_path:
            hub_config = spec.hub_config
        rows = _hub_rows(hub_path, hub_config, split)
    elif source == "local":
        if path is None:
            raise ValueError("source 'local' needs a path to a file or folder")
        rows = _local_rows(Path(path), fields[0])
    else:
        raise ValueError(f"unknown source {source!r}; known: generated, hub, local")
    return _sample(rows, lambda row: _row_document(row, *fields), corpus, num_documents, seed)


def generate_documents(corpus: str, num_documents: int, seed: int) -> list[Document]:
    """`num_documents` offline documents in the style of `corpus` (`corpora.generate_rows`), unfiltered."""
    rows = generate_rows(corpus, num_documents, seed)
    spec = corpus_spec(corpus)
    return [_row_document(row, spec.text_field, spec.summary_field) for row in rows]


def _sample(
    rows: Sequence[Any], to_document: Callable[[Any], Document], corpus: str, n: int, seed: int
) -> list[Document]:
    # Walking a seeded shuffle and stopping at n reads only ~n rows of a big hub dataset.
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    docs: list[Document] = []
    for index in order:
        if len(docs) == n:
            break
        doc = to_document(rows[index])
        if keep_document(corpus, doc):
            docs.append(doc)
    return docs


def _row_document(row: Mapping[str, Any], text_field: str, summary_field: str | None) -> Document:
    for name in (text_field, summary_field):
        if name is not None and name not in row:
            raise ValueError(f"record has no field {name!r} (fields: {sorted(row)})")
    summary = None if summary_field is None else str(row[summary_field] or "").strip()
    return Document(text=str(row[text_field] or "").strip(), summary=summary)


def _hub_rows(path: str, config: str | None, split: str) -> Sequence[Any]:
    from datasets import load_dataset  # optional, heavy: only hub users need it

    return load_dataset(path, config, split=split)


def _local_rows(path: Path, text_field: str) -> list[dict[str, Any]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this folder")
        return [row for file in files for row in _file_rows(file, text_field)]
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    return _file_rows(path, text_field)


def _file_rows(path: Path, text_field: str) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return rows
    if path.suffix == ".txt":
        paragraphs = path.read_text(encoding="utf-8").split("\n\n")
        return [{text_field: p.strip()} for p in paragraphs if p.strip()]
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # datasets reads parquet too (and brings pyarrow along)
        from datasets import load_dataset

        return list(load_dataset("parquet", data_files=str(path), split="train"))
    return pq.read_table(path).to_pylist()


# ----------------------------------------------------------------------------- splits

T = TypeVar("T")


def _split(items: Sequence[T], seed: int, fraction: float, max_heldout: int) -> tuple[list[T], list[T]]:
    unique = list(dict.fromkeys(items))  # a duplicate must not land on both sides
    if len(unique) < 2:
        raise ValueError(f"need at least 2 distinct items to split, got {len(unique)}")
    size = max(1, min(max_heldout, int(len(unique) * fraction)))
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    heldout = set(order[:size])
    # Both sides keep the input order, so "the first n held-out" is stable.
    train = [x for i, x in enumerate(unique) if i not in heldout]
    return train, [x for i, x in enumerate(unique) if i in heldout]


def split_documents(
    docs: Sequence[Document], seed: int, heldout_fraction: float = 0.05, max_heldout: int = 500
) -> tuple[list[Document], list[Document]]:
    """(train, held-out): max(1, min(max_heldout, int(n * fraction))) held out, by seed."""
    return _split(docs, seed, heldout_fraction, max_heldout)


def split_pairs(
    pairs: Sequence[PreferencePair], seed: int, heldout_fraction: float = 0.05, max_heldout: int = 300
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) preference pairs, as `split_documents`; held-out pairs measure RM accuracy."""
    return _split(pairs, seed, heldout_fraction, max_heldout)


# ----------------------------------------------------------------------------- pairs

def split_first_sentence(text: str) -> tuple[str, str]:
    """(first sentence with its full stop, the rest): the prompt of a story's or paragraph's pair."""
    first, _, rest = text.partition(". ")
    return first.rstrip(".") + ".", rest.strip()


def _join_sentences(sentences: Sequence[str]) -> str:
    text = ". ".join(sentences)
    return text if text.endswith((".", "!", "?")) else text + "."


def _story_pair(docs: Sequence[Document], i: int, rng: random.Random) -> PreferencePair | None:
    # Chosen: the story continued in order. Rejected: about half its sentences, shuffled.
    sentences = [s.strip().rstrip(".") for s in docs[i].text.split(". ")]
    sentences = [s for s in sentences if s]
    if len(sentences) < 3:
        return None
    rest = sentences[1:]
    shuffled = rng.sample(rest, len(rest))
    rejected = shuffled[: math.ceil(len(rest) / 2)]
    return PreferencePair(sentences[0] + ".", _join_sentences(rest), _join_sentences(rejected))


def _news_pair(docs: Sequence[Document], i: int, rng: random.Random) -> PreferencePair | None:
    # Chosen: the article's highlights. Rejected: another article's highlights.
    if len(docs) < 2 or docs[i].summary is None:
        return None
    other = rng.randrange(len(docs) - 1)
    other += other >= i  # any index but i
    rejected = docs[other].summary or ""
    return PreferencePair(cnn_prompt(docs[i].text), docs[i].summary, rejected)


def _wiki_pair(docs: Sequence[Document], i: int, rng: random.Random) -> PreferencePair | None:
    # Chosen: the paragraph continued. Rejected: it with 30 % of its words dropped (or, when
    # short, cut to its first half), so it reads as broken text on the same subject.
    prompt, chosen = split_first_sentence(docs[i].text)
    if not chosen:
        return None
    words = chosen.split()
    if len(words) < 10:
        rejected = " ".join(words[: len(words) // 2])
    else:
        dropped = set(rng.sample(range(len(words)), round(0.3 * len(words))))
        rejected = " ".join(w for k, w in enumerate(words) if k not in dropped)
    # The prompt keeps its full stop: PPO asks the policy to go on after a finished
    # sentence, as every pair's chosen answer does (without it, it would continue mid-sentence).
    return PreferencePair(prompt, chosen, rejected)


PAIR_BUILDERS = MappingProxyType(
    {"tinystories": _story_pair, "cnn_dailymail": _news_pair, "wikitext": _wiki_pair}
)


def keep_pair(pair: PreferencePair) -> bool:
    """The study's pair filters."""
    return len(pair.chosen) > 20 and len(pair.rejected) > 10 and pair.chosen != pair.rejected


def build_preference_pairs(corpus: str, docs: Sequence[Document], seed: int) -> list[PreferencePair]:
    """Preference pairs with the study's per-corpus strategy, one per usable document.

    `docs` must be the TRAINING split only (the caller's duty): pairs carry document text into
    reward-model training and PPO prompts, and no held-out text may reach either.
    """
    corpus_spec(corpus)
    build, rng = PAIR_BUILDERS[corpus], random.Random(seed)
    pairs = (build(docs, i, rng) for i in range(len(docs)))
    return [pair for pair in pairs if pair is not None and keep_pair(pair)]


DEGENERATE_KINDS = ("empty", "fragment", "padded")


def degenerate_pairs(pairs: Sequence[PreferencePair], fraction: float, seed: int) -> list[PreferencePair]:
    """Extra pairs that teach the reward model what the study's pairs never show it.

    The study's pairs keep chosen > 20 and rejected > 10 characters, so its reward model
    never saw an empty answer or a scrap of a sentence and scores them by accident (a policy
    under a per-token KL penalty then drifts to them: answers like "ame."); and its rejected
    answers are mostly shorter than the chosen ones (half the story, 30 % of the words
    dropped), so it learns that longer is better (a policy then stops ending its answers).
    For a `fraction` of `pairs` (chosen by `seed`) this adds one pair with the same prompt
    and chosen answer against, in turn: an empty answer; a fragment, a few characters cut
    from the chosen answer; or the chosen answer padded with the start of another pair's
    (longer, and worse). Call it on each side of the split separately, so no prompt crosses
    the train/held-out line. Departure from the study, on purpose.
    """
    rng = random.Random(seed)
    picked = [pair for pair in pairs if pair.kind == "study" and rng.random() < fraction]
    extra = []
    for index, pair in enumerate(picked):
        kind = DEGENERATE_KINDS[index % len(DEGENERATE_KINDS)]
        if kind == "empty":
            rejected = ""
        elif kind == "fragment":
            width = rng.randint(3, 24)
            start = rng.randrange(max(1, len(pair.chosen) - width))
            rejected = pair.chosen[start : start + width].strip()
        else:
            other = rng.choice(pairs).chosen
            rejected = pair.chosen + " " + other[: max(20, len(pair.chosen) // 2)].rsplit(" ", 1)[0]
        if rejected.strip() != pair.chosen.strip() and (kind == "empty" or rejected.strip()):
            extra.append(PreferencePair(pair.prompt, pair.chosen, rejected, kind=kind))
    return extra


def ppo_prompts(pairs: Iterable[PreferencePair]) -> list[str]:
    """The distinct prompts of the (training) pairs, in order."""
    return list(dict.fromkeys(pair.prompt for pair in pairs))


# ----------------------------------------------------------------------------- evaluation

def eval_examples(
    corpus: str, heldout_docs: Sequence[Document], num_prompts: int = 200, prompt_chars: int = 200,
    prompt_format: str = "pair",
) -> list[EvalExample]:
    """Prompts and references from the first `num_prompts` held-out documents.

    `prompt_format="pair"`: the prompt a preference pair of the document would have (the
    first sentence of a story or paragraph; `cnn_prompt(article)`), the rest as reference,
    so evaluation asks the question PPO trained on and the reward model learned to judge.
    `"prefix"`: the study's prompts, the first `prompt_chars` characters (cut mid-word as
    often as not) and the rest; CNN/DailyMail is `cnn_prompt` and its highlights either way.
    """
    corpus_spec(corpus)
    examples = []
    for doc in heldout_docs[:num_prompts]:
        if corpus == "cnn_dailymail":
            prompt, reference = cnn_prompt(doc.text), doc.summary or ""
        elif prompt_format == "pair":
            prompt, reference = split_first_sentence(doc.text)
        else:
            prompt, reference = doc.text[:prompt_chars], doc.text[prompt_chars:]
        if reference.strip():
            examples.append(EvalExample(prompt=prompt, reference=reference))
    return examples


# ----------------------------------------------------------------------------- artifacts

def save_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Write dataclass records (or plain dicts) as JSON lines (never pickle: artifacts stay readable and safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            row = record if isinstance(record, dict) else dataclasses.asdict(record)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_jsonl(path: str | Path, cls: type[T]) -> list[T]:
    """Read records written by `save_jsonl` back into `cls`."""
    with Path(path).open(encoding="utf-8") as f:
        return [cls(**json.loads(line)) for line in f if line.strip()]
