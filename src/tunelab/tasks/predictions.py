"""A finished run's predictions on its held-out splits, for the tasks that score every example (classify,
reward): the metrics of each split, its rows in RUN/predictions_SPLIT.jsonl."""


def evaluate_splits(evaluate, splits, run_path) -> dict:
    """Metrics of validation and test by `evaluate(frame) -> (metrics, rows)`; the rows go to
    RUN/predictions_SPLIT.jsonl."""
    metrics = {}
    for name in ("validation", "test"):
        frame = getattr(splits, name)
        if len(frame):
            metrics[name], rows = evaluate(frame)
            rows.to_json(run_path / f"predictions_{name}.jsonl", orient="records", lines=True, force_ascii=False)
    return metrics
