"""TensorBoard scalars from the solver's own log records: a logging.Handler on the "rloss" logger reads
each record's message as rloss.training_log reads a log file's line, so the solver writes its
numbers once, as Caffe does, and TensorBoard gets the same quantities (`loss`, `lr`, `train/NAME`,
`test#I/NAME`) at their iterations. tensorboard is optional (`pip install tensorboard`)."""

from __future__ import annotations

import logging
from typing import Callable

from rloss.caffe_log import LOGGER_NAME
from rloss.errors import LogError
from rloss.training_log import TrainingLog


class TensorBoardHandler(logging.Handler):
    """Writes the training values of the records it handles as scalars to an event file in `directory`."""

    def __init__(self, directory: str) -> None:
        super().__init__(logging.INFO)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LogError("writing TensorBoard scalars needs the tensorboard package: pip install tensorboard") \
                from None
        self._writer = SummaryWriter(log_dir=directory)
        self._log = TrainingLog()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            point = self._log.feed(record.getMessage())
            if point is not None:
                self._writer.add_scalar(point.quantity, point.value, point.iteration)
        except Exception:  # logging's rule: a handler that fails reports it and never stops the program
            self.handleError(record)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        super().close()


def attach_tensorboard(directory: str) -> Callable[[], None]:
    """Send the "rloss" logger's training values to TensorBoard in `directory`; returns the function
    that detaches the handler and closes its event file. The solver's records reach it at INFO, as
    rloss.caffe_log.setup_logging sets the logger."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = TensorBoardHandler(directory)
    logger.addHandler(handler)

    def detach() -> None:
        logger.removeHandler(handler)
        handler.close()

    return detach
