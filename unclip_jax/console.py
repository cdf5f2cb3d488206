"""What the command-line tools show on the terminal, and where library logging goes instead.

The terminal is for what a user reads: one line per stage, the progress bars, the final report,
and warnings. Library INFO logging (absl, JAX, Orbax's option dumps at every save) goes to a log
file: WORKDIR/log.txt for the main job.
"""
from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import logging

LOG_FILE = "log.txt"
# absl's help flags (True: the main module's flags only) and what they print.
HELP_FLAGS = {"-h": True, "-?": True, "--help": True, "--helpshort": True, "--helpfull": False}


def say(msg: str) -> None:
    """A line for the user on the terminal, from process 0 only."""
    import jax
    if jax.process_index() == 0:
        print(msg, flush=True)


def run_app(main) -> None:
    """absl's `app.run(main)` for the entry points, except that asking for help (-h, --help,
    --helpshort, --helpfull) prints the usage (the main module's docstring, then its flags) and
    exits 0: absl exits 1 there, which reads as a failure to scripts and tests."""
    from absl import app

    def parse(argv):
        own = argv[1:argv.index("--")] if "--" in argv else argv[1:]
        for arg in own:
            if arg in HELP_FLAGS:
                app.usage(shorthelp=HELP_FLAGS[arg], writeto_stdout=True)
                if HELP_FLAGS[arg]:
                    print("\nTry --helpfull to get a list of all flags.")
                sys.exit(0)
        return app.parse_flags_with_usage(argv)

    app.run(main, flags_parser=parse)


def quiet_terminal(level: int = pylogging.WARNING) -> None:
    """Only `level` and above of Python/absl logging reach the terminal (stderr), unless the user
    passed --verbosity (then the terminal follows it)."""
    from absl import flags
    if not flags.FLAGS["verbosity"].present:
        logging.get_absl_handler().setLevel(level)


def define_tool_flags(config_required: bool = True) -> None:
    """The flags every measuring tool (bench, bench_conv, bench_sampling, aot) shares: the
    experiment config (required unless told: aot --karlo needs none) and a JSON file for the
    figures."""
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Experiment config (get_config), "
                                    "overridable with --config.x.y=value.", lock_config=True)
    flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
    if config_required:
        flags.mark_flags_as_required(["config"])


def report(text: str, figures, json_path: str | None) -> None:
    """Print a tool's table and, when asked, write its figures as JSON."""
    import json
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)


def log_to_file(directory: str, process_index: int = 0) -> str:
    """Append the logging at the root logger's level (INFO under absl's app.run, or what
    --verbosity says) to
    DIRECTORY/log.txt (log.<i>.txt for process i > 0, so processes sharing a directory don't
    interleave). Returns the file's path. A log is appended line by line, which object storage
    cannot do: for a gs://... directory it goes to a local temporary folder named after it."""
    from unclip_jax import paths
    if paths.is_url(directory):
        import re
        import tempfile
        directory = os.path.join(tempfile.gettempdir(), "unclip_jax_logs",
                                 re.sub(r"[^A-Za-z0-9._-]+", "_", str(directory)))
    os.makedirs(directory, exist_ok=True)
    name = LOG_FILE if process_index == 0 else f"log.{process_index}.txt"
    path = os.path.join(directory, name)
    root = pylogging.getLogger()
    if not any(isinstance(h, pylogging.FileHandler) and h.baseFilename == os.path.abspath(path)
               for h in root.handlers):
        handler = pylogging.FileHandler(path)
        handler.setFormatter(logging.PythonFormatter())
        root.addHandler(handler)
    return path
