"""The progress bar of `make bench` (tqdm, an optional dependency installed by `make bench`).

One tick per measured (path, shape, pass) or sweep point; its result is printed above the
bar. The bar is drawn on a terminal; where stderr is a file or a pipe (a log), or tqdm is
not installed (the run says so once), each result line carries the count and the elapsed
time instead.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "norm_fast bench"):
        self.total, self.done, self.start = max(1, total), 0, time.time()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
            print("(tqdm is not installed: plain progress lines; `make bench` installs it)",
                  file=sys.stderr, flush=True)
        else:
            self.bar = tqdm(total=self.total, desc=desc, unit="measurement", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0, leave=True, disable=None,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}] {postfix}")

    def doing(self, text: str) -> None:
        """What is being measured now (shown beside the bar)."""
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(text[:60], refresh=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def item(self, label: str, result: str) -> None:
        self.done += 1
        if self.bar is not None and not self.bar.disable:
            self.bar.update(1)
            self.bar.write(f"{label}: {result}", file=sys.stderr)
        else:
            print(f"[{self.done:>3}/{self.total}] {time.time() - self.start:6.0f}s  {label}: "
                  f"{result}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
