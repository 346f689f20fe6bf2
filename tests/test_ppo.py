"""PPO's update, score shaping, dtype, policy/value model, state, checkpoints and rollback, each checked
on numbers (tiny GPT-NeoX run)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from slmrl_ray.checks import assert_finite_state
from slmrl_ray.device import ppo_dtype
from slmrl_ray.generation import SamplingSettings, generate
from slmrl_ray.models import load_causal_lm, load_tokenizer
from slmrl_ray.rl_math import AdaptiveKLController, RunningMoments
from slmrl_ray.stages.ppo_state import (
    NonFiniteError,
    PPOState,
    initial_state,
    load_checkpoint,
    restore,
    save_checkpoint,
    snapshot,
)

CPU = torch.device("cpu")


def _components(run_copy, **ppo_overrides):
    from slmrl_ray.stages.ppo import build_components

    config, paths = run_copy
    config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, **ppo_overrides))
    return config, build_components(config, paths)


def _trainable(parts) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in parts.model.trainable_parameters().items()}


# ------------------------------------------------------------------ dtype and merging


def test_ppo_runs_in_float32_unless_bf16_is_asked_for(monkeypatch):
    """On a device that reports bf16 support (not only on the CPU, where bf16 never triggers)."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    for params in (70_000_000, 405_000_000, 1_700_000_000):  # both sides of the study's 200M line
        assert ppo_dtype("fp32", params, cuda, 200_000_000) == torch.float32
    assert ppo_dtype("bf16", 70_000_000, cuda, 200_000_000) == torch.bfloat16
    assert ppo_dtype("auto", 70_000_000, cuda, 200_000_000) == torch.float32
    assert ppo_dtype("auto", 405_000_000, cuda, 200_000_000) == torch.bfloat16
    assert ppo_dtype("auto", 405_000_000, CPU, 200_000_000) == torch.float32  # no bf16 on the CPU
    with pytest.raises(RuntimeError, match="does not support"):
        ppo_dtype("bf16", 70_000_000, CPU, 200_000_000)


def test_the_paper_preset_trains_ppo_in_float32():
    from slmrl_ray.config import load_config

    for model in ("pythia-410m", "smollm2-360m"):  # the two cells with the study's largest gains
        assert load_config(preset="paper", overrides=[f"model={model}"]).ppo.precision == "fp32"


