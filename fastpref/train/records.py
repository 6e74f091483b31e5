"""``metrics.jsonl`` of a run: one JSON record a line, appended, read back (a half-written last line left
out), rewritten atomically to the records before a resumed checkpoint. A part of
:class:`~fastpref.train.outputs.Outputs` (it uses the folder's ``metrics`` path, ``d``, ``own`` and
``replace_text``)."""
from __future__ import annotations

import json
from typing import Callable

from .atomic import finite, writing


class MetricRecords:
    """The ``metrics.jsonl`` methods of :class:`~fastpref.train.outputs.Outputs`."""

    def record(self, rec: dict) -> None:
        """Append one record to metrics.jsonl."""
        if self.d.main:
            self.own(self.metrics)
            with writing(self.metrics), open(self.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(finite(rec)) + "\n")

    def records(self) -> list[dict]:
        """The records of metrics.jsonl so far ([] without the file); a line that does not parse (one a killed
        run left half-written) is left out."""
        if not self.metrics.is_file():
            return []
        out = []
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
        return out

    def find_record(self, match: Callable[[dict], bool]) -> dict | None:
        """The first record of metrics.jsonl that ``match`` accepts (main process; None elsewhere or when none
        does)."""
        if not self.d.main:
            return None
        return next((r for r in self.records() if match(r)), None)

    def keep_records(self, keep: Callable[[dict], bool]) -> list[dict]:
        """Rewrite metrics.jsonl (atomically) with only the records ``keep`` accepts (those written before the
        checkpoint a run resumes from); returns them (main process; [] elsewhere)."""
        if not (self.d.main and self.metrics.is_file()):
            return []
        kept = [r for r in self.records() if keep(r)]
        self.replace_text(self.metrics, "".join(json.dumps(finite(r)) + "\n" for r in kept))
        return kept

    def forget_records(self) -> None:
        """Delete metrics.jsonl (a fresh run in a folder that has an earlier run's records)."""
        if self.d.main:
            self.metrics.unlink(missing_ok=True)
