"""Corpora, train/held-out splits, preference pairs, evaluation prompts and THE prompt format.

Pipeline order (each step deterministic by seed):
  load_documents -> split_documents -> (train) build_preference_pairs -> split_pairs
                                    -> (held-out) eval_examples
SFT trains on `sft_text` of the training documents; the reward model on the training pairs;
PPO samples `ppo_prompts` of the training pairs; evaluation uses only held-out documents.

No prompt crosses the train/held-out line. Openings repeat across documents (TinyStories'
"Once upon a time, there was a little girl named Lily." opens many stories), so a split by
document would put the same prompt into PPO training and evaluation. Both splits therefore
hold out whole prompt groups: `split_documents` groups documents by `document_prompt` (the
prompt the document's preference pair and evaluation example have), `split_pairs` groups pairs
by their prompt; `eval_examples` keeps one example per prompt, so no evaluation prompt repeats.

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
  * Exact duplicate documents (and pairs) are dropped before splitting, and documents (pairs)
    sharing a prompt are held out together, so neither can sit on both sides of the line. The
    study split documents at random.
  * TinyStories pairs end every sentence list with one ".": a plain ". ".join of shuffled
    sentences leaves "..", a typo the reward model could learn instead of story order.

Records are frozen dataclasses; stage artifacts are JSON lines (`save_jsonl` / `load_jsonl`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

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


def document_prompt(corpus: str, doc: Document) -> str:
    """The prompt of `doc`'s preference pair and of its pair-format evaluation example.

    The first sentence of a story or paragraph (`split_first_sentence`), `cnn_prompt(article)`
    for CNN/DailyMail. The split key: documents with the same prompt stay on one side.
    """
    return prompt_and_continuation(corpus, doc)[0]


def prompt_and_continuation(corpus: str, doc: Document) -> tuple[str, str]:
    """A document's prompt (`document_prompt`) and its real continuation (CNN: its highlights)."""
    corpus_spec(corpus)
    if corpus == "cnn_dailymail":
        return cnn_prompt(doc.text), doc.summary or ""
    return split_first_sentence(doc.text)


def _split_groups(
    unique: Sequence[T], key: Callable[[T], str], seed: int, size: int
) -> tuple[list[T], list[T]]:
    """(train, held-out): `size` whole key groups held out, chosen by a seeded shuffle.

    At least one group stays in training. Both sides keep the input order, so "the first n
    held-out" is stable.
    """
    keys = [key(x) for x in unique]
    groups = list(dict.fromkeys(keys))
    if len(groups) < 2:
        raise ValueError(f"need at least 2 distinct prompts to split, got {len(groups)}")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    heldout = {groups[i] for i in order[: min(size, len(groups) - 1)]}
    train = [x for x, k in zip(unique, keys) if k not in heldout]
    return train, [x for x, k in zip(unique, keys) if k in heldout]


def split_documents(
    corpus: str, docs: Sequence[Document], seed: int, heldout_fraction: float = 0.05, max_heldout: int = 500
) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents, no prompt on both sides.

    Exact duplicates are dropped first; then max(1, min(max_heldout, int(n * fraction))) prompt
    groups (n: distinct documents) are held out whole, by seed, so evaluation gets that many
    distinct prompts and every document sharing a held-out prompt is held out with it.
    """
    unique = list(dict.fromkeys(docs))
    size = max(1, min(max_heldout, int(len(unique) * heldout_fraction)))
    return _split_groups(unique, lambda doc: document_prompt(corpus, doc), seed, size)


def split_pairs(
    pairs: Sequence[PreferencePair], seed: int, heldout_fraction: float = 0.05, max_heldout: int = 300
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) preference pairs, no prompt on both sides; held-out pairs measure RM accuracy.

    Exact duplicates are dropped first; then max(1, min(max_heldout, int(n * fraction))) prompts
    (n: distinct prompts) are held out with all their pairs, by seed, so a reward model is
    measured on prompts it never trained on.
    """
    unique = list(dict.fromkeys(pairs))
    prompts = {pair.prompt for pair in unique}
    size = max(1, min(max_heldout, int(len(prompts) * heldout_fraction)))
    return _split_groups(unique, lambda pair: pair.prompt, seed, size)


# ----------------------------------------------------------------------------- pairs

def split_first_sentence(text: str) -> tuple[str, str]:
    """(first sentence with its full stop, the rest): the prompt of a story's or paragraph's pair.

    The sentence is cut as `_story_pair` cuts it (stripped, empty ones skipped), so a story's
    pair, its evaluation example and its split key (`document_prompt`) share one prompt.
    """
    first, rest = "", text
    while not first and rest:
        head, _, rest = rest.partition(". ")
        first = head.strip().rstrip(".")
    return first + ".", rest.strip()


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
    picked = [pair for pair in pairs if pair.kind not in DEGENERATE_KINDS and rng.random() < fraction]
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