def test_a_policy_trained_in_bf16_is_merged_with_its_whole_delta():
    """W + B @ A in bf16 rounds a small delta away; the merge happens in float32."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmrl_ray.stages.ppo_model import PolicyWithValueHead, merge_in_fp32

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=64))
    weight_fp32 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    base.to(torch.bfloat16)
    weight_bf16 = base.model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    model = PolicyWithValueHead(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0))
    layer = model.policy.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # a trained adapter whose delta is ~0.1 % of |W|, as after a short PPO run
        layer.lora_A["default"].weight.normal_(std=0.004)
        layer.lora_B["default"].weight.normal_(std=0.004)
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()).detach()
    assert float(delta.abs().mean() / weight_fp32.abs().mean()) < 3e-3
    merged = merge_in_fp32(model.policy)
    merged_weight = merged.model.layers[0].self_attn.q_proj.weight
    assert merged_weight.dtype == torch.float32
    kept = merged_weight.detach() - weight_bf16
    torch.testing.assert_close(kept, delta, atol=1e-6, rtol=1e-4)
    # What a bf16 merge would have kept: most of the delta rounds away.
    rounded = (weight_bf16.to(torch.bfloat16) + delta.to(torch.bfloat16)).float() - weight_bf16
    assert float((rounded - delta).abs().mean() / delta.abs().mean()) > 0.3


def test_ppo_runs_in_float32_below_the_size_threshold():
    assert ppo_dtype("auto", 70_000_000, CPU, 200_000_000) == torch.float32
    assert ppo_dtype("auto", 1_000_000_000, CPU, 200_000_000) == torch.float32  # no bf16 on the CPU


# ------------------------------------------------------------------ short and empty answers


def test_short_and_empty_responses_are_found_by_tokens_and_by_decoded_text():
    from slmrl_ray.stages.ppo import ended_with_eos, short_responses

    eos, pad = 2, 0
    response_ids = torch.tensor([
        [5, 6, 7, 8, eos],   # 4 tokens: long enough
        [5, 6, eos, pad, pad],  # 2 tokens: short
        [eos, pad, pad, pad, pad],  # nothing but EOS
        [9, 9, 9, 9, 9],     # 5 tokens without EOS, but they decode to whitespace
    ])
    response_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    texts = ["The dog ran home.", "The", "", " \n "]
    ended = ended_with_eos(response_ids, response_mask, eos)
    assert ended.tolist() == [True, True, True, False]
    short = short_responses(response_mask, ended, texts, min_tokens=4)
    assert short.tolist() == [False, True, True, True]
    assert short_responses(response_mask, ended, texts, min_tokens=0).tolist() == [False, False, True, True]


def test_short_responses_get_the_penalty_and_stay_out_of_the_score_statistics():
    from slmrl_ray.config import PPOConfig
    from slmrl_ray.stages.ppo import shaped_scores

    cfg = PPOConfig(score_clip=3.0, short_response_penalty=-2.5, missing_eos_penalty=0.75)
    moments = RunningMoments()
    scores = torch.tensor([1.0, 2.0, 3.0, 50.0])  # the RM loves the empty answer (50.0)
    short = torch.tensor([False, False, False, True])
    unfinished = torch.tensor([False, False, True, False])  # the third hit max_new_tokens
    shaped = shaped_scores(scores, short, unfinished, moments, cfg)
    # Statistics of [1, 2, 3] alone: mean 2, sample std 1.
    assert (moments.mean, moments.std, moments.count) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    torch.testing.assert_close(shaped, torch.tensor([-1.0, 0.0, 1.0 - 0.75, -2.5]))
    # Every response short: the statistics do not move, and every score is the penalty.
    shaped = shaped_scores(torch.tensor([7.0, 8.0]), torch.tensor([True, True]), torch.tensor([True, False]),
                           moments, cfg)
    assert moments.count == 3
    torch.testing.assert_close(shaped, torch.tensor([-2.5, -2.5]))


# ------------------------------------------------------------------ the update


def _rollout(parts, cfg):
    from slmrl_ray.stages.ppo import collect_rollout

    rollout, _ = collect_rollout(parts, cfg, initial_state(cfg), seed=0)
    return rollout


def test_a_minibatch_over_the_ratio_threshold_is_skipped(run_copy):
    from slmrl_ray.stages.ppo import update_policy

    config, parts = _components(run_copy, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1)
    rollout = _rollout(parts, config.ppo)
    # Old log-probabilities 3 nats below the current ones: every ratio is e^3 ~ 20 > 5.
    stale = rollout._replace(logprobs=rollout.logprobs - 3.0 * rollout.response_mask)
    before = _trainable(parts)
    stats = update_policy(parts, stale, config.ppo, seed=0, step=0)
    assert (stats["updates"], stats["skipped_minibatches"]) == (0, 2)
    for name, value in _trainable(parts).items():
        torch.testing.assert_close(value, before[name], msg=name)
    # The same rollout with a threshold it stays under trains both mini-batches.
    loose = dataclasses.replace(config.ppo, ratio_threshold=100.0)
    stats = update_policy(parts, stale, loose, seed=0, step=0)
    assert (stats["updates"], stats["skipped_minibatches"]) == (2, 0)
    assert any(not torch.equal(value, before[name]) for name, value in _trainable(parts).items())


def test_gradients_are_clipped_to_max_grad_norm_before_each_step(run_copy, monkeypatch):
    from slmrl_ray.stages.ppo import update_policy

    config, parts = _components(run_copy, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1,
                                max_grad_norm=1e-3)
    rollout = _rollout(parts, config.ppo)
    params = list(parts.model.trainable_parameters().values())
    norms_at_step, real_step = [], parts.optimizer.step

    def step_and_record(*args, **kwargs):
        norms_at_step.append(float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(parts.optimizer, "step", step_and_record)
    stats = update_policy(parts, rollout, config.ppo, seed=0, step=0)
    assert stats["updates"] == 2 and len(norms_at_step) == 2
    assert stats["grad_norm"] > 10 * config.ppo.max_grad_norm  # the norm before clipping, as logged
    assert max(norms_at_step) <= config.ppo.max_grad_norm * (1 + 1e-4)


def test_a_nan_after_an_update_rolls_back_the_changed_weights_and_optimiser_state(run_copy, monkeypatch):
    """The guard must restore what the failed step already changed, Adam's moments included."""
    import slmrl_ray.stages.ppo as ppo

    config, parts = _components(run_copy, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1)
    cfg, state = config.ppo, initial_state(config.ppo)
    ppo.ppo_step(parts, cfg, state, seed=0)  # one healthy step: Adam has state, the LoRA moved
    state.step += 1
    healthy = snapshot(parts.model, parts.optimizer, state)
    healthy_weights = _trainable(parts)

    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_on_the_second_minibatch(params, max_norm, *args, **kwargs):
        calls.append(1)
        norm = real_clip(params, max_norm, *args, **kwargs)
        return norm * float("nan") if len(calls) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_on_the_second_minibatch)
    with pytest.raises(NonFiniteError, match="gradient norm"):
        ppo.ppo_step(parts, cfg, state, seed=0)
    changed = [n for n, v in _trainable(parts).items() if not torch.equal(v, healthy_weights[n])]
    assert changed, "the first mini-batch of the failed step should have moved the weights"
    adam_steps = [float(s["step"]) for s in parts.optimizer.state.values()]
    assert max(adam_steps) == 3  # two updates in step 1, one in the failed step

    restore(parts.model, parts.optimizer, state, healthy)
    for name, value in _trainable(parts).items():
        torch.testing.assert_close(value, healthy_weights[name], rtol=0, atol=0, msg=name)
    assert max(float(s["step"]) for s in parts.optimizer.state.values()) == 2
    saved = healthy["optimizer"]["state"]
    for index, param_state in parts.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(param_state["exp_avg"], saved[index]["exp_avg"], rtol=0, atol=0)


