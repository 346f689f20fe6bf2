"""Models, generation, reward formatting and the "did it train?" checks (PPO: test_ppo.py)."""

from __future__ import annotations

import math
import shutil
import threading
from pathlib import Path

import pytest
import torch

from slmrl_ray.checks import (
    TrainingCheckError,
    assert_changed,
    assert_finite_state,
    assert_responses_nonempty,
    trainable_snapshot,
)
from slmrl_ray.data import PreferencePair, load_jsonl
from slmrl_ray.generation import SamplingSettings, decode_responses, generate, response_mask_from_eos
from slmrl_ray.models import align_with_tokenizer, base_model_path, ensure_pad_token, load_causal_lm, load_tokenizer

CPU = torch.device("cpu")


# ------------------------------------------------------------------ models and tokenizers


def test_pad_token_is_added_when_it_equals_eos(neox_run):
    config, paths, _ = neox_run
    tokenizer = load_tokenizer(paths.sft / "model")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.pad_token = tokenizer.eos_token  # what many hub tokenizers ship with
    size = len(tokenizer)
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and len(tokenizer) == size
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    model = load_causal_lm(paths.sft / "model", load_tokenizer(paths.sft / "model"))
    align_with_tokenizer(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_hub_id_loads_from_a_hub_snapshot_folder(neox_run, session_dir):
    """The real hub path (hub id -> cache snapshot), offline, on a folder laid out like the hub's."""
    config, _, _ = neox_run
    built = base_model_path(config.model_config, config.cache_dir)
    repo = session_dir / "hub" / "models--EleutherAI--pythia-70m-deduped"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(built, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)

    hub_tokenizer = load_tokenizer("EleutherAI/pythia-70m-deduped")
    hub_model = load_causal_lm("EleutherAI/pythia-70m-deduped", hub_tokenizer)
    local_tokenizer = load_tokenizer(built)
    local_model = load_causal_lm(built, local_tokenizer)
    ids = torch.tensor([hub_tokenizer("Once upon a time")["input_ids"]])
    assert ids.tolist() == [local_tokenizer("Once upon a time")["input_ids"]]
    torch.testing.assert_close(hub_model(ids).logits, local_model(ids).logits)


def test_tiny_models_are_cached(neox_run):
    config, _, _ = neox_run
    first = base_model_path(config.model_config, config.cache_dir)
    first_file = Path(first) / "model.safetensors"
    stamp = first_file.stat().st_mtime_ns
    assert base_model_path(config.model_config, config.cache_dir) == first
    assert first_file.stat().st_mtime_ns == stamp



def test_two_builders_of_one_tiny_model_pretrain_it_once(tmp_path, monkeypatch):
    """Cells of one model start side by side in a grid: the second waits for the first's build."""
    from slmrl_ray import tiny
    from slmrl_ray.config import TinyModelConfig

    calls, started = [], threading.Event()
    real_pretrain = tiny.pretrain

    def slow_pretrain(*args):
        calls.append(threading.get_ident())
        started.set()
        threading.Event().wait(0.5)  # the other builder arrives while this one trains
        return real_pretrain(*args)

    monkeypatch.setattr(tiny, "pretrain", slow_pretrain)
    cfg = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=300,
                          pretrain_documents=20, pretrain_steps=2, pretrain_batch_size=2)
    results = []
    first = threading.Thread(target=lambda: results.append(tiny.tiny_model_dir("gpt_neox", cfg, tmp_path)))
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=lambda: results.append(tiny.tiny_model_dir("gpt_neox", cfg, tmp_path)))
    second.start()
    first.join(120)
    second.join(120)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / "model.safetensors").is_file()

# ------------------------------------------------------------------ generation


def test_left_padded_batch_matches_one_prompt_at_a_time(neox_run):
    _, paths, _ = neox_run
    tokenizer = load_tokenizer(paths.sft / "model")
    model = load_causal_lm(paths.sft / "model", tokenizer).eval()
    prompts = ["Once upon a time", "The town of", "Once upon a time, there was a little dog named Max who"]
    greedy = SamplingSettings(max_new_tokens=12, greedy=True)
    batched = generate(model, tokenizer, prompts, greedy, 64, CPU)
    assert batched.query_mask[0, 0] == 0  # left padding happened
    lengths = batched.response_mask.sum(dim=1)
    assert (lengths > 1).all(), "every prompt gets a non-empty response"
    for row, prompt in enumerate(prompts):
        alone = generate(model, tokenizer, [prompt], greedy, 64, CPU)
        n = int(alone.response_mask.sum())
        assert batched.response_ids[row, :n].tolist() == alone.response_ids[0, :n].tolist(), prompt
    assert all(text.strip() for text in decode_responses(tokenizer, batched))


