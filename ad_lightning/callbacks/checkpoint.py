"""When `fit` writes its checkpoint: at epoch ends, every `every_n_steps` optimizer steps or so, and
always when training ends, after the heads were fitted on the final weights.

Saving a checkpoint (about 70 MB, flushed to disk) after every epoch cost more than the epoch itself
on small categories (a demo category trains 5 steps an epoch: 200 saves in a 1000-step run). Saves
stay at epoch ends, so a resumed run restarts an epoch from its beginning, as Lightning's loops expect.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (same arguments), saving at the end of an epoch when at least
    `every_n_steps` steps passed since the last save, and at the end of the last epoch (the module's
    `training_ends()`), whose checkpoint holds the fitted heads `test` loads."""

    def __init__(self, every_n_steps: int = 50, **kwargs) -> None:
        if every_n_steps < 1:
            raise ValueError(f"RunCheckpoint every_n_steps must be >= 1, got {every_n_steps}")
        super().__init__(**kwargs)
        self.every_n_steps = every_n_steps

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, every_n_steps=self.every_n_steps)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        ends = getattr(pl_module, "training_ends", lambda: False)()
        due = trainer.global_step - self._last_global_step_saved >= self.every_n_steps
        if (ends or due) and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer, pl_module) -> None:
        """Nothing: saves happen at epoch ends only."""
