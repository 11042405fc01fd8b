"""A byte-count progress bar on stderr (bytes, speed, time left)."""

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


class ProgressBar:
    """A `progress(done_bytes, total_bytes)` hook that draws a bar on stderr. The bar
    appears with the first call, so work refused up front prints only its error line."""

    def __init__(self, description: str):
        self.description = description
        self.bar = self.task = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            columns = (TextColumn(self.description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeRemainingColumn())
            self.bar = Progress(*columns, console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