def test_a_seeded_row_samples_the_same_alone_and_in_any_batch(neox_run):
    _, paths, _ = neox_run
    tokenizer = load_tokenizer(paths.sft / "model")
    model = load_causal_lm(paths.sft / "model", tokenizer).eval()
    settings = SamplingSettings(max_new_tokens=16, temperature=0.9, top_p=0.95)
    seeded = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731

    def sample(prompts, generators):
        out = generate(model, tokenizer, prompts, settings, 64, CPU, generators)
        return [ids[mask.bool()].tolist() for ids, mask in zip(out.response_ids, out.response_mask)]

    (alone,) = sample(["The town of"], [seeded(7)])
    torch.manual_seed(123)  # the global RNG moves on under the unseeded rows; the seeded one ignores it
    batched = sample(["Once upon a time", "The town of", "A long prompt about a dog named Max who"],
                     [None, seeded(7), seeded(8)])
    assert batched[1] == alone and len(alone) > 3
    assert sample(["The town of"], [seeded(8)])[0] != alone  # the seed decides the sample
    # The warpers still apply: top-p this small leaves only the most likely token, as greedy does.
    narrow = SamplingSettings(max_new_tokens=16, temperature=0.9, top_p=1e-6)
    greedy = generate(model, tokenizer, ["The town of"], SamplingSettings(16, greedy=True), 64, CPU)
    forced = generate(model, tokenizer, ["The town of"], narrow, 64, CPU, [seeded(1)])
    assert forced.response_ids.tolist() == greedy.response_ids.tolist()
    # A temperature too small to divide the logits by (the fuzz test's 2.2e-308) decodes greedily.
    subnormal = SamplingSettings(16, temperature=2.2250738585072014e-308)
    for generators in (None, [seeded(1)]):
        tiny = generate(model, tokenizer, ["The town of"], subnormal, 64, CPU, generators)
        assert tiny.response_ids.tolist() == greedy.response_ids.tolist()


