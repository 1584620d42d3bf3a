"""Data for the local lm-eval test tasks (ridgeline_mc, ridgeline_gen).

lm-eval calls these through `custom_dataset: !function utils.load_*` in the task
YAMLs. They read the JSONL files next to this file, so the tasks work from any
working directory, with no Hugging Face hub access and no `datasets` cache writes
(`dataset_path: json` + `data_files` would resolve relative paths against the
current directory instead).
"""

import json
import pathlib

import datasets

HERE = pathlib.Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
  lines = (HERE / name).read_text(encoding="utf-8").splitlines()
  rows = [json.loads(line) for line in lines if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs) -> datasets.DatasetDict:  # kwargs: the task's metadata
  return _load("ridgeline_mc.jsonl")


def load_gen(**kwargs) -> datasets.DatasetDict:
  return _load("ridgeline_gen.jsonl")
