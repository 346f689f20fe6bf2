"""Tests for the offline corpus generator and the data pipeline (no network, no torch)."""

from __future__ import annotations

import json
import math
import random
import re
import sys
import types

import pytest

from slmrl_ray import data
from slmrl_ray.config import load_config
from slmrl_ray.data import Document, EvalExample, PreferencePair, generate_documents

CORPORA = ("tinystories", "cnn_dailymail", "wikitext")

STORY = Document("Lily had a red ball. She lost it in the park. She looked everywhere. "
                 "Her dog found it under a bench. Lily was happy.")
WIKI = Document("The Arlen River is a river in the north of Westmark. It rises in the Grey Hills "
                "and flows east for about 40 kilometres. Its waters were used to drive mills in "
                "the 18th century.")
ARTICLES = [Document(f"RIVERTON (CNN) -- Story number {i} happened today in the town of Riverton, "
                     f"where {i * 10} people gathered to watch the event.",
                     f"Story {i} highlights: {i * 10} people gathered.\nRiverton celebrates.")
            for i in range(5)]


# ----------------------------------------------------------------------------- generator

@pytest.mark.parametrize("corpus", CORPORA)
def test_generator_is_deterministic_and_varied(corpus):
    docs = generate_documents(corpus, 2000, seed=7)
    assert docs == generate_documents(corpus, 2000, seed=7)
    assert docs != generate_documents(corpus, 2000, seed=8)
    assert len(set(docs)) >= 0.9 * len(docs)
    assert all(data.keep_document(corpus, d) for d in docs)
    assert all(d.text.isascii() and (d.summary or "").isascii() for d in docs)


def test_generator_leaves_global_rng_alone():
    import random

    random.seed(3)
    expected = random.random()
    random.seed(3)
    generate_documents("tinystories", 50, seed=1)
    assert random.random() == expected


def test_story_style():
    for doc in generate_documents("tinystories", 300, seed=1):
        sentences = doc.text.split(". ")
        assert 4 <= len(sentences) <= 9
        assert doc.text.endswith(".") and len(doc.text) > 50 and doc.summary is None


def test_news_style_highlights_share_entities_with_article():
    for doc in generate_documents("cnn_dailymail", 300, seed=1):
        assert len(doc.text) > 100 and len(doc.summary) > 20
        assert 3 <= doc.text.count(". ") + 1 <= 5  # short: a tiny reward model sees it whole
        highlights = doc.summary.split("\n")
        assert 2 <= len(highlights) <= 3
        # Every capitalised name and every number of the highlights is in the article.
        for token in re.findall(r"\b(?:[A-Z][a-z]+|\d[\d,]*)\b", doc.summary):
            if token not in {"Fire", "Floods", "River", "New", "People", "Researchers", "Helicopter",
                             "Profits", "Changes", "City", "First", "Parade", "Bridge", "Trail",
                             "At", "Mayor", "Chief", "Professor", "Rescue"}:
                assert token in doc.text, (token, doc)


def test_wiki_style():
    for doc in generate_documents("wikitext", 300, seed=1):
        assert 3 <= len(doc.text.split(". ")) <= 5 and len(doc.text) > 100  # the defining sentence, 2-4 facts
        assert not doc.text.startswith("=") and doc.summary is None


def test_generator_vocabulary_is_small():
    words = set()
    for corpus in CORPORA:
        for doc in generate_documents(corpus, 1000, seed=2):
            words.update(re.findall(r"[A-Za-z]+", doc.text + " " + (doc.summary or "")))
    assert len(words) < 1200


# ----------------------------------------------------------------------------- loading

def test_generated_source_samples_the_requested_number():
    docs = data.load_documents("wikitext", "generated", None, 120, seed=42)
    assert len(docs) == 120 and len(set(docs)) == 120
    assert docs == data.load_documents("wikitext", "generated", None, 120, seed=42)


def test_filters_on_hand_made_documents():
    long_par = "A paragraph about a town " * 6
    assert data.keep_document("wikitext", Document(long_par))
    assert not data.keep_document("wikitext", Document(" = Heading = " + long_par))
    assert not data.keep_document("wikitext", Document("= = Section = = " + long_par))
    assert not data.keep_document("wikitext", Document("Too short."))
    assert data.keep_document("tinystories", Document("x" * 51))
    assert not data.keep_document("tinystories", Document("x" * 50))
    assert data.keep_document("cnn_dailymail", Document("a" * 101, "h" * 21))
    assert not data.keep_document("cnn_dailymail", Document("a" * 100, "h" * 21))
    assert not data.keep_document("cnn_dailymail", Document("a" * 101, "h" * 20))
    assert not data.keep_document("cnn_dailymail", Document("a" * 101, None))


