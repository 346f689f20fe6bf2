"""Evaluation stage: the study's metrics for the SFT and PPO policies (SPEC 1.4).

Both policies answer the same held-out prompts with the same seeded sampling (each
prompt batch gets the same seed for both, so differences come from the policies, not
the dice) and are scored by the same reward model. Reported per policy: token-weighted
perplexity over prompt + "\\n\\n" + reference, reward mean/std(population)/min/max,
distinct-1/2/3, ROUGE-1/2/L F1 and BLEU (the real score, plus the 4-gram precision the
study reported as "BLEU-4"); and across them: delta reward, the analytical win rate
Phi(delta / sqrt(s_sft^2 + s_ppo^2)) and a paired empirical win rate with a bootstrap
95% interval. Writes `evaluation_results.json` and `samples_<policy>.jsonl`.

The reward is the configured reward source (`rewards:`, the one PPO trained on) with its
components (reward model, each rule). With a judge (`judge:`, a reward model PPO never
saw), the judge's delta and paired win rate with its interval, its gap to the training
reward's, the judge's own accuracy on the data stage's held-out preference pairs, and
reward-hacking flags (much longer or shorter responses, collapsing distinct-2, a reward
gain the judge does not confirm).

`gold` is a model-free check: each response's ROUGE-L F1 against the document's real
continuation (the example's `reference`), paired per prompt. It is reported beside the
reward and never enters the confirm rule (`pipeline.confirmed_gain`), which rests on the
training reward's and the judge's paired intervals and both models' held-out accuracy.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from slmrl_ray import metrics
from slmrl_ray.artifacts import Reporter, RunPaths, no_report, write_json
from slmrl_ray.config import EvalConfig, PipelineConfig
from slmrl_ray.data import RESPONSE_SEPARATOR, EvalExample, PreferencePair, load_jsonl, save_jsonl
from slmrl_ray.device import resolve_device
from slmrl_ray.generation import SamplingSettings, decode_responses, generate
from slmrl_ray.models import load_causal_lm, load_tokenizer
from slmrl_ray.rewards import build_judge, build_reward
from slmrl_ray.scoring import pairwise_accuracy

POLICIES = ("sft", "ppo")


def sample_responses(model, tokenizer, prompts: list[str], cfg: EvalConfig, device, desc: str) -> list[str]:
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    responses: list[str] = []
    for index, start in enumerate(tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, unit="batch")):
        torch.manual_seed(cfg.seed + index)  # same seed per batch for every policy
        batch = prompts[start : start + cfg.batch_size]
        gen = generate(model, tokenizer, batch, settings, cfg.max_prompt_length, device)
        responses.extend(decode_responses(tokenizer, gen))
    return responses


@torch.no_grad()
def perplexity(model, tokenizer, examples: list[EvalExample], max_length: int, batch_size: int, device) -> float:
    """Token-weighted perplexity of prompt + separator + reference, truncated to `max_length`."""
    nll_sums, counts = [], []
    texts = [e.prompt + RESPONSE_SEPARATOR + e.reference for e in examples]
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(t, add_special_tokens=False)["input_ids"][:max_length]
            for t in texts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(device)
        token_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask[:, 1:].to(device)
        nll_sums.extend(token_nll.sum(dim=1).tolist())
        counts.extend(mask[:, 1:].sum(dim=1).tolist())
    return metrics.token_weighted_perplexity(nll_sums, counts)


def policy_metrics(responses: list[str], references: list[str], rewards: list[float], ppl: float) -> dict:
    return {
        "perplexity": ppl,
        "reward": metrics.reward_summary(rewards),
        **{f"distinct_{n}": metrics.distinct_n(responses, n) for n in (1, 2, 3)},
        **metrics.rouge_scores(responses, references),
        **metrics.bleu_scores(responses, references),
        "response_chars_mean": sum(len(r) for r in responses) / max(len(responses), 1),
    }


def compare(sft: dict, ppo: dict, sft_rewards, ppo_rewards, cfg: EvalConfig) -> dict:
    delta = ppo["reward"]["mean"] - sft["reward"]["mean"]
    win_rate = metrics.analytical_win_rate(
        sft["reward"]["mean"], sft["reward"]["std"], ppo["reward"]["mean"], ppo["reward"]["std"]
    )
    paired = metrics.paired_win_rate(ppo_rewards, sft_rewards, cfg.num_bootstrap, seed=cfg.seed)
    return {"delta_reward": delta, "analytical_win_rate": win_rate, "paired_win_rate": paired}


def split_prompts(count: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Prompt indices for a search's objective (validation) and for the reported results (test).

    A fixed, seeded draw of `validation_fraction` of the prompts; with 0 (a grid) every prompt is a
    test prompt. A search tunes on one share and reports the other, so its table is not the
    number it was tuned to maximise.
    """
    size = round(count * validation_fraction)
    if validation_fraction > 0 and not 0 < size < count:
        raise ValueError(f"eval.validation_fraction={validation_fraction} of {count} prompts leaves "
                         f"an empty validation or test share")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:size]), sorted(order[size:])


