"""Trainer callbacks: every log line to metrics.jsonl, and a progress bar that shows the loss (rl: the reward)."""
from __future__ import annotations

import json
import time
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


class LoadPhase(TrainerCallback):
    """Peak memory up to the first step (model, data, trainer) as the manifest's `load` phase, apart from `train`."""

    def on_train_begin(self, args, state, control, **kwargs):
        from .memory import split

        split("load")


class ProgressFile(TrainerCallback):
    """RUN/progress.json after every optimizer step: step, total steps, seconds since training began and the
    estimated seconds left — what `tunelab ui` shows while a run trains (written atomically)."""

    def __init__(self, path: Path):
        self.path, self.began, self.first_step = path, None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.began, self.first_step = time.time(), state.global_step  # a resumed run starts at its checkpoint
        self._write(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._write(state)

    def _write(self, state):
        if not state.is_world_process_zero or self.began is None:
            return
        elapsed = time.time() - self.began
        done = state.global_step - self.first_step
        left = (state.max_steps - state.global_step) * elapsed / done if done > 0 else None
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"step": state.global_step, "max_steps": state.max_steps,
                                   "elapsed_s": round(elapsed, 1), "eta_s": None if left is None else round(left, 1),
                                   "updated": time.time()}))
        tmp.replace(self.path)


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


class TrainClock(TrainerCallback):
    """Training time, in total and per epoch, across the parts of a resumed run, and the part of it spent on the
    validation passes the Trainer runs during training (`validation_s`, from their `eval_runtime`). Each checkpoint
    records the times up to it (`tunelab_clock.json`) and a resumed run counts on from the checkpoint it restarts
    from; time spent after the last checkpoint of a killed part is work that is redone, so it is not counted. With
    evaluation per epoch the Trainer evaluates after on_epoch_end, so an epoch's time leaves evaluation out; with
    evaluation every N steps it is included."""

    FILE = "tunelab_clock.json"

    def __init__(self, resume_from: str | None):
        saved = {}
        if resume_from:
            try:
                saved = json.loads((Path(resume_from) / self.FILE).read_text())
            except (OSError, ValueError):
                saved = {}
        self.before = float(saved.get("train_s", 0.0))
        self.epoch_s: list[float] = list(saved.get("epoch_s", []))
        self.validation_s = float(saved.get("validation_s", 0.0))
        self._carry = float(saved.get("epoch_partial_s", 0.0))  # the resumed epoch's time before the checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._e0 = time.perf_counter()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._e0 = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epoch_s.append(round(self._carry + time.perf_counter() - self._e0, 3))
        self._carry = 0.0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.validation_s += float((metrics or {}).get("eval_runtime") or 0.0)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            now = time.perf_counter()
            (folder / self.FILE).write_text(json.dumps({
                "train_s": self.before + now - self._t0, "epoch_s": self.epoch_s, "validation_s": self.validation_s,
                "epoch_partial_s": self._carry + now - self._e0}))