def test_local_jsonl_with_filters_and_sampling(tmp_path):
    rows = [{"text": f"Story {i}: " + "once upon a time " * 4} for i in range(30)]
    rows += [{"text": "too short"}]
    path = tmp_path / "stories.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = data.load_documents("tinystories", "local", str(path), 10, seed=42)
    assert len(docs) == 10 and all(len(d.text) > 50 for d in docs)
    all_docs = data.load_documents("tinystories", "local", str(path), 100, seed=42)
    assert len(all_docs) == 30  # fewer available than asked: keep all that pass


def test_local_jsonl_cnn_fields_and_overrides(tmp_path):
    path = tmp_path / "news.jsonl"
    path.write_text(json.dumps({"body": "a" * 120, "summ": "b" * 30}) + "\n")
    with pytest.raises(ValueError, match="article"):
        data.load_documents("cnn_dailymail", "local", str(path), 5, seed=0)
    docs = data.load_documents("cnn_dailymail", "local", str(path), 5, seed=0,
                               text_field="body", summary_field="summ")
    assert docs == [Document("a" * 120, "b" * 30)]


def test_local_txt_paragraphs(tmp_path):
    paragraphs = [f"Paragraph {i} tells about the old town and its long history. " * 2 for i in range(4)]
    path = tmp_path / "wiki.txt"
    path.write_text("\n\n".join(paragraphs + [" = Heading = ", "short"]))
    docs = data.load_documents("wikitext", "local", str(path), 10, seed=1)
    assert sorted(d.text for d in docs) == sorted(p.strip() for p in paragraphs)


def test_local_parquet_and_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"Parquet story {i} with enough words to pass the length filter." for i in range(6)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "part.parquet")
    json_story = {"text": "A json story with enough words to pass the length filter."}
    (tmp_path / "more.json").write_text(json.dumps([json_story]))
    docs = data.load_documents("tinystories", "local", str(tmp_path / "part.parquet"), 10, seed=0)
    assert sorted(d.text for d in docs) == sorted(texts)
    assert len(data.load_documents("tinystories", "local", str(tmp_path), 10, seed=0)) == 7


def test_unknown_corpus_extension_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="poetry.*tinystories"):
        data.load_documents("poetry", "generated", None, 5, seed=0)
    bad = tmp_path / "docs.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="docs.csv"):
        data.load_documents("tinystories", "local", str(bad), 5, seed=0)
    with pytest.raises(ValueError, match="missing.jsonl"):
        data.load_documents("tinystories", "local", str(tmp_path / "missing.jsonl"), 5, seed=0)
    with pytest.raises(ValueError, match="ftp"):
        data.load_documents("tinystories", "ftp", "x", 5, seed=0)


