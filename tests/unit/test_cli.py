"""pipeline.cli.finish: a command's fast exit still does what an exit does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.runs import ROOT

SCRIPT = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pipeline.cli import finish

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
pool = ThreadPoolExecutor(1)  # never shut down: a normal exit's hook does it
pool.submit(lambda: (time.sleep(0.5), (out / "pool").write_text("done")))
threading.Thread(target=lambda: (time.sleep(0.5), (out / "thread").write_text("done"))).start()
print("unflushed line", end="")
finish(3)
"""


def test_finish_joins_threads_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert result.stdout == "unflushed line"
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "atexit": "ran",
        "pool": "done",
        "thread": "done",
    }