# ------------------------------------------------------------------ the policy with its value head

def test_ppo_policy_starts_at_the_reference_with_only_lora_and_value_head_trainable(neox_run):
    from peft import LoraConfig

    from slmrl_ray.stages.ppo_model import PolicyWithValueHead

    _, paths, _ = neox_run
    tokenizer = load_tokenizer(paths.sft / "model")
    base = load_causal_lm(paths.sft / "model", tokenizer)
    model = PolicyWithValueHead(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    names = list(model.trainable_parameters())
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)
    gen = generate(model.policy, tokenizer, ["Once upon a time", "The river"], SamplingSettings(8, greedy=True), 32, CPU)
    policy = model.response_outputs(*gen, temperature=1.0)
    with model.reference():
        reference = model.response_outputs(*gen, temperature=1.0, with_values=False)
    torch.testing.assert_close(policy.logprobs, reference.logprobs)


def test_ppo_response_logprobs_match_the_full_forward_pass(neox_run):
    """The policy's head runs on the response positions only; the numbers must equal a full pass's."""
    from peft import LoraConfig

    from slmrl_ray.generation import position_ids_from_mask
    from slmrl_ray.stages.ppo_model import PolicyWithValueHead

    _, paths, _ = neox_run
    tokenizer = load_tokenizer(paths.sft / "model")
    base = load_causal_lm(paths.sft / "model", tokenizer)
    model = PolicyWithValueHead(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    prompts = ["Once upon a time there was a little fox who", "The river"]  # different lengths: left padding
    gen = generate(model.policy, tokenizer, prompts, SamplingSettings(8, temperature=0.7), 32, CPU)
    outputs = model.response_outputs(*gen, temperature=0.7)
    input_ids = torch.cat([gen.query_ids, gen.response_ids], dim=1)
    attention_mask = torch.cat([gen.query_mask, gen.response_mask], dim=1)
    with torch.no_grad():
        logits = model.policy(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask)).logits
    start, width = gen.query_ids.shape[1] - 1, gen.response_ids.shape[1]
    expected = torch.log_softmax(logits[:, start : start + width].float() / 0.7, dim=-1)
    expected = expected.gather(-1, gen.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(outputs.logprobs, expected)
    assert outputs.values.shape == outputs.entropy.shape == gen.response_ids.shape


# ------------------------------------------------------------------ PPO state, rollback and checkpoints

def _toy_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    state = PPOState(step=0, rollbacks=0, moments=RunningMoments(), kl_controller=AdaptiveKLController(0.2, 6, 10_000))
    return model, optimizer, state


def _train_once(model, optimizer, state):
    model(torch.ones(4, 3)).pow(2).sum().backward()
    optimizer.step()
    state.moments.update(torch.tensor([1.0, 2.0, 4.0]))
    state.kl_controller.update(20.0, 32)


def test_rollback_restores_weights_optimiser_statistics_and_kl_controller():
    model, optimizer, state = _toy_state()
    _train_once(model, optimizer, state)
    saved = snapshot(model, optimizer, state)
    reference = json.dumps({"m": state.moments.state_dict(), "k": state.kl_controller.state_dict()})
    weight = model.weight.detach().clone()
    exp_avg = optimizer.state[model.weight]["exp_avg"].clone()
    _train_once(model, optimizer, state)
    assert not torch.equal(model.weight, weight)
    restore(model, optimizer, state, saved)
    assert torch.equal(model.weight, weight)
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], exp_avg)
    assert json.dumps({"m": state.moments.state_dict(), "k": state.kl_controller.state_dict()}) == reference