def test_hub_source_uses_the_study_ids(monkeypatch):
    calls = []

    def load_dataset(path, config=None, split=None):
        calls.append((path, config, split))
        return [{"article": "b" * 150, "highlights": "short one\nand another"},
                {"article": "a" * 150, "highlights": "tiny"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = data.load_documents("cnn_dailymail", "hub", "abisee/cnn_dailymail", 5, seed=0)
    assert calls == [("abisee/cnn_dailymail", "3.0.0", "train")]
    assert docs == [Document("b" * 150, "short one\nand another")]
    data.load_documents("cnn_dailymail", "hub", None, 5, seed=0, split="validation")
    assert calls[-1] == ("abisee/cnn_dailymail", "3.0.0", "validation")
    data.load_documents("wikitext", "hub", None, 5, seed=0, text_field="article")
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-103-raw-v1", "train")
    data.load_documents("tinystories", "hub", None, 5, seed=0, text_field="article")
    assert calls[-1] == ("roneneldan/TinyStories", None, "train")


# ----------------------------------------------------------------------------- splits

def test_split_documents_sizes_and_disjointness():
    # Sizes count prompt groups (5 % of the distinct documents): generated openings repeat, so
    # the 100 held-out prompts bring more than 100 documents along.
    docs = generate_documents("tinystories", 2000, seed=3)
    train, heldout = data.split_documents("tinystories", docs, seed=42)
    prompts = lambda split: {data.document_prompt("tinystories", d) for d in split}
    assert len(prompts(heldout)) == 100 and len(train) + len(heldout) == 2000
    assert not set(train) & set(heldout) and not prompts(train) & prompts(heldout)
    assert (train, heldout) == data.split_documents("tinystories", docs, seed=42)
    assert heldout != data.split_documents("tinystories", docs, seed=43)[1]
    big = [Document(f"doc {i}") for i in range(20_000)]
    assert len(data.split_documents("tinystories", big, seed=0)[1]) == 500  # 5 % capped at 500
    assert len(data.split_documents("tinystories", big[:10], seed=0)[1]) == 1  # at least one
    dup = [Document("same")] * 5 + [Document("other")]
    train, heldout = data.split_documents("tinystories", dup, seed=0)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 2
    with pytest.raises(ValueError, match="2 distinct prompts"):
        data.split_documents("tinystories", [Document("Same start. One."), Document("Same start. Two.")], 0)


def test_split_pairs_caps_at_300():
    pairs = [PreferencePair(f"p{i}", "c" * 30, "r" * 20) for i in range(10_000)]
    train, heldout = data.split_pairs(pairs, seed=0)
    assert len(heldout) == 300 and len(train) == 9700 and not set(train) & set(heldout)


def test_split_pairs_holds_out_whole_prompts():
    # 400 prompts with 1-4 pairs each: 5 % of the prompts (20) held out, each with all its pairs.
    pairs = [PreferencePair(f"p{i}", f"chosen {i} {k}" * 3, "r" * 20) for i in range(400) for k in range(1 + i % 4)]
    train, heldout = data.split_pairs(pairs, seed=0)
    held_prompts = {p.prompt for p in heldout}
    assert len(held_prompts) == 20 and not held_prompts & {p.prompt for p in train}
    assert len(train) + len(heldout) == len(pairs)
    assert heldout == [p for p in pairs if p.prompt in held_prompts]  # input order kept


def test_local_corpus_with_repeated_openings_splits_by_opening(tmp_path):
    # A local file goes through the same load_documents -> split_documents path as generated data.
    openings = {"Once upon a time, there was a little girl named Lily.": 8, "Tom had a big red truck.": 5,
                "The sun was hot that day.": 3}
    rows = [{"text": f"{opening} She went to place {k}. It was fun there. Then she went home again."}
            for opening, count in openings.items() for k in range(count)]
    rows += [{"text": f"Story {i} starts here. Something happened next. Everyone smiled at the end."}
             for i in range(24)]
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    docs = data.load_documents("tinystories", "local", str(path), 100, seed=0)
    assert len(docs) == len(rows)
    held_sizes = set()
    for seed in range(12):
        heldout = data.split_documents("tinystories", docs, seed, heldout_fraction=0.2)[1]
        for opening, count in openings.items():
            held = sum(d.text.startswith(opening) for d in heldout)
            assert held in (0, count), (seed, opening, held)  # all on one side
            held_sizes.add((opening, held))
        assert len({data.document_prompt("tinystories", d) for d in heldout}) == 8  # int(40 * 0.2) openings
    assert all((opening, count) in held_sizes for opening, count in openings.items())  # each held out once


@pytest.mark.parametrize("corpus", CORPORA)
def test_no_heldout_text_reaches_pairs(corpus):
    docs = data.load_documents(corpus, "generated", None, 400, seed=42)
    train, heldout = data.split_documents(corpus, docs, seed=42)
    pairs = data.build_preference_pairs(corpus, train, seed=42)
    examples = data.eval_examples(corpus, heldout)
    heldout_prompts = {data.document_prompt(corpus, d) for d in heldout}
    assert len(pairs) > 0.9 * len(train) and len(examples) == len(heldout_prompts) == 20  # one per prompt
    pair_texts = {p.prompt for p in pairs} | {p.chosen for p in pairs} | {p.rejected for p in pairs}
    for ex in examples:
        # Generated openings repeat (as TinyStories' "Once upon a time, ..." do), but a held-out
        # opening is held out with every document it opens: neither it nor its rest reaches a pair.
        assert ex.prompt not in pair_texts and ex.reference not in pair_texts
    for ex in data.eval_examples(corpus, heldout, prompt_format="prefix"):
        assert ex.prompt not in pair_texts and ex.reference not in pair_texts
    # No pair is a held-out document cut into prompt and continuation (letters compared only).
    letters = lambda text: re.sub(r"[\W_]+", "", text)
    pair_docs = {letters(p.prompt + p.chosen) for p in pairs}
    assert not {letters(d.text) for d in heldout} & pair_docs
    assert {letters(d.text) for d in train[:50]} <= pair_docs or corpus == "cnn_dailymail"
    # With a unique marker per document, leakage would show as a marker in a pair.
    marked = [Document(f"Marker{i} went to the park. It was a nice day. The sun was warm. "
                       f"Everyone had fun today.", f"Marker{i} summary is long enough")
              for i in range(200)]
    train, heldout = data.split_documents(corpus, marked, seed=1)
    texts = " ".join(p.prompt + p.chosen + p.rejected
                     for p in data.build_preference_pairs(corpus, train, seed=1))
    for doc in heldout:
        assert re.search(doc.text.split()[0] + r"\b", texts) is None


@pytest.mark.parametrize("corpus", CORPORA)
def test_document_prompt_is_the_pair_and_eval_prompt(corpus):
    """The split key is the prompt the document's pair and pair-format evaluation example get."""
    docs = generate_documents(corpus, 300, seed=11)
    if corpus == "tinystories":  # odd spacing and stray full stops, as real stories have
        docs += [Document("Lily ran . She fell. Then she got up."), Document(". Tom sang. He was loud. Mom smiled.")]
    build = data.PAIR_BUILDERS[corpus]
    built = 0
    for i, doc in enumerate(docs):
        prompt = data.document_prompt(corpus, doc)
        pair = build(docs, i, random.Random(i))
        if pair is not None:
            assert pair.prompt == prompt, doc
            built += 1
        (example,) = data.eval_examples(corpus, [doc])
        assert example.prompt == prompt
    assert built >= 0.9 * len(docs)


def _data_stage(corpus: str, tmp_path) -> tuple[dict, dict]:
    """The shipped tiny preset's data stage for `corpus`, run into tmp_path: (metrics, written records)."""
    from slmrl_ray.artifacts import RunPaths
    from slmrl_ray.stages.prepare import run_data

    config = load_config(preset="tiny", overrides=[f"corpus={corpus}", f"output_dir={tmp_path}"])
    paths = RunPaths.for_config(config)
    metrics = run_data(config, paths)
    written = {name: data.load_jsonl(paths.data / f"{name}.jsonl", cls) for name, cls in (
        ("train", Document), ("heldout", Document), ("pairs_train", PreferencePair),
        ("pairs_heldout", PreferencePair), ("eval", EvalExample))}
    return metrics, {"config": config, **written}


@pytest.mark.parametrize("corpus", CORPORA)
def test_data_stage_keeps_every_prompt_on_one_side(corpus, tmp_path):
    """Generated openings repeat across documents; no evaluation or held-out pair prompt may be a
    prompt the reward model or PPO trained on, and no evaluation prompt may repeat."""
    metrics, written = _data_stage(corpus, tmp_path)
    trained = {pair.prompt for pair in written["pairs_train"]}
    eval_prompts = [example.prompt for example in written["eval"]]
    assert not [prompt for prompt in eval_prompts if prompt in trained]
    assert not [pair.prompt for pair in written["pairs_heldout"] if pair.prompt in trained]
    assert len(set(eval_prompts)) == len(eval_prompts)
    heldout_prompts = {data.document_prompt(corpus, doc) for doc in written["heldout"]}
    assert not heldout_prompts & {data.document_prompt(corpus, doc) for doc in written["train"]}
    num_prompts = written["config"].eval.num_prompts
    assert len(eval_prompts) >= 0.95 * min(num_prompts, len(heldout_prompts))
    # The stage's own counts say the same.
    assert metrics["heldout_prompts"] == len(heldout_prompts) and metrics["eval_examples"] == len(eval_prompts)
    assert metrics["eval_prompts_in_training"] == metrics["heldout_pair_prompts_in_training"] == 0
    assert metrics["heldout_document_prompts_in_training"] == 0
    assert metrics["duplicate_documents"] + len(written["train"]) + len(written["heldout"]) == metrics["documents"]
    if corpus != "cnn_dailymail":  # the case this guards: openings shared by many documents
        assert metrics["documents_sharing_a_prompt"] > 100


def test_data_stage_refuses_to_write_a_leaking_split(tmp_path, monkeypatch):
    from slmrl_ray.stages import prepare

    def leaky_split(pairs, seed, fraction, max_heldout):  # the old per-pair split's failure
        return list(pairs), [pairs[0]]

    monkeypatch.setattr(prepare, "split_pairs", leaky_split)
    with pytest.raises(RuntimeError, match="heldout_pair_prompts_in_training"):
        _data_stage("wikitext", tmp_path)
    assert not list(tmp_path.rglob("*.jsonl"))


# ----------------------------------------------------------------------------- pairs

def test_story_pair_strategy():
    (pair,) = data.build_preference_pairs("tinystories", [STORY], seed=0)
    assert pair.prompt == "Lily had a red ball."
    assert pair.chosen == ("She lost it in the park. She looked everywhere. "
                           "Her dog found it under a bench. Lily was happy.")
    rest = pair.chosen[:-1].split(". ")
    rejected = pair.rejected[:-1].split(". ")
    assert pair.rejected.endswith(".") and ".." not in pair.rejected
    assert len(rejected) == math.ceil(len(rest) / 2) and set(rejected) <= set(rest)
    assert data.build_preference_pairs("tinystories", [STORY], seed=0) == [pair]


def test_story_pair_needs_three_sentences():
    assert data.build_preference_pairs("tinystories", [Document("One thing. Two things.")], 0) == []


def test_wiki_pair_strategy():
    (pair,) = data.build_preference_pairs("wikitext", [WIKI], seed=0)
    assert pair.prompt == "The Arlen River is a river in the north of Westmark."  # a finished sentence
    assert pair.chosen == ("It rises in the Grey Hills and flows east for about 40 kilometres. "
                           "Its waters were used to drive mills in the 18th century.")
    words, kept = pair.chosen.split(), pair.rejected.split()
    assert len(kept) == len(words) - round(0.3 * len(words))
    it = iter(words)
    assert all(w in it for w in kept)  # an in-order subsequence of the chosen words


def test_wiki_pair_short_continuation_is_cut_in_half():
    doc = Document("Short opening sentence here. Then eight more words follow in this line.")
    pairs = data.build_preference_pairs("wikitext", [doc], seed=0)
    assert pairs == [PreferencePair("Short opening sentence here.",
                                    "Then eight more words follow in this line.",
                                    "Then eight more words")]


def test_news_pair_strategy():
    pairs = data.build_preference_pairs("cnn_dailymail", ARTICLES, seed=0)
    assert len(pairs) == len(ARTICLES)
    summaries = [d.summary for d in ARTICLES]
    for doc, pair in zip(ARTICLES, pairs):
        assert pair.prompt == "Article: " + doc.text[:800] + "\n\nSummary:"
        assert pair.chosen == doc.summary
        assert pair.rejected in summaries and pair.rejected != doc.summary


def test_pair_filters():
    assert data.keep_pair(PreferencePair("p", "c" * 21, "r" * 11))
    assert not data.keep_pair(PreferencePair("p", "c" * 20, "r" * 11))
    assert not data.keep_pair(PreferencePair("p", "c" * 21, "r" * 10))
    assert not data.keep_pair(PreferencePair("p", "c" * 21, "c" * 21))
    # A wiki paragraph whose continuation is too short gives no pair.
    assert data.build_preference_pairs("wikitext", [Document("Opening here. Too short.")], 0) == []


def test_ppo_prompts_are_distinct_and_ordered():
    pairs = [PreferencePair("b", "x", "y"), PreferencePair("a", "x", "y"), PreferencePair("b", "z", "y")]
    assert data.ppo_prompts(pairs) == ["b", "a"]


# ----------------------------------------------------------------------------- formats

def test_reward_text_and_prompt_formats():
    assert data.RESPONSE_SEPARATOR == "\n\n"
    text = data.reward_text("Article: x\n\nSummary:", "  A summary.\n")
    assert text == "Article: x\n\nSummary:\n\nA summary."
    article = "w" * 2000
    assert data.cnn_prompt(article) == "Article: " + "w" * 800 + "\n\nSummary:"
    doc = Document(article, "The highlights.")
    assert data.sft_text("cnn_dailymail", doc) == "Article: " + "w" * 1500 + "\n\nSummary: The highlights."
    assert data.sft_text("tinystories", STORY) == STORY.text
    assert data.sft_text("wikitext", WIKI) == WIKI.text


def test_eval_examples_in_the_study_prefix_format():
    story = Document("s" * 150 + "t" * 100)
    examples = data.eval_examples("tinystories", [story, Document("short")], prompt_chars=150, prompt_format="prefix")
    assert examples == [EvalExample("s" * 150, "t" * 100)]  # empty reference skipped
    news = data.eval_examples("cnn_dailymail", ARTICLES, num_prompts=2, prompt_format="prefix")
    assert news == [EvalExample(data.cnn_prompt(d.text), d.summary) for d in ARTICLES[:2]]
    many = [Document(f"Paragraph {i}. " + "x" * 300) for i in range(10)]
    assert len(data.eval_examples("wikitext", many, num_prompts=4, prompt_format="prefix")) == 4
    # One example per opening sentence: a repeated one would be a repeated question.
    same_opening = [Document("Same opening. " + c * 300) for c in "xyz"]
    assert data.eval_examples("wikitext", same_opening, prompt_format="prefix") == [
        EvalExample(same_opening[0].text[:200], same_opening[0].text[200:])]


def test_eval_examples_keep_one_example_per_prompt():
    docs = [Document("Lily had a red ball."),  # no reference: the group's next document gives it
            Document("Lily had a red ball. She lost it."), Document("Tom ran. He fell."),
            Document("Lily had a red ball. She kept it."), Document("Tom ran.  He won.")]
    assert data.eval_examples("tinystories", docs) == [
        EvalExample("Lily had a red ball.", "She lost it."), EvalExample("Tom ran.", "He fell.")]
    assert data.eval_examples("tinystories", docs, num_prompts=1) == [EvalExample("Lily had a red ball.", "She lost it.")]


@pytest.mark.parametrize("corpus", CORPORA)
def test_eval_prompts_ask_what_the_pairs_and_ppo_ask(corpus):
    """The default format: a held-out document's prompt is the one its preference pair would have,
    so evaluation scores the policy on the question PPO trained on, and the reward model on the
    text shape it learned (a whole sentence, then the separator, then a whole answer)."""
    docs = generate_documents(corpus, 40, seed=5)
    examples = data.eval_examples(corpus, docs, num_prompts=40)
    pairs = data.build_preference_pairs(corpus, docs, seed=5)
    chosen = {}  # generated openings repeat: a prompt may open several documents
    for pair in pairs:
        chosen.setdefault(pair.prompt, set()).add(pair.chosen)
    # One example per distinct prompt (repeated openings give one).
    assert len(examples) == len({data.document_prompt(corpus, d) for d in docs}) > 30
    assert all(example.prompt in chosen for example in examples)
    for example in examples:
        if corpus != "cnn_dailymail":  # the reference is the pair's chosen answer: the document's rest
            assert example.prompt.endswith(".") and example.reference in chosen[example.prompt]
    assert data.eval_examples("wikitext", [WIKI]) == [EvalExample(
        "The Arlen River is a river in the north of Westmark.", WIKI.text.split(". ", 1)[1])]


def test_jsonl_round_trip(tmp_path):
    pairs = [PreferencePair("p\n\u00e9", "c", "r"), PreferencePair("q", "d", "s")]
    data.save_jsonl(tmp_path / "sub" / "pairs.jsonl", pairs)
    assert data.load_jsonl(tmp_path / "sub" / "pairs.jsonl", PreferencePair) == pairs
    docs = [Document("a", None), Document("b", "c")]
    data.save_jsonl(tmp_path / "docs.jsonl", docs)
    assert data.load_jsonl(str(tmp_path / "docs.jsonl"), Document) == docs


def test_degenerate_pairs_put_empty_and_fragment_answers_below_the_chosen_one():
    docs = generate_documents("wikitext", 200, seed=3)
    pairs = data.build_preference_pairs("wikitext", docs, seed=3)
    extra = data.degenerate_pairs(pairs, fraction=0.5, seed=7)
    assert 0.35 * len(pairs) < len(extra) < 0.65 * len(pairs)
    kinds = [p.kind for p in extra]
    assert kinds.count("empty") >= kinds.count("fragment") > 0.8 * kinds.count("empty")
    assert kinds.count("empty") >= kinds.count("padded") > 0.8 * kinds.count("empty")
    sources = {(p.prompt, p.chosen) for p in pairs}
    for pair in extra:
        assert (pair.prompt, pair.chosen) in sources
        if pair.kind == "empty":
            assert pair.rejected == ""
        elif pair.kind == "fragment":
            assert 0 < len(pair.rejected) <= 24 and pair.rejected in pair.chosen
        else:  # padded: the chosen answer, then the start of another pair's, so longer
            assert pair.rejected.startswith(pair.chosen + " ") and len(pair.rejected) > len(pair.chosen) + 10
    assert data.degenerate_pairs(pairs, fraction=0.5, seed=7) == extra  # seeded
    assert data.degenerate_pairs(pairs, fraction=0.0, seed=7) == []
    assert data.degenerate_pairs(extra, fraction=1.0, seed=7) == []  # only study pairs get one