def test_rows_with_different_settings_share_a_generate_call_and_each_ends_on_its_own(neox_run):
    """The serving engine: greedy, seeded and penalised rows in one batch, each with its own
    length and stop strings; its log-probabilities are the policy's own."""
    from slmrl_ray.generation import RowSettings, generate_rows

    _, paths, _ = neox_run
    tokenizer = load_tokenizer(paths.sft / "model")
    model = load_causal_lm(paths.sft / "model", tokenizer).eval()
    greedy = RowSettings(max_new_tokens=20, temperature=0, logprobs=True)
    seeded = lambda seed, n=12: RowSettings(n, 0.9, 0.95, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    prompts = ["Once upon a time", "The town of", "A dog named Max", "The town of"]
    rows = [greedy, seeded(7), RowSettings(6, 1.0, frequency_penalty=2.0, presence_penalty=1.0), seeded(7, 20)]
    batch = generate_rows(model, tokenizer, prompts, rows, 64, CPU)

    offline = generate(model, tokenizer, prompts[:1], SamplingSettings(20, greedy=True), 64, CPU)
    assert batch[0].token_ids == offline.response_ids[0][offline.response_mask[0].bool()].tolist()
    assert "".join(batch[0].pieces) == decode_responses(tokenizer, offline)[0]  # incremental = whole decode
    (alone,) = generate_rows(model, tokenizer, ["The town of"], [seeded(7)], 64, CPU)
    assert batch[1].token_ids == alone.token_ids  # the seed alone decides, whatever shares the batch
    for row, output in zip(rows, batch):  # each row to its own length (or its EOS)
        assert len(output.token_ids) == row.max_new_tokens or output.finish_reason == "stop"
        assert len(output.token_ids) <= row.max_new_tokens

    # Log-probabilities: the raw model's, as a forward pass over prompt + response gives them.
    prompt_ids = tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        forward = torch.log_softmax(model(torch.tensor([prompt_ids + batch[0].token_ids])).logits[0].float(), -1)
    for step, (token, logits) in enumerate(zip(batch[0].token_ids, batch[0].logits)):
        assert torch.log_softmax(logits, -1)[token].item() == pytest.approx(
            forward[len(prompt_ids) - 1 + step, token].item(), abs=1e-4)
    assert batch[1].logits is None

    # A stop string ends its row inside the loop (fewer tokens, finish "stop") and is never sent,
    # not even the part of it that came first.
    text, pieces = "".join(batch[0].pieces), batch[0].pieces
    # A stop string across two tokens: the end of one piece and the start of the next. Its first
    # character comes with a token of its own and must wait until the next shows it is a stop.
    boundaries = [sum(map(len, pieces[:k + 1])) for k in range(1, len(pieces) - 1)]
    stop, at = next((text[b - 1:b + 2], b - 1) for b in boundaries
                    if len(text[b - 1:b + 2]) == 3 and text.find(text[b - 1:b + 2]) == b - 1)
    assert text.index(stop) == at
    sent = []
    (stopped,) = generate_rows(model, tokenizer, prompts[:1], [RowSettings(20, 0, stop=(stop,))], 64, CPU,
                               on_piece=lambda row, piece: sent.append(piece))
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < len(batch[0].token_ids)
    assert "".join(sent) == "".join(stopped.pieces) == text[: text.index(stop)]

    # Cancelling a row (its client went away) ends it at the next step; the others go on.
    cancel = threading.Event()

    def cancel_after_three(row, piece):
        if row == 0 and len(sent_before_cancel) == 2:
            cancel.set()
        if row == 0:
            sent_before_cancel.append(piece)

    sent_before_cancel = []
    steps = []
    cancelled, other = generate_rows(model, tokenizer, prompts[:2], [RowSettings(20, 0, cancel=cancel),
                                                                      RowSettings(12, 0)], 64, CPU,
                                     on_piece=cancel_after_three, on_step=steps.append)
    assert cancelled.finish_reason == "abort" and len(cancelled.token_ids) <= 4
    assert len(other.token_ids) == 12 or other.finish_reason == "stop"
    assert sum(steps) == len(cancelled.token_ids) + len(other.token_ids)  # the live token count


def test_the_first_eos_ends_a_response():
    eos = 9
    ids = torch.tensor([[5, 6, eos, 7, eos], [5, 6, 7, 8, 1]])
    assert response_mask_from_eos(ids, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


# ------------------------------------------------------------------ training formats


def test_reward_model_trains_on_exactly_what_it_scores(neox_run):
    """Separator and EOS: the RewardTrainer's token ids are the scorer's, and the score matches."""
    from slmrl_ray.models import load_reward_model
    from slmrl_ray.scoring import RewardScorer, encode_reward_text
    from slmrl_ray.stages.reward import build_reward_trainer

    config, paths, _ = neox_run
    pairs = load_jsonl(paths.data / "pairs_train.jsonl", PreferencePair)
    trainer = build_reward_trainer(config, paths, pairs)
    tokenizer = trainer.processing_class
    for i in range(5):
        row = trainer.train_dataset[i]
        expected = encode_reward_text(tokenizer, pairs[i].prompt, pairs[i].chosen, config.reward.max_length)
        assert row["chosen_ids"] == expected
        assert row["chosen_ids"][-1] == tokenizer.eos_token_id
        assert "\n\n" in tokenizer.decode(row["chosen_ids"])
    rm_tokenizer = load_tokenizer(paths.reward / "model")
    model = load_reward_model(paths.reward / "model", rm_tokenizer)
    scorer = RewardScorer(model, rm_tokenizer, config.reward.max_length, 4, CPU)
    ids = torch.tensor([encode_reward_text(rm_tokenizer, pairs[0].prompt, pairs[0].chosen, config.reward.max_length)])
    direct = model(input_ids=ids).logits[0, 0]
    batched = scorer.score([p.prompt for p in pairs[:6]], [p.chosen for p in pairs[:6]])
    assert float(batched[0]) == pytest.approx(float(direct), abs=1e-4)


def test_sft_keeps_eos_in_the_loss(neox_run):
    from slmrl_ray.stages.sft import build_sft_trainer

    config, paths, _ = neox_run
    trainer = build_sft_trainer(config, paths)
    tokenizer = trainer.processing_class
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labels = batch["labels"]
    assert (labels == tokenizer.eos_token_id).sum() >= 4, "EOS must be a training target"


# ------------------------------------------------------------------ checks


def test_untrained_or_broken_models_are_errors_not_warnings():
    model = torch.nn.Linear(2, 2)
    before = trainable_snapshot(model)
    with pytest.raises(TrainingCheckError, match="did not change"):
        assert_changed(before, model, "SFT")
    model.requires_grad_(False)
    with pytest.raises(TrainingCheckError, match="no trainable parameters"):
        trainable_snapshot(model)
    with pytest.raises(TrainingCheckError, match="non-finite"):
        assert_finite_state({"w": torch.tensor([1.0, math.inf])}, "checkpoint")
    responses = ["", " \n", "The dog ran."]  # two of three decode to nothing but whitespace
    with pytest.raises(TrainingCheckError, match="empty"):
        assert_responses_nonempty(responses, max_empty_fraction=0.5)
    assert assert_responses_nonempty(responses, max_empty_fraction=0.7) == pytest.approx(2 / 3)


def test_random_initialisations_do_not_depend_on_what_the_process_ran_before(neox_run):
    """A retried Tune trial may land in a reused Ray worker whose random state has moved on:
    the RM's score head and LoRA, and PPO's LoRA and value head, must still start the same."""
    from slmrl_ray.stages.ppo import build_components
    from slmrl_ray.stages.reward import build_reward_trainer, training_pairs

    config, paths, _ = neox_run
    pairs = training_pairs(config, paths)["model"]

    def reward_start(state: int) -> dict:
        torch.manual_seed(state)  # stands in for whatever ran before in this process
        model = build_reward_trainer(config, paths, pairs).model
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def ppo_start(state: int) -> dict:
        torch.manual_seed(state)
        return {k: v.detach().clone() for k, v in build_components(config, paths).model.trainable_parameters().items()}

    for start in (reward_start, ppo_start):
        first, second = start(1), start(2)
        assert first.keys() == second.keys() and any("lora_A" in k for k in first)
        for name in first:
            torch.testing.assert_close(first[name], second[name], msg=name)
