"""A run without a plan file: this machine's profile, a plan made for the prompts at hand, the run.

The pieces specoffload-run (without a plan) and the Python API (`specoffload.LLM`) share:

- `model_dirs`: --model / --draft as a user names them (a model folder, tiny-target / tiny-draft, or tiny-pair
  for both) to checkpoint folders, refusing presets without weights.
- `find_profile`: the profile to plan on: the one given, else this machine's in the profile cache (keyed by
  machine, device and KV dtype), else a quick profile measured now and cached (said so on stderr).
- `workload_for` / `plan_for_prompts`: a Workload from the prompts' own token lengths, generation lengths and
  count, and the plan for it (planner/cli.py's plan_job, the same as specoffload-plan's).
- `torch_dtype`: bf16 / fp16 / fp32 as the engine takes it (fp16 warns about overflow once).
- `encode`, `to_request`, `output_line`: Prompt -> token ids -> engine Request, Finished -> output line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import sys
from pathlib import Path
from typing import Callable, Iterable

from .prompts import Prompt, PromptFileError, resolve_model_dir

#: the tokens a prompt without max_tokens generates when no plan says otherwise (specoffload-run --max-tokens)
DEFAULT_MAX_TOKENS = 128
DTYPES = ("bf16", "fp16", "fp32")
FP16_WARNING = ("fp16 holds values only up to 65504: a model trained in bf16 can overflow to inf/NaN in it (wrong or "
                "empty outputs); use it where bf16 is missing (e.g. a T4) and check the outputs")


class OneShotError(ValueError):
    """Bad input for a run without a plan; the message names the problem and the fix."""


def say(msg: str) -> None:
    print(f"specoffload: {msg}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def model_dirs(model: str, draft: str | None) -> tuple[Path, Path | None, str, str | None]:
    """(target folder, draft folder or None, target ref, draft ref) for --model / --draft. `tiny-pair` is the
    shipped pair (its draft unless `draft` says otherwise); draft None or "none" runs without a draft."""
    if not model:
        raise OneShotError("no model given; pass --model DIR (an HF model folder) or tiny-pair")
    if model == "tiny-pair":
        model, draft = "tiny-target", ("tiny-draft" if draft is None else draft)
    if draft is not None and draft.lower() == "none":
        draft = None
    dirs = []
    for role, ref in (("model", model), ("draft", draft)):
        if ref is None:
            dirs.append(None)
            continue
        try:
            d = resolve_model_dir(ref)
        except PromptFileError as exc:
            from specoffload.planner.models import known_models

            if ref.strip().lower() in known_models():
                raise OneShotError(f"--{role} {ref}: a preset has shapes but no weights; give its checkpoint folder "
                                   "(an HF model folder) to run it") from None
            raise OneShotError(f"--{role}: {exc}") from None
        dirs.append(d)
    return dirs[0], dirs[1], model, draft


def tokenizer_path(target_dir: Path) -> Path:
    path = target_dir / "tokenizer.json"
    if not path.is_file():
        raise OneShotError(f"{target_dir}: no tokenizer.json (the run needs the target's tokenizer)")
    return path


# ----------------------------------------------------------------------------------------------
# Dtype
# ----------------------------------------------------------------------------------------------

def torch_dtype(name: str | None, warn: Callable[[str], None] | None = say):
    """bf16 / fp16 / fp32 as a torch dtype (None or "": None, the engine's default); fp16 warns once."""
    if not name:
        return None
    if name not in DTYPES:
        raise OneShotError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    import torch

    if name == "fp16" and warn is not None:
        warn(f"warning: {FP16_WARNING}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where measured profiles are cached: $SPECOFFLOAD_CACHE/profiles, else $XDG_CACHE_HOME/specoffload/profiles,
    else ~/.cache/specoffload/profiles."""
    root = os.environ.get("SPECOFFLOAD_CACHE")
    if root:
        return Path(root) / "profiles"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "specoffload" / "profiles"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


def machine_key(device: str, kv_dtype: str | None) -> str:
    """This machine as a cache key: host name, the compute device's name, the usable cores, the KV dtype."""
    if device.startswith("cuda"):
        import torch

        dev = torch.cuda.get_device_name(torch.device(device))
    else:
        dev = "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    dev = line.split(":", 1)[1]
                    break
        except OSError:
            pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return "-".join((_slug(socket.gethostname()), _slug(dev), f"{cores}cpu", kv_dtype or "kv-default"))


def find_profile(given: str | None, device: str, kv_dtype: str | None, make: bool = True,
                 threads: int | None = None, log: Callable[[str], None] = say):
    """(profile, the path or name it came from). Given: that one (a YAML path or a shipped profile's name).
    Else this machine's cached profile, else (make) a quick profile measured now into the cache."""
    from specoffload.planner.schema import load_profile

    if given:
        return load_profile(given), given
    path = cache_dir() / f"{machine_key(device, kv_dtype)}.yaml"
    if path.is_file():
        log(f"using this machine's cached profile {path} (delete it to measure again, or pass --profile)")
        return load_profile(path), str(path)
    if not make:
        raise OneShotError(f"no profile for this machine in {path.parent} and --no-profile-make given; pass --profile "
                           "FILE|NAME (e.g. from specoffload-profile --quick), or drop --no-profile-make to measure "
                           "one now (about a minute)")
    log(f"no profile for this machine yet: measuring a quick one now (specoffload-profile --quick, about a minute), "
        f"cached as {path}")
    from .profile_cli import main as profile_main

    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--quick", "--no-progress", "-o", str(path), "--device", "cuda" if device.startswith("cuda") else "cpu"]
    argv += ["--kv-dtype", kv_dtype] if kv_dtype else []
    argv += ["--threads", str(threads)] if threads else []
    if profile_main(argv) != 0 or not path.is_file():
        raise OneShotError("measuring this machine's profile failed (see above); pass --profile FILE|NAME")
    return load_profile(path), str(path)


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------

def workload_for(prompt_lens: Iterable[int], gen_lens: Iterable[int]):
    """The Workload of these prompts: mean and longest prompt, the longest generation (the KV cache is sized
    for it), their count; acceptance the planner's assumed default."""
    from specoffload.planner.schema import Workload

    prompt_lens, gen_lens = list(prompt_lens), list(gen_lens)
    if not prompt_lens:
        raise OneShotError("no prompts to plan for")
    try:
        return Workload(prompt_len_tokens=max(1, math.ceil(sum(prompt_lens) / len(prompt_lens))),
                        max_prompt_len_tokens=max(prompt_lens), gen_len_tokens=max(gen_lens),
                        num_prompts=len(prompt_lens), acceptance_source="assumed")
    except ValueError as exc:
        raise OneShotError(f"workload: {exc}") from None


def plan_for_prompts(target_ref: str, draft_ref: str | None, profile, workload, dtype: str | None = None,
                     policy: str = "specoffload", max_draft_len: int | None = None):
    """planner/cli.py's plan_job for this workload: the PlanResult (its .plan and the summary's figures)."""
    from specoffload.planner.cli import plan_job
    from specoffload.planner.planner import DEFAULT_MAX_DRAFT_LEN

    if policy in ("serial-spec", "interleaved") and not draft_ref:
        raise OneShotError(f"--policy {policy} needs a draft model (--draft)")
    args = argparse.Namespace(model=target_ref, draft=draft_ref, policy=policy,
                              max_draft_len=max_draft_len or DEFAULT_MAX_DRAFT_LEN, batch=None, draft_len=None,
                              micro_batches=None, dtype=dtype or "")
    return plan_job(args, profile, workload)


def plan_summary(result, policy: str) -> str:
    from specoffload.planner.cli import summary

    return summary(result, policy, explain=False)


# ----------------------------------------------------------------------------------------------
# Outputs in input order
# ----------------------------------------------------------------------------------------------

def ordered_path(output: str | Path, given: str | Path | None = None) -> Path:
    return Path(given) if given else Path(f"{output}.ordered.jsonl")


def check_ordered_target(output: str | Path, given: str | Path | None) -> Path:
    """The --ordered path, refused (OneShotError) if it is a folder, the output file itself, or an existing file
    that is not such a copy (JSON objects with an "id" on every line); checked before a run and again after."""
    out, path = Path(output), ordered_path(output, given)
    if path.exists() and (path.is_dir() or path.resolve() == out.resolve()):
        raise OneShotError(f"--ordered {path}: {'a directory' if path.is_dir() else 'the output file itself'}; give "
                           "another file name")
    if path.exists():
        try:
            lines = [json.loads(raw) for raw in path.read_bytes().splitlines() if raw.strip()]
            ours = all(isinstance(o, dict) and "id" in o for o in lines)
        except (ValueError, RecursionError):
            ours = False
        if not ours:
            raise OneShotError(f"--ordered {path}: the file exists and is not an ordered copy of outputs; it is left "
                               "as it is (give another path, or move it)")
    return path


def write_ordered(output: str | Path, given: str | Path | None, ids: list[str]) -> Path:
    """Write the output file's lines in the order of `ids` (the input's) to `given` or <output>.ordered.jsonl.
    The output file is only read. An existing target is replaced only if it is such a copy (JSON objects with
    an "id" on every line); anything else there is refused and left as it is."""
    out, path = Path(output), check_ordered_target(output, given)
    by_id: dict[str, bytes] = {}
    for raw in out.read_bytes().splitlines():
        if raw.strip():
            by_id[str(json.loads(raw)["id"])] = raw
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise OneShotError(f"{out}: {len(missing)} of {len(ids)} prompts have no output yet (first: {missing[0]!r}); "
                           "rerun the same command to finish them, then the ordered copy is written")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(by_id[i] + b"\n" for i in ids))
    tmp.replace(path)
    return path
