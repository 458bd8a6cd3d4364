"""Hooks of the ibtpo_countdown lm-eval task: the prompt, and scoring with the RL verifier.

The task reads the run's own test split, so any prepared rows work here (the built-in countdown
task, math datasets, reasoning-gym problems), each scored by the verifier its row names."""
from ibtpo_core.data.problems import prompt_text, row_verifier


def doc_to_text(doc: dict) -> str:
    return prompt_text(doc)


def doc_to_target(doc: dict) -> str:
    return str(doc.get("answer", doc.get("target")))


def process_results(doc: dict, results: list[str]) -> dict:
    return {"acc": row_verifier(doc, "countdown")(results[0], doc)}