def test_checkpoint_round_trip_restores_the_whole_training_state(tmp_path):
    model, optimizer, state = _toy_state()
    _train_once(model, optimizer, state)
    state.step, state.rollbacks = 7, 1
    path = save_checkpoint(tmp_path, model, optimizer, state, fingerprint="abc")
    assert sorted(p.name for p in path.iterdir()) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]
    other_model, other_optimizer, other_state = _toy_state()
    load_checkpoint(path, other_model, other_optimizer, other_state)
    assert torch.equal(other_model.weight, model.weight)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(other_optimizer.state[other_model.weight][key], optimizer.state[model.weight][key])
    assert (other_state.step, other_state.rollbacks) == (7, 1)
    assert other_state.moments.state_dict() == state.moments.state_dict()
    assert other_state.kl_controller.value == state.kl_controller.value


def test_an_injected_nan_reward_rolls_back_and_the_run_ends_finite(run_copy, monkeypatch):
    import dataclasses

    from slmrl_ray.scoring import RewardScorer
    from slmrl_ray.stages.ppo import run_ppo

    config, paths = run_copy
    config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, steps=4, checkpoint_every=2))
    real_score, calls = RewardScorer.score, []

    def score_with_a_nan(self, prompts, responses):
        calls.append(len(prompts))
        scores = real_score(self, prompts, responses)
        if len(calls) == 2:  # the second rollout
            scores[3] = float("nan")
        return scores

    monkeypatch.setattr(RewardScorer, "score", score_with_a_nan)
    metrics = run_ppo(config, paths)
    assert metrics["rollbacks"] == 1 and metrics["steps"] == 4
    log = [json.loads(line) for line in (paths.ppo / "log.jsonl").read_text().splitlines()]
    assert "rolled_back" in log[1] and "reward_mean" in log[2]
    from safetensors.torch import load_file

    assert_finite_state(load_file(paths.ppo / "model" / "model.safetensors"), "PPO policy")


def test_too_many_non_finite_steps_stop_the_run(run_copy, monkeypatch):
    import dataclasses

    from slmrl_ray.scoring import RewardScorer
    from slmrl_ray.stages.ppo import PPODivergedError, run_ppo

    config, paths = run_copy
    config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, steps=5, max_rollbacks=2))
    monkeypatch.setattr(RewardScorer, "score", lambda self, p, r: torch.full((len(p),), math.nan))
    with pytest.raises(PPODivergedError, match="max_rollbacks=2"):
        run_ppo(config, paths)