def run_eval(config: PipelineConfig, paths: RunPaths, report: Reporter = no_report) -> dict:
    cfg, device = config.eval, resolve_device(config.device)
    examples = load_jsonl(paths.data / "eval.jsonl", EvalExample)[: cfg.num_prompts]
    prompts, references = [e.prompt for e in examples], [e.reference for e in examples]
    validation, test = split_prompts(len(examples), cfg.validation_fraction, cfg.seed)
    scorer = build_reward(config.rewards, config.reward, paths.reward, device)
    judge = build_judge(config.judge, config.reward, paths.reward, device)
    results, rewards, judged, gold = {}, {}, {}, {}
    for policy in POLICIES:
        folder = paths.stage(policy) / "model"
        tokenizer = load_tokenizer(folder)
        model = load_causal_lm(folder, tokenizer, device=device).eval()
        responses = sample_responses(model, tokenizer, prompts, cfg, device, desc=f"eval {policy}")
        components = scorer.components(prompts, responses)
        rewards[policy] = scorer.total(components).tolist()
        ppl = perplexity(model, tokenizer, [examples[i] for i in test], cfg.ppl_max_length, cfg.batch_size, device)
        results[policy] = policy_metrics([responses[i] for i in test], [references[i] for i in test],
                                         [rewards[policy][i] for i in test], ppl)
        results[policy]["reward_components"] = {name: float(v[test].mean()) for name, v in components.items()}
        gold[policy] = metrics.rouge_f1_per_example([responses[i] for i in test], [references[i] for i in test],
                                                    keys=("rougeL",))["rougeL"]
        samples = [
            {"prompt": p, "reference": r, "response": s, "reward": w}
            for p, r, s, w in zip(prompts, references, responses, rewards[policy])
        ]
        if judge is not None:
            judged[policy] = judge.score(prompts, responses).tolist()
            results[policy]["judge_reward"] = metrics.reward_summary([judged[policy][i] for i in test])
            samples = [{**sample, "judge": j} for sample, j in zip(samples, judged[policy])]
        if validation:
            shares = set(validation)
            samples = [{**sample, "split": "validation" if i in shares else "test"} for i, sample in enumerate(samples)]
        save_jsonl(paths.eval / f"samples_{policy}.jsonl", samples)
    pick = lambda values, indices: [values[i] for i in indices]  # noqa: E731
    comparison = compare(results["sft"], results["ppo"], pick(rewards["sft"], test), pick(rewards["ppo"], test), cfg)
    if judge is not None:
        comparison["judge"] = judge_comparison(results["sft"], results["ppo"],
                                               {p: pick(v, test) for p, v in judged.items()}, cfg)
        # The judge's own accuracy, split or external, on the pairs no pipeline model trained on.
        heldout_pairs = load_jsonl(paths.data / "pairs_heldout.jsonl", PreferencePair)
        comparison["judge"].update(pairwise_accuracy(judge, heldout_pairs))
    comparison["gold"] = gold_comparison(gold, cfg)
    if validation:
        comparison["validation"] = validation_summary(
            {p: pick(v, validation) for p, v in rewards.items()},
            {p: pick(v, validation) for p, v in judged.items()}, cfg)
    comparison["hacking_flags"] = hacking_flags(results["sft"], results["ppo"], comparison, cfg)
    evaluation = {"model": config.model, "corpus": config.corpus, "num_prompts": len(test),
                  **results, **comparison}
    write_json(paths.eval / "evaluation_results.json", evaluation)
    report({"eval/delta_reward": comparison["delta_reward"],
            "eval/win_rate": comparison["analytical_win_rate"],
            "eval/paired_win_rate": comparison["paired_win_rate"]["win_rate"],
            **({"eval/judge_delta": comparison["judge"]["delta"]} if judge is not None else {}),
            "eval/hacking_flags": len(comparison["hacking_flags"])})
    return evaluation


