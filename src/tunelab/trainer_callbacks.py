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
        # On resume, the file becomes exactly what was logged up to the checkpoint we restart from (the Trainer
        # restored that log history with it): lines logged after it — or after the last step, such as the
        # end-of-training summary of a run killed while saving its model — would otherwise appear twice.
        if state.is_world_process_zero and (self.path.exists() or state.log_history):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(self._record(h["step"], h.get("epoch"), h)) + "\n"
                                   for h in state.log_history))
            tmp.replace(self.path)

    @staticmethod
    def _record(step, epoch, logs: dict) -> dict:
        return {"step": step, "epoch": round(epoch or 0, 4), **{k: v for k, v in logs.items() if k != "step"}}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = self._record(state.global_step, state.epoch, logs)
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


class TrainClock(TrainerCallback):
    """Training time across the parts of a resumed run: each checkpoint records the training seconds up to it
    (`tunelab_clock.json`), and a resumed run starts its count from the checkpoint it restarts from. Time spent
    after the last checkpoint of a killed part is work that was lost and is redone, so it is not counted."""

    FILE = "tunelab_clock.json"

    def __init__(self, resume_from: str | None):
        self.before = 0.0
        if resume_from:
            try:
                self.before = float(json.loads((Path(resume_from) / self.FILE).read_text())["train_s"])
            except (OSError, ValueError, KeyError):
                self.before = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        import time

        self._t0 = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        import time

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / self.FILE).write_text(json.dumps({"train_s": self.before + time.perf_counter() - self._t0}))
