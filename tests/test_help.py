"""Every command answers ``--help`` without importing torch, DeepSpeed or transformers (those take seconds to
import): each runs in a fresh interpreter and reports which heavy modules it loaded. An import check, not a
timing, so it cannot flake on a loaded machine."""
import importlib
import json
import subprocess
import sys

import pytest

from tests.launcher import REPO

HEAVY = ("torch", "deepspeed", "transformers")
DATA_PREP = ["pairs", "vqa", "retrieval", "nlvr2", "classify", "synth", "tokenizer", "verify", "extract", "gqa",
             "snli_ve", "clotho", "audiocaps", "wavcaps", "audio_pairs", "esc50"]
COMMANDS = [["pipeline.train"], ["pipeline.plan"], ["pipeline.evaluate"], ["pipeline.export"], ["pipeline.predict"],
            ["pipeline.explain"], ["launch.demo_report"],
            ["pipeline.run.hardware"], ["pipeline.run.convert_moe"], ["pipeline.run.universal"], ["data_prep"],
            *[["data_prep", name] for name in DATA_PREP]]

# run the module as ``python -m`` would, then print the heavy modules it imported and what it printed
PROBE = """
import contextlib, io, json, runpy, sys
module, args = sys.argv[1], sys.argv[2:]
sys.argv = [module, *args]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "help": out.getvalue(), "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_help_imports_no_heavy_module(command):
    proc = subprocess.run([sys.executable, "-c", PROBE, *command, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["code"] == 0 and result["help"].startswith("usage:"), result
    assert result["heavy"] == [], f"{' '.join(command)} --help imported {result['heavy']}"


@pytest.mark.parametrize("module", ["pipeline.plan", "pipeline.train", "pipeline.evaluate"])
def test_every_option_has_help_text(module):
    """``--recipe``, ``--ds-config`` and ``--set`` used to be listed in --help without a word."""
    parser = importlib.import_module(module).build_parser()
    bare = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert bare == [], f"{module}: options without help text: {bare}"