def validation_summary(rewards: dict[str, list[float]], judged: dict[str, list[float]], cfg: EvalConfig) -> dict:
    """What a search's objective reads: the reward (and judge) deltas on the validation prompts."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    summary = {"num_prompts": len(rewards["sft"]), "delta_reward": mean(rewards["ppo"]) - mean(rewards["sft"]),
               "paired_win_rate": metrics.paired_win_rate(rewards["ppo"], rewards["sft"], cfg.num_bootstrap,
                                                          seed=cfg.seed)}
    if judged:
        summary["judge"] = {"delta": mean(judged["ppo"]) - mean(judged["sft"])}
    return summary


def _standardized_delta(sft: dict, ppo: dict) -> float:
    """PPO - SFT mean in units of their pooled standard deviation (comparable across reward scales)."""
    pooled = ((sft["std"] ** 2 + ppo["std"] ** 2) / 2) ** 0.5
    return (ppo["mean"] - sft["mean"]) / pooled if pooled > 0 else 0.0


def judge_comparison(sft: dict, ppo: dict, judged: dict[str, list[float]], cfg: EvalConfig) -> dict:
    """The judge's delta and win rate beside the training reward's, and the gap between them.

    `gap` = standardized training-reward delta - standardized judge delta: how much of the
    gain the policy was trained on a reward model it never saw does not confirm.
    """
    reward_delta = _standardized_delta(sft["reward"], ppo["reward"])
    judge_delta = _standardized_delta(sft["judge_reward"], ppo["judge_reward"])
    paired = metrics.paired_win_rate(judged["ppo"], judged["sft"], cfg.num_bootstrap, seed=cfg.seed)
    return {
        "delta": ppo["judge_reward"]["mean"] - sft["judge_reward"]["mean"],
        "standardized_delta": judge_delta,
        "reward_standardized_delta": reward_delta,
        "gap": reward_delta - judge_delta,
        "paired_win_rate": paired,
    }


def gold_comparison(gold: dict[str, list[float]], cfg: EvalConfig) -> dict:
    """Both policies' mean per-prompt ROUGE-L F1 against the real continuation, its delta and the
    paired win rate with its bootstrap interval. Reported only: no model scores it, so no model
    can be gamed into it, but a continuation is not the only good answer."""
    sft, ppo = (sum(gold[policy]) / len(gold[policy]) for policy in POLICIES)
    return {
        "metric": "rougeL_f1",
        "sft": sft,
        "ppo": ppo,
        "delta": ppo - sft,
        "paired_win_rate": metrics.paired_win_rate(gold["ppo"], gold["sft"], cfg.num_bootstrap, seed=cfg.seed),
    }


def hacking_flags(sft: dict, ppo: dict, comparison: dict, cfg: EvalConfig) -> list[str]:
    """Likely reward hacking: responses much longer or much shorter than SFT's, collapsing
    diversity, or a reward gain that the judge does not confirm."""
    flags = []
    length_ratio = ppo["response_chars_mean"] / max(sft["response_chars_mean"], 1e-9)
    if length_ratio > cfg.hacking_length_ratio:
        flags.append(f"length: PPO responses are {length_ratio:.2f}x SFT's (limit {cfg.hacking_length_ratio})")
    if length_ratio < cfg.hacking_short_ratio:
        flags.append(f"short: PPO responses are {length_ratio:.2f}x SFT's (limit {cfg.hacking_short_ratio})")
    distinct_ratio = ppo["distinct_2"] / max(sft["distinct_2"], 1e-9)
    if distinct_ratio < cfg.hacking_distinct_ratio:
        flags.append(f"distinct-2: PPO has {distinct_ratio:.2f}x SFT's (limit {cfg.hacking_distinct_ratio})")
    judge = comparison.get("judge")
    if judge is not None and comparison["delta_reward"] > 0 and judge["delta"] <= 0:
        flags.append(f"judge: training reward up {comparison['delta_reward']:+.3f} "
                     f"but the judge does not confirm it ({judge['delta']:+.3f})")
    return flags
