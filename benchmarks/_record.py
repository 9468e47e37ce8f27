"""Writing a benchmark's JSON record with the machine it ran on (shared by the benchmark scripts)."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

from jaxsplit.train import machine_info

LOAD_NOTE = ("other jobs on the machine slow timings down: load averages above the core count "
             "before or after mean fewer free cores than cores, and pessimistic timings")


def save_record(path: str | Path, record: dict, load_before: Sequence[float],
                load_after: Sequence[float] | None = None) -> Path:
    """Adds `machine` (with the load averages before and after; after = now when not given), `note`
    and `date` to `record`, and writes it as JSON.

    Returns:
      the path written (its folder is created if missing).
    """
    record = {
        **record,
        "machine": {**machine_info(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in (load_after or os.getloadavg())]},
        "note": LOAD_NOTE,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out
