"""`tunelab eval`: a finished run on a data file, scored by its task; `--base`: a config's untrained model on its
test split (the zero-shot baseline of generative tasks)."""
from __future__ import annotations

import json
from pathlib import Path


def evaluate_run(run_path, data_spec: str, write: bool = True, allow_code: bool = False) -> dict:
    """Evaluate a finished run on a data file read with the run's settings; kept in RUN/evaluations/NAME.json."""
    from .generation import choose
    from .runs import open_finished
    from .tasks import TASKS

    path, config = open_finished(run_path)
    metrics = TASKS[config.task].evaluate_file(path, config, data_spec, allow_code=allow_code,
                                               load_run=open_finished, choose=choose)
    if write:
        out = Path(path) / "evaluations"
        out.mkdir(exist_ok=True)
        name = Path(data_spec.removeprefix("sample:")).stem
        (out / f"{name}.json").write_text(json.dumps({"data": data_spec, **metrics}, indent=2))
    return metrics


def evaluate_base(config_path, overrides=()) -> dict:
    """Test loss/perplexity and generation metrics of a config's *untrained* model on the config's test split,
    computed exactly as a finished run's (the zero-shot baseline)."""
    from .config import load_config
    from .errors import TunelabError
    from .generation import choose
    from .tasks import TASKS, with_trait

    config = load_config(config_path, overrides)
    task = TASKS[config.task]
    if not task.BASELINE:
        raise TunelabError(f"--base evaluates the untrained model of tasks {', '.join(with_trait('BASELINE'))}; "
                           f"for classification the baseline is `method: features` or `method: icl`")
    return {"model": config.model.name, **task.evaluate_base(config, choose=choose)}
