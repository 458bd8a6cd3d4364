"""Hooks of the AIME avg@k / pass@k tasks: the paper's prompt, and every one of the k sampled
answers scored by the same math verifier as the RL reward (math-verify)."""
from ibtpo_core.data.answers import gold_answer
from ibtpo_core.data.problems import verifier
from ibtpo_core.data.sources import MATH_TEMPLATE


def _field(doc: dict, name: str):
    return doc.get(name, doc.get(name.capitalize()))


def doc_to_text(doc: dict) -> str:
    return MATH_TEMPLATE.replace("{problem}", str(_field(doc, "problem")).strip())


def doc_to_target(doc: dict) -> str:
    return gold_answer(str(_field(doc, "answer")), "plain") or ""


def process_results(doc: dict, results: list) -> dict:
    """``results[0]`` holds the k responses of one problem (the take_first_k filter keeps them
    all). avg@k: the mean reward over them (pass@1 estimated with k samples); pass@k: any
    correct."""
    responses = results[0] if isinstance(results[0], (list, tuple)) else results
    check = verifier("math")
    gold = {"answer": doc_to_target(doc)}
    rewards = [check(r, gold) for r in responses]
    return {"avg_at_k": sum(rewards) / len(rewards), "pass_at_k": float(any(rewards))}
