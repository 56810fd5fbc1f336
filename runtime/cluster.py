"""specoffload-run --ray: one plan, one prompt file, one output file, many engines on a Ray cluster.

    specoffload-run plan.yaml --prompts in.jsonl --output out.jsonl --ray local --ray-workers 2
    specoffload-run plan.yaml --prompts in.jsonl --output out.jsonl --ray HEAD_IP:6379

Engines are Ray actors: one per GPU, and on a node without GPUs `--ray-workers` engines (default 1),
each pinned to its node. Each engine resolves the checkpoint folders on its own node (a path every
node sees, e.g. a shared file system; nothing is copied) and checks them against the plan's
fingerprints before it loads anything. The driver deals the prompts still to do in small shards
from one queue (a faster engine takes more of them) and keeps two shards at each engine so none
waits for the driver; an engine takes the second shard's prompts into its batch as the first's
sequences finish (one continuous refill). It alone writes the output file, appending each finished shard's lines
through the single-machine run's locked output file (`outputs.OutputFile`): ids already in it are
skipped, and an id is written at most once even if its shard ran twice.

An engine that dies (its process killed, its node lost) loses only its unfinished shards: they go
back to the queue for the other engines. If every engine is lost the run stops; whatever was
written stays, and rerunning the same command resumes from the output file. The report (YAML)
holds the whole job and, per engine, its node, sequences, tokens and throughput, and each
engine's measured Report (the single-machine report's fields, over the time it was running).

Fault injection for tests (environment of the driver): SPECOFFLOAD_FAULT_WORKER_EXIT="I:N" ends
engine I's process (os._exit) after it has finished N sequences; SPECOFFLOAD_FAULT_DRIVER_EXIT="N"
ends the driver after it has written N lines.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from collections import deque
from pathlib import Path

from .run_cli import RunError, open_output, read_prompts, resolve_models, simulate_first

OBJECT_STORE_BYTES = 128 * 2**20  # a local cluster's object store: results are small JSON lines
LABEL = "specoffload-profile"  # the Ray node label that picks a node's plan among --ray-plans


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("cluster (Ray; pip install 'specoffload[cluster]')")
    g.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: its address (HOST:PORT, or 'auto' for the one this machine belongs "
                        "to), or 'local' to start one on this machine")
    g.add_argument("--ray-workers", type=int, default=1, metavar="N",
                   help="engines on each node without a GPU (default 1; nodes with GPUs get one per GPU)")
    g.add_argument("--ray-engines-per-node", type=int, default=None, metavar="N",
                   help="at most N engines on any one node (each engine holds its own copy of the host weights)")
    g.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="prompts per shard (default: the plan's sequences in flight, decode batch x batches, "
                        "or fewer so that every engine gets two); a lost engine's two queued shards are redone")
    g.add_argument("--ray-plans", default=None, metavar="PLAN[,PLAN...]",
                   help="plans for other kinds of node (specoffload-plan --cluster writes one per kind): a node started "
                        f"with the label {LABEL}=NAME (ray start --labels {LABEL}=NAME) runs the plan made for profile NAME; "
                        "unlabelled nodes run the first plan")


# ----------------------------------------------------------------------------------------------
# The engine actor (a plain class; Ray wraps it at run time, so importing this module needs no Ray)
# ----------------------------------------------------------------------------------------------

class EngineWorker:
    """One engine on one node. Construction never raises: `info()` reports a problem as a message."""

    def __init__(self, index: int, plan, target: str | None, draft: str | None, device: str | None,
                 threads: int | None, max_len: int | None, exit_after: int | None):
        self.index, self.plan, self.exit_after = index, plan, exit_after
        self.finished = 0
        self.busy = 0.0
        import threading

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list = []
        self._owner: dict = {}  # request id -> its shard's state
        self._thread = None
        self._since = None
        self.error = None
        self.engine = None
        t0 = time.perf_counter()
        try:
            import torch

            from .config import ConfigError
            from .engine import Engine, EngineError
            from .loader import CheckpointError
            from .requests_io import RequestError, RequestIO

            if threads:
                torch.set_num_threads(threads)
            # The fingerprint check, on this node, against the checkpoint this node sees.
            target_dir, draft_dir = resolve_models(plan, target, draft)
            try:  # the tokenizer, generation_config.json and chat template: requests and lines as a single run makes them
                self.io = RequestIO.from_model_dir(target_dir)
            except RequestError as exc:
                raise RunError(str(exc)) from None
            try:
                self.engine = Engine(plan, target_dir, draft_dir, device=device, max_len=max_len)
            except (ConfigError, CheckpointError, EngineError) as exc:
                raise RunError(str(exc)) from None
        except Exception as exc:  # reported to the driver with the node's name
            self.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RunError) else str(exc)
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        import torch

        return {"index": self.index, "host": socket.gethostname(), "pid": os.getpid(), "error": self.error,
                "device": str(self.engine.device) if self.engine else "", "load_seconds": self.load_seconds,
                "threads": torch.get_num_threads(),
                "gpus": [str(x) for x in (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",") if x]}

    def _requests(self, shard: list):
        gen_len = self.plan.workload.gen_len_tokens
        return [self.io.request(p, gen_len) for p in shard]

    def check(self, prompts: list) -> list[tuple[int, int, str]]:
        """(line, tokens needed, message) for each prompt this engine cannot run."""
        from .engine import EngineError
        from .requests_io import RequestError

        bad = []
        for p in prompts:
            try:
                req = self.io.request(p, self.plan.workload.gen_len_tokens)
            except RequestError as exc:
                bad.append((p.line, 0, str(exc)))
                continue
            try:
                self.engine.check(req)
            except EngineError as exc:
                bad.append((p.line, len(req.prompt) + req.max_tokens + self.engine.k + 1, str(exc)))
        return bad

    # One engine, fed as a stream: `run` calls (one per shard, up to two at once: the actor is threaded) put
    # their requests in the inbox and wait; a single engine thread admits them into free slots as
    # sequences finish (Engine.run's `more`), so consecutive shards share batches instead of draining.
    def _busy_now(self) -> float:
        return self.busy + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def _take(self) -> list:
        with self._lock:
            out, self._inbox = self._inbox, []
            return out

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._inbox:
                    self._wake.wait()
                first, self._inbox = self._inbox, []
            self._since = time.perf_counter()
            try:
                self.engine.run(first, self._on_finish, more=self._take)
            except BaseException as exc:  # every waiting shard learns of it
                with self._lock:
                    for st in set(self._owner.values()):
                        st["error"] = f"{type(exc).__name__}: {exc}"
                        st["done"].set()
            finally:
                self.busy += time.perf_counter() - self._since
                self._since = None

    def _on_finish(self, f) -> None:
        line = self.io.output_line(f)
        with self._lock:
            st = self._owner.pop(f.request.id)
            st["lines"].append(line)
            st["left"] -= 1
            if st["left"] == 0:
                st["done"].set()
        self.finished += 1
        if self.exit_after is not None and self.finished >= self.exit_after:
            os._exit(1)  # fault injection: the process dies as a killed one would

    def run(self, shard: list) -> dict:
        """Generate a shard; its output lines, its tokens, and the engine's busy time so far."""
        import threading

        requests = self._requests(shard)
        st = {"lines": [], "left": len(requests), "done": threading.Event(), "error": None}
        if not requests:
            return {"lines": [], "tokens": 0, "busy": self._busy_now()}
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
                self._thread.start()
            for r in requests:
                self._owner[r.id] = st
            self._inbox.extend(requests)
            self._wake.notify()
        st["done"].wait()
        if st["error"]:
            raise RuntimeError(f"engine {self.index}: {st['error']}")
        return {"lines": st["lines"], "tokens": sum(x["num_tokens"] for x in st["lines"]), "busy": self._busy_now()}

    def report(self, profile_ref: str | None) -> dict:
        """This engine's measured Report (the single-machine fields) over the time it ran shards."""
        from specoffload.planner.strict import to_plain

        from .run_cli import measured_report

        stats = self.engine.stats
        stats.decode_seconds = max(self.busy - stats.prefill_seconds, 0.0)  # run() counts one call only
        rep = measured_report(self.plan, self.engine, stats, max(self.busy, 1e-9), None,
                              [f"engine {self.index} on {socket.gethostname()}: time is the engine's busy time "
                               "over its shards"], profile_ref)
        return to_plain(rep)


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def _import_ray():
    try:
        import ray
    except ImportError:
        raise RunError("--ray needs Ray: pip install 'specoffload[cluster]' (or pip install ray)") from None
    return ray


