"""The Python API: `from specoffload import LLM, SamplingParams`, in the spirit of vLLM's offline API.

    llm = LLM("tiny-pair", profile="cpu-2core")                # load once
    outs = llm.generate(["def f(x):", "import os"], SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].usage

Behind it runs the same code as specoffload-run (runtime/oneshot.py): without a plan, this machine's profile
(given, cached, or measured now), a plan made for the prompts' own lengths and count, simulated before it
runs; with `plan=` (a path or a Plan) that plan. Each prompt becomes the same `Prompt` a JSONL line becomes
(SamplingParams fields map to Prompt fields by name), and each result is read from the same output line the
command writes, so the API and the command produce the same outputs.

The engine is built once per plan and kept: a later generate() whose prompts fit its KV cache (and, without a
fixed plan, are no more than it was planned for) reuses it; otherwise a new plan is made and the engine rebuilt.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import oneshot
from .oneshot import OneShotError
from .prompts import Prompt


@dataclass
class SamplingParams:
    """Per-prompt generation settings, named as the JSONL keys are. None leaves a setting to the defaults (the
    model's generation_config.json where this build reads it, else greedy decoding, 16 tokens)."""

    max_tokens: int | None = 16  # as vLLM's default
    min_tokens: int | None = None
    temperature: float | None = None  # None: greedy unless generation_config.json says otherwise
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None

    def __post_init__(self):
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise ValueError(f"SamplingParams: max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(f"SamplingParams: temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p!r}")

    def prompt_fields(self) -> dict[str, Any]:
        """The fields set (not None), as this build's Prompt takes them; a set field Prompt lacks is an error."""
        have = {f.name for f in dataclasses.fields(Prompt)}
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        missing = sorted(k for k in given if k not in have)
        if missing:
            raise OneShotError(f"SamplingParams {', '.join(missing)}: not supported by this build of specoffload "
                               f"(it takes {', '.join(k for k in given if k in have) or 'none of the set fields'}); "
                               "leave them unset")
        return given


@dataclass(frozen=True)
class RequestOutput:
    """One prompt's result, read from its output line (the JSONL line specoffload-run writes)."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens
    stop_reason: str | int | None = None  # the stop string or token id that ended it, where one did
    line: dict = field(default_factory=dict, repr=False)  # the output line itself

    @classmethod
    def from_line(cls, line: dict) -> "RequestOutput":
        usage = line.get("usage") or {"prompt_tokens": line["prompt_tokens"], "completion_tokens": line["num_tokens"]}
        usage = dict(usage)
        usage.setdefault("total_tokens", usage["prompt_tokens"] + usage["completion_tokens"])
        return cls(id=str(line["id"]), text=line["text"], token_ids=list(line["tokens"]),
                   finish_reason=line["finish_reason"], usage=usage, stop_reason=line.get("stop_reason"), line=line)


def _is_chat(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and all(isinstance(m, dict) for m in item) and bool(item)


def _as_list(prompts) -> list:
    """A prompt, a chat (a list of {"role", "content"} dicts), or a list of either, as a list of items."""
    if isinstance(prompts, str) or _is_chat(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise TypeError(f"generate(prompts): a string, a chat (list of message dicts) or a list of them; got "
                    f"{type(prompts).__name__}")


class LLM:
    """Load a model (and draft) once; generate() for lists of prompts or chats.

    model: an HF model folder, tiny-target, or tiny-pair (the shipped target with its draft). draft: a folder,
    tiny-draft, or None / "none" for no draft. plan: None (plan for each batch of prompts), a plan.yaml path, or a
    Plan. profile: a profile YAML path or shipped name (default: this machine's, cached or measured now, unless
    profile_make=False). dtype: bf16, fp16 or fp32 (default: bf16 on a GPU, fp32 on the CPU)."""

    def __init__(self, model: str, draft: str | None = None, plan=None, profile: str | None = None,
                 dtype: str | None = None, device: str | None = None, threads: int | None = None,
                 policy: str = "specoffload", profile_make: bool = True, simulate: bool = True, force: bool = False,
                 quiet: bool = True):
        from specoffload.planner.schema import Plan

        from .host_attention import set_threads

        self.target_dir, self.draft_dir, self.target_ref, self.draft_ref = oneshot.model_dirs(model, draft)
        from .requests_io import RequestError, RequestIO

        try:  # the tokenizer, generation_config.json and chat template, as specoffload-run reads them
            self.rio = RequestIO.from_model_dir(self.target_dir)
        except RequestError as exc:
            raise OneShotError(str(exc)) from None
        self.tokenizer = self.rio.tokenizer
        self.device = oneshot.default_device(device)
        self.dtype_name, self.policy, self.simulate, self.force, self.quiet = dtype, policy, simulate, force, quiet
        self.threads = threads
        set_threads(threads)
        self.log = (lambda msg: None) if quiet else oneshot.say
        self.fixed_plan = None
        if plan is not None:
            from .run_cli import RunError, resolve_models

            fixed = plan if isinstance(plan, Plan) else Plan.load(plan)
            try:
                # a plan names its models; the folders given here must hold the same ones
                self.target_dir, self.draft_dir = resolve_models(fixed, str(self.target_dir),
                                                                 str(self.draft_dir) if self.draft_dir else None)
            except RunError as exc:
                raise OneShotError(str(exc)) from None
            self.fixed_plan = fixed
        self.dtype = oneshot.torch_dtype(dtype or (self.fixed_plan.dtype if self.fixed_plan else None),
                                         warn=oneshot.say)
        self.profile, self.profile_ref = None, profile
        if self.fixed_plan is None or profile is not None:
            self.profile, self.profile_ref = oneshot.find_profile(profile, self.device, dtype, make=profile_make,
                                                                  threads=threads, log=oneshot.say)
        self.engine = None
        self.plan = self.fixed_plan
        self.plan_summary = ""
        if self.fixed_plan is not None:
            self._build(self.fixed_plan)

    # -- plan and engine ------------------------------------------------------------------------
    def _build(self, plan) -> None:
        from .config import ConfigError
        from .engine import Engine, EngineError
        from .loader import CheckpointError
        from .run_cli import RunError, simulate_first

        if self.simulate:
            try:
                _, notes = simulate_first(plan, self.profile if self.profile is not None else self.profile_ref,
                                          self.force)
            except RunError as exc:
                raise OneShotError(str(exc)) from None
            for n in notes:
                self.log(n)
        self.engine = None  # free the old engine's memory before the new one is loaded
        try:
            self.engine = Engine(plan, self.target_dir, self.draft_dir, device=self.device, dtype=self.dtype)
        except (ConfigError, CheckpointError, EngineError) as exc:
            raise OneShotError(str(exc)) from None
        self.plan = plan

    def _fits(self, workload) -> bool:
        if self.engine is None:
            return False
        need = workload.max_context_tokens + self.plan.draft_len + 1
        if self.fixed_plan is not None:
            return True  # engine.check() names any prompt the fixed plan's cache cannot hold
        w = self.plan.workload
        return need <= self.engine.max_len and workload.num_prompts <= w.num_prompts

    # -- generate -------------------------------------------------------------------------------
    def make_prompts(self, prompts, sampling_params=None) -> list[Prompt]:
        """The Prompt (as a JSONL line becomes) for each item, in order; ids are "0", "1", ..."""
        items = _as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(items)
        if len(params) != len(items):
            raise ValueError(f"generate: {len(items)} prompts but {len(params)} SamplingParams (give one, or one per "
                             "prompt)")
        have = {f.name for f in dataclasses.fields(Prompt)}
        out = []
        for i, (item, sp) in enumerate(zip(items, params)):
            fields = sp.prompt_fields()
            if _is_chat(item):
                if "messages" not in have:
                    raise OneShotError("chat messages are not supported by this build of specoffload (its prompts "
                                       "are plain text); pass the prompt as a string")
                fields.update(messages=list(item), text="")
            elif isinstance(item, str):
                fields["text"] = item
            else:
                raise TypeError(f"generate: prompt {i} is a {type(item).__name__}; give a string or a list of "
                                "{'role', 'content'} dicts")
            out.append(Prompt(line=i + 1, id=str(i), **fields))
        return out

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for each prompt (a string or a chat); results in input order."""
        from .engine import EngineError, EngineStats

        todo = self.make_prompts(prompts, sampling_params)
        if not todo:
            return []
        from .requests_io import RequestError

        try:
            ids = [self.rio.prompt_ids(p) for p in todo]
        except RequestError as exc:
            raise OneShotError(str(exc)) from None
        default_gen = self.fixed_plan.workload.gen_len_tokens if self.fixed_plan else oneshot.DEFAULT_MAX_TOKENS
        workload = oneshot.workload_for([len(i) for i in ids], [p.max_tokens or default_gen for p in todo])
        if not self._fits(workload):
            result = oneshot.plan_for_prompts(self.target_ref, self.draft_ref, self.profile, workload,
                                              self.dtype_name, self.policy)
            self.plan_summary = oneshot.plan_summary(result, self.policy)
            if not self.quiet:
                print(self.plan_summary, file=sys.stderr)
            self._build(result.plan)
        requests = [self.rio.request(p, default_gen, i) for p, i in zip(todo, ids)]
        for r in requests:
            try:
                self.engine.check(r)
            except EngineError as exc:
                raise OneShotError(str(exc)) from None
        lines: dict[str, dict] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), unit="seq", file=sys.stderr)

        def on_finish(f) -> None:
            lines[f.request.id] = self.rio.output_line(f)
            if bar is not None:
                bar.update(1)

        self.engine.stats = EngineStats()
        self.engine.run(requests, on_finish)
        if bar is not None:
            bar.close()
        return [RequestOutput.from_line(lines[p.id]) for p in todo]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """generate() for one chat or a list of chats."""
        return self.generate(messages if not _is_chat(messages) else [messages], sampling_params, use_tqdm)

    @property
    def stats(self):
        """The engine's figures for the last generate() (tokens, rounds, acceptance)."""
        return None if self.engine is None else self.engine.stats

