"""Ulysses sequence-parallel attention (our two all-to-alls, gloo) equals one device's attention, forward and backward."""
import json
import os

from tests.procs import run, torchrun_cmd


def test_ulysses_attention_on_groups_of_2_and_4_equals_single_device(tmp_path):
    run(torchrun_cmd(4, "tests/workers/sp_attention.py", str(tmp_path)))
    for rank in range(4):
        with open(os.path.join(tmp_path, f"rank{rank}.json")) as fh:
            errors = json.load(fh)
        assert set(errors) == {"2", "4"}
        for d, e in errors.items():
            assert e["out"] < 1e-5 and e["grad"] < 1e-5, (rank, d, e)
