"""A callback that SIGKILLs its own process at a given training batch: a crash mid-epoch, on cue."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
