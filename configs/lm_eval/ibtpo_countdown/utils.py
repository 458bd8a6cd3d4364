"""Hooks of the ibtpo_countdown lm-eval task: the prompt, and scoring with the RL verifier."""
from ibtpo_core.algo.rewards import countdown_reward
from ibtpo_core.data.countdown import format_prompt


def doc_to_text(doc: dict) -> str:
    return format_prompt(doc["numbers"], doc["target"])


def doc_to_target(doc: dict) -> str:
    return str(doc["target"])


def process_results(doc: dict, results: list[str]) -> dict:
    return {"acc": countdown_reward(results[0], doc)}
