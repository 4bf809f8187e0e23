"""Hooks of the lmms-eval task: a text-only task has no visuals."""


def doc_to_visual(doc: dict) -> list:
    return []