def _fault(name: str) -> str | None:
    return os.environ.get(name) or None


def connect(ray, address: str, workers: int, threads: int | None) -> bool:
    """Join (or, for 'local', start) a cluster. True when this call started Ray (and must shut it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from a batch job
    if address != "local":
        check_reachable(address)
    try:
        if address == "local":
            ray.init(num_cpus=max(1, workers) * (threads or 1), include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, log_to_driver=True, logging_level="warning")
        else:
            ray.init(address=address, log_to_driver=True, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RunError(f"--ray {address}: cannot join the Ray cluster ({exc}); start it with `ray start --head` "
                       "on the head node, or use --ray local") from None
    return True


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT nobody answers on is refused at once (ray.init would retry it for many minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # 'auto', ray://... : Ray resolves these itself and fails fast when there is nothing
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RunError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); start the cluster with "
                       "`ray start --head` on the head node and give its address (HOST:6379), or use --ray local") \
            from None


def engine_slots(ray, workers: int, per_node: int | None, threads: int | None) -> list[tuple[str, str, bool, str]]:
    """(node id, node address, uses a GPU, the node's profile label) for each engine to start: one per GPU,
    `workers` on a node without one."""
    slots = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
        n = gpus if gpus else min(workers, cpus // (threads or 1))  # a node without the CPUs gets none
        if per_node:
            n = min(n, per_node)
        label = (node.get("Labels") or {}).get(LABEL, "")
        slots += [(node["NodeID"], node.get("NodeManagerAddress", "?"), bool(gpus), label)] * n
    return slots


def plan_for(label: str, plans: dict[str, object], addr: str):
    """The plan a node runs: the one made for its labelled profile, else the first."""
    if not label:
        return next(iter(plans.values()))
    for plan in plans.values():
        if plan.profile.split("/")[0] == label:
            return plan
    raise RunError(f"node {addr} is labelled {LABEL}={label} but no plan was made for that profile (plans for: "
                   f"{', '.join(p.profile for p in plans.values())}); add one with --ray-plans")


def engine_share(plan) -> int:
    """How many engines of one node the plan's profile is a share of (specoffload-plan --cluster: 'l4/2')."""
    head, _, n = plan.profile.rpartition("/")
    return int(n) if head and n.isdigit() else 1


def check_host_memory(plans, slots) -> None:
    """Engines on one node each hold their own copy of the host weights (pinned on a GPU machine):
    refuse a node whose engines together exceed the host memory its plan was made for."""
    counts: dict[str, list] = {}
    for node, addr, gpu, label in slots:
        counts.setdefault(addr, []).append(plan_for(label, plans, addr))
    for addr, node_plans in counts.items():
        n, plan = len(node_plans), node_plans[0]
        if n < 2:
            continue
        pred, share = plan.prediction, engine_share(plan)
        for tier in ("pinned", "host"):
            need, cap = pred.peak_mem_bytes.get(tier, 0.0), pred.capacity_bytes.get(tier, math.inf) * share
            if need and math.isfinite(cap) and n * need > cap:
                raise RunError(f"node {addr}: {n} engines would each hold {need / 2**30:.1f} GiB of {tier} memory "
                               f"({n * need / 2**30:.1f} GiB) but the plan's profile has {cap / 2**30:.1f} GiB; "
                               f"limit them with --ray-engines-per-node, or plan for one engine's share "
                               f"(specoffload-plan --cluster PROFILE:NODESx{n})")


def deal(prompts: list, size: int) -> list[list]:
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def run_cluster(args: argparse.Namespace, out, guard=None) -> int:
    """The run across a Ray cluster. `out` is run_cli's OutputFile (opened, locked and read here, before
    anything heavy); `guard` its SignalGuard (a line being written is finished before a signal stops us)."""
    ray = _import_ray()
    from tqdm import tqdm

    from specoffload.planner.schema import Plan
    from specoffload.planner.strict import dump_yaml

    if args.ray_workers < 1 or (args.ray_engines_per_node is not None and args.ray_engines_per_node < 1):
        raise RunError("--ray-workers and --ray-engines-per-node must be >= 1")
    if args.shard_size is not None and args.shard_size < 1:
        raise RunError("--shard-size must be >= 1")
    if args.trace:
        raise RunError("--trace is for one engine; a cluster run writes per-engine reports with --report instead")
    plan = Plan.load(args.plan)
    plans = {str(args.plan): plan}
    for extra in (args.ray_plans or "").split(","):
        if extra.strip():
            other = Plan.load(extra.strip())
            if other.model_fingerprint != plan.model_fingerprint or (
                    other.draft and plan.draft and other.draft_fingerprint != plan.draft_fingerprint):
                raise RunError(f"{extra}: made for {other.model}/{other.draft or 'no draft'}, not the first plan's "
                               f"{plan.model}/{plan.draft or 'no draft'}; every plan of one job is for the same target "
                               "(and the same draft, where both draft)")
            plans[extra.strip()] = other
    prompts = read_prompts(args.prompts)
    done, todo = open_output(out, prompts, args.prompts)
    if not todo:
        return 0
    sim, notes = (None, ["pre-run simulation skipped (--no-simulate)"]) if args.no_simulate else \
        simulate_first(plan, args.profile, args.force)
    t_start = time.perf_counter()
    started = connect(ray, args.ray, args.ray_workers, args.threads)
    try:
        return _drive(ray, args, plans, prompts, done, todo, notes, out, guard, tqdm, dump_yaml, t_start)
    finally:
        if started:
            ray.shutdown()


def _start_engines(ray, args, plans, max_len, exit_fault):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    slots = engine_slots(ray, args.ray_workers, args.ray_engines_per_node, args.threads)
    if not slots:
        raise RunError(f"--ray {args.ray}: the cluster has no live node with a GPU, or with the {args.threads or 1} "
                       "CPU(s) an engine asks for (--threads)")
    check_host_memory(plans, slots)
    names = {id(p): name for name, p in plans.items()}
    actor_cls = ray.remote(EngineWorker)
    handles = []
    chosen = []
    for i, (node, addr, gpu, label) in enumerate(slots):
        plan = plan_for(label, plans, addr)
        chosen.append(names[id(plan)])
        opts = {"num_cpus": args.threads or 1, "num_gpus": 1 if gpu else 0, "max_restarts": 0, "max_concurrency": 4,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        exit_after = int(exit_fault[1]) if exit_fault and int(exit_fault[0]) == i else None
        device = args.device if args.device else ("cuda" if gpu else "cpu")
        handles.append(actor_cls.options(**opts).remote(i, plan, args.target, args.draft, device, args.threads,
                                                        max_len, exit_after))
    infos = ray.get([h.info.remote() for h in handles])
    for info, (node, addr, gpu, label), name in zip(infos, slots, chosen):
        info["node"], info["plan"] = addr, name
        if info["error"]:
            raise RunError(f"engine {info['index']} on {addr} ({info['host']}): {info['error']}")
    return handles, infos


def _drive(ray, args, plans, prompts, done, todo, notes, out, guard, tqdm, dump_yaml, t_start) -> int:
    out_path = out.path
    connect_seconds = time.perf_counter() - t_start
    exit_fault = _fault("SPECOFFLOAD_FAULT_WORKER_EXIT")
    exit_fault = exit_fault.split(":") if exit_fault else None
    if exit_fault and (len(exit_fault) != 2 or not all(x.isdigit() for x in exit_fault)):
        raise RunError("SPECOFFLOAD_FAULT_WORKER_EXIT must be ENGINE:SEQUENCES, e.g. 1:6")
    driver_exit = _fault("SPECOFFLOAD_FAULT_DRIVER_EXIT")
    driver_exit = int(driver_exit) if driver_exit else None
    plan = next(iter(plans.values()))
    handles, infos = _start_engines(ray, args, plans, None, exit_fault)
    # Default: the plan's sequences in flight (one engine's full batch), but no more than gives every engine
    # two shards from the start, so a small job still spreads over all of them.
    shard_size = args.shard_size or max(1, min(plan.decode_batch * plan.num_batches,
                                               math.ceil(len(todo) / (2 * len(handles)))))
    shards = deal(todo, shard_size)

    # Every prompt checked before anything runs (the engines tokenize, in parallel), as a single run does.
    if shards:
        # Each plan's engines check every prompt (plans of one job may differ in the KV cache they hold).
        groups: dict[str, list] = {}
        for h, info in zip(handles, infos):
            groups.setdefault(info["plan"], []).append(h)
        refs = [g[i % len(g)].check.remote(s) for g in groups.values() for i, s in enumerate(shards)]
        bad = sorted({b[0]: b for c in ray.get(refs) for b in c}.values())
        if bad:
            planned = plan.workload.max_context_tokens + plan.draft_len + 1
            longest = max(b[1] for b in bad)
            fixable = all("KV cache per sequence" in b[2] for b in bad)
            if not (args.force and fixable):
                raise RunError(f"{args.prompts}:{bad[0][0]}: {bad[0][2]}"
                               + (f" ({len(bad) - 1} more such prompts)" if len(bad) > 1 else ""))
            notes.append(f"forced: KV cache sized for {longest} tokens per sequence, beyond the plan's {planned}")
            for h in handles:
                ray.kill(h)
            handles, infos = _start_engines(ray, args, plans, longest, exit_fault)
    startup = time.perf_counter() - t_start
    n_eng = len(handles)
    devices = sorted({i["device"] for i in infos})
    print(f"specoffload-run: {len(prompts)} prompts, {len(done)} already in {out_path}, {len(todo)} to run in "
          f"{len(shards)} shards of up to {shard_size}; {n_eng} engines on {len({i['node'] for i in infos})} "
          f"node(s) ({', '.join(devices)}); policy {plan.policy}, batch {plan.decode_batch}x{plan.num_batches}, "
          f"k={plan.draft_len}; started in {startup:.1f} s (joining the cluster {connect_seconds:.1f} s)", file=sys.stderr)

    per = [{"index": i["index"], "node": i["node"], "host": i["host"], "device": i["device"], "gpus": i["gpus"],
            "plan": i["plan"], "profile": plans[i["plan"]].profile,
            "predicted_tokens_per_s": plans[i["plan"]].prediction.throughput_tokens_per_s,
            "load_seconds": round(i["load_seconds"], 3), "shards": 0, "sequences": 0, "tokens": 0,
            "busy_seconds": 0.0, "lost": False} for i in infos]
    queue = deque(range(len(shards)))
    inflight: dict = {}  # ObjectRef -> (engine, shard)
    alive = set(range(n_eng))
    retried, lost_events = 0, []
    written = set(done)
    total_budget = sum(p.max_tokens or plan.workload.gen_len_tokens for p in todo)
    bar = tqdm(total=total_budget, unit="tok", disable=args.quiet or not todo, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    n_written = 0

    def feed(e: int, upto: int = 2) -> None:
        while queue and sum(1 for v in inflight.values() if v[0] == e) < upto:
            s = queue.popleft()
            inflight[handles[e].run.remote(shards[s])] = (e, s)

    for upto in (1, 2):  # one shard each first, so a short queue still reaches every engine
        for e in sorted(alive):
            feed(e, upto)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        e, s = inflight.pop(ref)
        try:
            res = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
            if e in alive:
                alive.discard(e)
                per[e]["lost"] = True
                why = type(exc).__name__
                lost_events.append(f"engine {e} on {per[e]['node']} lost ({why}) after {per[e]['shards']} shards")
                bar.write(f"specoffload-run: {lost_events[-1]}; its unfinished shards go to the other engines",
                          file=sys.stderr)
            queue.appendleft(s)
            retried += 1
            if not alive:
                break
            for a in sorted(alive):
                feed(a)
            continue
        except ray.exceptions.RayTaskError as exc:
            raise RunError(f"engine {e} on {per[e]['node']} failed on a shard: {exc}") from None
        for line in res["lines"]:
            if line["id"] in written:
                continue  # exactly once, even if a shard ran twice
            if guard is not None:
                guard.write(out, line)  # whole line, fsynced
            else:
                out.write(line)
            written.add(line["id"])
            n_written += 1
            if driver_exit is not None and n_written >= driver_exit:
                os._exit(137)  # fault injection: the driver dies as a killed one would
        p = per[e]
        p["shards"] += 1
        p["sequences"] += len(res["lines"])
        p["tokens"] += res["tokens"]
        p["busy_seconds"] = max(p["busy_seconds"], res["busy"])
        bar.update(sum(r.max_tokens or plan.workload.gen_len_tokens for r in shards[s]))
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{len(written) - len(done)}/{len(todo)} seq, "
                            f"{sum(q['tokens'] for q in per) / elapsed:.1f} tok/s: "
                            + " ".join(f"e{q['index']} {q['tokens'] / elapsed:.1f}" + ("x" if q["lost"] else "")
                                       for q in per))
        if e in alive:
            feed(e)
    bar.close()
    wall = time.perf_counter() - t0
    missing = [p.id for p in todo if p.id not in written]
    out.close()  # the outputs are complete (or every engine is lost): release the lock before the reports
    reports = {}
    if args.report:
        for e in sorted(alive):
            try:
                reports[e] = ray.get(handles[e].report.remote(args.profile))
            except ray.exceptions.RayActorError:
                pass
    tokens = sum(q["tokens"] for q in per)
    for q in per:
        q["tokens_per_s_busy"] = q["tokens"] / q["busy_seconds"] if q["busy_seconds"] else 0.0
        q["tokens_per_s_wall"] = q["tokens"] / wall if wall else 0.0
        if q["index"] in reports:
            q["report"] = reports[q["index"]]
    summary = {
        "kind": "cluster", "plan": str(args.plan), "policy": plan.policy, "prompts": len(prompts),
        "already_done": len(done), "sequences": len(written) - len(done), "missing": len(missing),
        "generated_tokens": tokens, "startup_seconds": startup, "connect_seconds": connect_seconds, "run_seconds": wall,
        "throughput_tokens_per_s": tokens / wall if wall else 0.0,
        "predicted_tokens_per_s": sum(q["predicted_tokens_per_s"] for q in per),
        "engines": n_eng, "engines_lost": n_eng - len(alive), "shards": len(shards), "shard_size": shard_size,
        "shards_retried": retried, "events": lost_events, "notes": notes, "per_engine": per,
    }
    print(f"cluster run: {summary['sequences']} sequences, {tokens} tokens in {wall:.2f} s "
          f"({summary['throughput_tokens_per_s']:.1f} tok/s; start-up {startup:.1f} s); {n_eng} engines, "
          f"{summary['engines_lost']} lost, {retried} shards retried")
    for ev in lost_events:  # what happened to a lost engine, in the end summary as in the report's events
        print(f"  {ev}; its unfinished shards went back to the queue")
    for q in per:
        print(f"  engine {q['index']} on {q['node']} ({q['device']}): {q['shards']} shards, {q['sequences']} seq, "
              f"{q['tokens']} tok, {q['tokens_per_s_busy']:.1f} tok/s busy, {q['tokens_per_s_wall']:.1f} tok/s of the "
              f"run" + (" [lost]" if q["lost"] else ""))
    if args.report:
        dump_yaml(summary, args.report)
        print(f"wrote {args.report}", file=sys.stderr)
    if missing:
        raise RunError(f"every engine was lost; {len(written)} of {len(prompts)} ids are in {out_path}, "
                       f"{len(missing)} are not: rerun the same command to resume")
    return 0