JUDGE_PAIR_KINDS = ("other", "reordered", "cut")


def _reordered(corpus: str, text: str, rng: random.Random) -> str:
    # The same words in a wrong order, at full length (no length cue): the sentences (CNN: the
    # highlight lines) reversed; a single sentence has its adjacent words swapped pairwise.
    separator = "\n" if corpus == "cnn_dailymail" else ". "
    parts = [p.strip().rstrip(".") for p in text.split(separator) if p.strip()]
    if len(parts) >= 2:
        return _join_sentences(parts[::-1]) if separator == ". " else "\n".join(parts[::-1])
    words = text.split()
    start = rng.randrange(2)
    for k in range(start, len(words) - 1, 2):
        words[k], words[k + 1] = words[k + 1], words[k]
    return " ".join(words)


def build_judge_pairs(corpus: str, docs: Sequence[Document], seed: int) -> list[PreferencePair]:
    """Preference pairs for an independent judge, built differently from the study's.

    The chosen answer is always the document's real continuation (CNN: its highlights), the
    prompt the one its study pair has (so the judge scores the questions PPO asks); the
    rejected answer takes turns, by document: `other`, another document's continuation (on
    topic for nothing in the prompt; CNN: its own highlights with one line another article's);
    `reordered`, the same continuation at full length in a wrong order; `cut`, the
    continuation stopped at 30-70 % of its words, mid-sentence. The study's recipes reject shuffled halves (stories), dropped words (encyclopedia) and another
    article's highlights (news): a judge taught other contrasts does not share the reward
    model's blind spots. Departure from the study (it has no judge). `docs`: training documents.
    """
    corpus_spec(corpus)
    rng = random.Random(seed)
    continued = [prompt_and_continuation(corpus, doc) for doc in docs]
    pairs = []
    for i, (prompt, chosen) in enumerate(continued):
        kind = JUDGE_PAIR_KINDS[(i + seed) % len(JUDGE_PAIR_KINDS)]
        if kind == "other" and len(continued) > 1:
            other = rng.randrange(len(continued) - 1)
            rejected = continued[other + (other >= i)][1]
            lines = chosen.split("\n")
            if corpus == "cnn_dailymail" and len(lines) > 1:
                # Another article's highlights are the study's own contrast: swap in one of
                # their lines instead, so half the facts are right and one is not.
                lines[rng.randrange(len(lines))] = rng.choice(rejected.split("\n"))
                rejected = "\n".join(lines)
        elif kind == "reordered":
            rejected = _reordered(corpus, chosen, rng)
        else:  # cut at a word boundary, the text's own spacing (CNN's line breaks) kept
            breaks = [m.start() for m in re.finditer(r"\s+", chosen)]
            rejected = chosen[: breaks[round((len(breaks) - 1) * rng.uniform(0.3, 0.7))]] if breaks else ""
        pair = PreferencePair(prompt, chosen, rejected, kind=f"judge_{kind}")
        if keep_pair(pair):
            pairs.append(pair)
    return pairs


def ppo_prompts(pairs: Iterable[PreferencePair]) -> list[str]:
    """The distinct prompts of the (training) pairs, in order."""
    return list(dict.fromkeys(pair.prompt for pair in pairs))


# ----------------------------------------------------------------------------- evaluation

def eval_examples(
    corpus: str, heldout_docs: Sequence[Document], num_prompts: int = 200, prompt_chars: int = 200,
    prompt_format: str = "pair",
) -> list[EvalExample]:
    """Up to `num_prompts` prompts and references, one per distinct prompt of the held-out documents.

    `prompt_format="pair"`: the prompt a preference pair of the document would have
    (`document_prompt`: the first sentence of a story or paragraph; `cnn_prompt(article)`), the
    rest as reference, so evaluation asks the question PPO trained on and the reward model
    learned to judge. `"prefix"`: the study's prompts, the first `prompt_chars` characters (cut
    mid-word as often as not) and the rest; CNN/DailyMail is `cnn_prompt` and its highlights
    either way. Documents sharing a `document_prompt` give one example (the first with a
    reference, in held-out order), so no prompt repeats and, with `split_documents`, none opens
    a training document either.
    """
    corpus_spec(corpus)
    examples: list[EvalExample] = []
    seen_groups: set[str] = set()
    seen_prompts: set[str] = set()
    for doc in heldout_docs:
        if len(examples) == num_prompts:
            break
        group = document_prompt(corpus, doc)
        if corpus == "cnn_dailymail":
            prompt, reference = group, doc.summary or ""
        elif prompt_format == "pair":
            prompt, reference = group, split_first_sentence(doc.text)[1]
        else:
            prompt, reference = doc.text[:prompt_chars], doc.text[prompt_chars:]
        if reference.strip() and group not in seen_groups and prompt not in seen_prompts:
            seen_groups.add(group)
            seen_prompts.add(prompt)
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
