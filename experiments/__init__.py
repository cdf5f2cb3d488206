"""Experiment configs: each file's get_config(arg) is loaded by --config=experiments/<file>.py[:arg]."""
