"""Scoring for the generate_until task: computed here, so no metric is fetched from a hub."""


def process_gen(doc: dict, results: list[str]) -> dict[str, float]:
    answer = results[0].strip().lower()
    target = doc["target"].lower()
    return {"exact_match": float(answer == target), "contains": float(target in answer)}
