"""Trainer callbacks: every log line to metrics.jsonl, and a progress bar that shows the loss (rl: the reward)."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class JsonlLogger(TrainerCallback):
    """Append each Trainer log (train loss, lr, eval metrics) to metrics.jsonl with its step and epoch."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, drop lines logged after the checkpoint we restart from; they will be logged again.
        if self.path.exists() and state.is_world_process_zero:
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
            self.path.write_text("".join(line + "\n" for line in keep))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class LossProgress(ProgressCallback):
    """The Trainer's progress bar (steps, eta) with the latest loss beside it, and one line per evaluation."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = f"eval_{metric}"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        if "reward" in logs:  # rl: the policy loss says little; the reward and the KL say how it goes
            self.training_bar.set_postfix(reward=f"{logs['reward']:.3f}", kl=f"{logs.get('kl', 0):.4f}",
                                          lr=f"{logs.get('learning_rate', 0):.2e}")
        elif "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}")
        if "eval_loss" in logs:
            shown = f"epoch {state.epoch:.2f} · eval_loss {logs['eval_loss']:.4f}"
            if self.metric in logs and self.metric != "eval_loss":
                shown += f" · {self.metric} {logs[self.metric]:.4f}"
            self.training_bar.write(shown)


class EpochTimer(TrainerCallback):
    """Wall seconds of each epoch's training steps (for metrics.json and bench/). With evaluation per epoch the
    Trainer evaluates after on_epoch_end, so evaluation is not counted; with evaluation every N steps it is."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        import time

        self._t0 = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        import time

        if hasattr(self, "_t0"):
            self.seconds.append(round(time.perf_counter() - self._t0, 3))
