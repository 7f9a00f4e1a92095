"""The example in examples/ runs a device (it must stay under 40 lines)."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "device.py"


def test_the_example_runs_a_device(cloud):
    assert len(EXAMPLE.read_text().splitlines()) < 40
    p = subprocess.run(
        [sys.executable, str(EXAMPLE), "--dir", str(cloud.dir), "--port", str(cloud.port),
         "--thing", "py-device", "--count", "3", "--every", "0.1"],
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("acknowledged") == 3, p.stdout
