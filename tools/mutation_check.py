"""Mutation check: do the tests catch known kinds of bugs?

    python tools/mutation_check.py                  # every mutation, each against its targeted tests
    python tools/mutation_check.py --full           # each against the whole fast suite (slow)
    python tools/mutation_check.py --only eos-not-stopping,bonus-from-wrong-position
    python tools/mutation_check.py --list

Each mutation is one deliberate bug (a source snippet replaced by a wrong one) in the engine,
verification, cost model, planner, simulator or profiler. The tracked files are copied once into a
temporary folder, importable as `specoffload` from there (PYTHONPATH), and each mutation is applied
to that copy alone, the tests run (`pytest -x`, the fast suite's marker), and the copy's file
restored (in a `finally`) before the next one. The working tree is never written to.

A mutation is "killed" when the tests fail, "SURVIVED" when they pass (a gap in the tests), and
"not applied" when its snippet is no longer in the source (the mutation needs updating). Exit status
1 when any survived or could not be applied. Not part of the test suite: run it before calling the
test suite done.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"planner": "planner", "runtime": "runtime", "profiles": "profiles"}  # specoffload.<name> -> folder


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file, relative to the repository root
    old: str  # exact snippet (must occur exactly once)
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that should catch it
    what: str


M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # --- verification ------------------------------------------------------------------------------
    M("bonus-from-wrong-position", "runtime/verify.py", "            dist = p[b, k]\n", "            dist = p[b, k - 1]\n",
      ("tests/test_engine.py", "-k", "bonus or sampling", "tests/test_engine_sampling.py"),
      "after full acceptance the bonus token is drawn from position k-1's distribution"),
    M("greedy-accept-not-a-prefix", "runtime/verify.py", "n_acc = match.cumprod(dim=1).sum(dim=1)",
      "n_acc = match.sum(dim=1)", ("tests/test_engine.py", "-k", "greedy_accept or greedy_speculative"),
      "greedy acceptance counts matches anywhere, not the matching prefix"),
    M("residual-not-subtracted", "runtime/verify.py", "residual = (p[b, i] - q[b, i]).clamp(min=0)",
      "residual = p[b, i].clone()", ("tests/test_engine.py", "-k", "sampling", "tests/test_engine_sampling.py"),
      "after a rejection the token is drawn from p instead of the residual max(0, p - q)"),
    M("acceptance-ratio-inverted", "runtime/verify.py", "if qx > 0 and u * qx <= px:", "if qx > 0 and u * px <= qx:",
      ("tests/test_engine.py", "-k", "sampling", "tests/test_engine_sampling.py"),
      "a draft token kept with probability min(1, q/p) instead of min(1, p/q)"),
    M("acceptance-stats-miss-rejections", "planner/acceptance.py", "for i in range(min(n + 1, k)):", "for i in range(n):",
      ("tests/test_engine.py", "-k", "acceptance_stats", "tests/test_acceptance_counts.py"),
      "a rejected position is not counted as tried"),
    # --- engine -----------------------------------------------------------------------------------
    M("eos-not-stopping", "runtime/engine/stops.py", "if allowed and (t in self.eos or t in self.stop_ids):",
      "if allowed and t in self.stop_ids:", ("tests/test_engine.py", "-k", "eos or greedy_speculative"),
      "EOS does not stop a sequence"),
    M("commit-past-a-stop", "runtime/engine/engine.py", "            if s.stops.step(s.out):\n                return False\n",
      "            if s.stops.step(s.out):\n                continue\n", ("tests/test_stops.py", "-k", "inside"),
      "tokens after a stop in the same verification round are committed"),
    M("stop-string-window-too-late", "runtime/engine/stops.py",
      "i = self.text.find(s, max(0, len(self.text) - len(new) - len(s) + 1))",
      "i = self.text.find(s, max(0, len(self.text) - len(new)))", ("tests/test_stops.py",),
      "a stop string that began in earlier tokens is not found"),
    M("min-tokens-ignored", "runtime/engine/stops.py", "allowed = len(out) >= self.min_tokens", "allowed = True",
      ("tests/test_stops.py", "-k", "min_tokens or greedy_with_stops"), "min_tokens does not hold stops back"),
    M("top-k-skipped", "runtime/verify.py", "        probs = top_k_filter(probs, top_k.to(logits.device).view(view))\n",
      "        pass\n", ("tests/test_requests_io.py", "-k", "order"), "top_k not applied"),
    M("draft-kv-not-rolled-back", "runtime/engine/draft.py",
      "        self.kv.rollback(slots, keep)\n        for s, a, new in zip(seqs, n_accepted, new_tokens):",
      "        for s, a, new in zip(seqs, n_accepted, new_tokens):",
      ("tests/test_engine.py", "-k", "rolled_back"), "the draft's KV keeps rejected tokens after a verification"),
    M("target-kv-keeps-one-too-few", "runtime/engine/engine.py", "keep = [b + 1 + a for b, a in zip(base.tolist(), n_list)]",
      "keep = [b + a for b, a in zip(base.tolist(), n_list)]", ("tests/test_engine.py", "-k", "greedy_speculative"),
      "the target's KV rolled back one entry too far"),
    M("finish-reason-always-length", "runtime/engine/engine.py", "            if st is not None and st.stopped:",
      "            if False:", ("tests/test_engine.py", "-k", "eos or greedy_speculative"),
      "a sequence ended by EOS is reported as 'length'"),
    # --- cost model and models ----------------------------------------------------------------------
    M("h2d-twice-as-fast", "planner/durations.py", "        return nbytes / self._h2d(nbytes)\n",
      "        return nbytes / self._h2d(nbytes) / 2\n", ("tests/test_planner.py", "-k", "by_hand"),
      "host-to-device copies take half their time"),
    M("attention-bytes-halved", "planner/durations.py",
      "context * spec.kv_bytes_per_token_per_layer / self._kv_bw",
      "context * spec.kv_bytes_per_token_per_layer / 2 / self._kv_bw", ("tests/test_planner.py", "-k", "by_hand"),
      "CPU attention reads half the KV bytes"),
    M("kv-bytes-one-tensor", "planner/models.py", "return 2 * self.kv_dim * self.element_bytes",
      "return self.kv_dim * self.element_bytes", ("tests/test_planner.py", "-k", "by_hand"),
      "the KV cache counts K but not V"),
    M("attention-flops-halved", "planner/models.py", "return 4.0 * query_tokens * context * self.q_dim",
      "return 2.0 * query_tokens * context * self.q_dim", ("tests/test_planner.py", "-k", "by_hand"),
      "attention FLOPs count q.K but not p.V"),
    M("expected-tokens-off-by-one", "planner/rounds.py", "    total, alive = 1.0, 1.0\n",
      "    total, alive = 0.0, 1.0\n", ("tests/test_planner.py", "-k", "expected_tokens"),
      "the target's own token is not counted in a round"),
    # --- planner ----------------------------------------------------------------------------------
    M("lp-drops-serial-part", "planner/planner.py", "const = (slots - fused_n) * terms.serial_total",
      "const = 0.0", ("tests/test_planner.py", "-k", "closed_form or by_hand or worked_out"),
      "the LP's objective leaves out the serial part of a slot"),
    M("lp-ignores-memory", "planner/planner.py", "            if math.isfinite(self.caps[tier]):\n                at_most(",
      "            if False:\n                at_most(", ("tests/test_planner.py", "-k", "lp_matches_closed_form"),
      "the placement LP ignores memory capacities"),
    # --- simulator --------------------------------------------------------------------------------
    M("heap-popped-in-list-order", "planner/sim/engine.py", "            ev = pop(heap)\n",
      "            ev = heap.pop(0)\n", ("tests/test_sim_engine.py",),
      "events taken in insertion order, not time order"),
    M("sim-acceptance-not-a-prefix", "planner/sim/verify_pass.py",
      "accepted = (self.rng.random((n, k)) < self.acc).cumprod(axis=1).sum(axis=1)",
      "accepted = (self.rng.random((n, k)) < self.acc).sum(axis=1)", ("tests/test_sim_engine.py",),
      "simulated acceptance counts kept positions after a rejection"),
    M("sim-tokens-not-capped", "planner/sim/verify_pass.py", "kept = np.minimum(tokens, self.G - batch.gen[idx])",
      "kept = tokens", ("tests/test_sim_engine.py",), "sequences overshoot their generation length"),
    M("sim-kv-never-freed", "planner/sim/verify_pass.py",
      "            self._kv_free(batch, done)", "            pass", ("tests/test_sim_engine.py",),
      "a finished sequence's KV is never freed"),
    M("sim-buffers-never-released", "planner/sim/weight_stream.py", '            self._free("gpu", taken)\n',
      "            pass\n", ("tests/test_sim_engine.py",), "weight buffers are taken and never released"),
    # --- fused prefill ----------------------------------------------------------------------------
    M("fused-chunk-hidden-of-the-rows", "runtime/engine/engine.py",
      "joined = self._first_tokens(chunk, c_logits, c_new, self.target.chunk_hidden)",
      "joined = self._first_tokens(chunk, c_logits, c_new, self.target.last_hidden)",
      ("tests/test_fused_prefill.py",), "a fused chunk's feature draft reads the verification's hidden states"),
    M("fused-chunk-work-not-charged", "planner/costmodel.py",
      "busy = {r: f + work[r] if r in work else f for r, f in v.busy.items()}",
      "busy = dict(v.busy)", ("tests/test_fused_planner.py",), "a fused pass costs what a plain verification does"),
    M("fused-steps-without-the-prefill-step", "planner/costmodel.py", "stats = self.rounds(k).shifted(1)",
      "stats = self.rounds(k)", ("tests/test_fused_planner.py",),
      "a fused plan's sequences are counted as generating in the pass that prefills them"),
    M("sim-fused-first-token-not-counted", "planner/sim/fused_pass.py",
      "        self.generated += n  # the first token of each sequence\n", "", ("tests/test_sim_fused.py",),
      "the simulator forgets a fused chunk's first tokens"),
    # --- profiler ---------------------------------------------------------------------------------
    M("excess-fit-unscaled", "runtime/profiler/fit.py", "    coef = x / scale\n    pred = k + cols @ coef",
      "    coef = x\n    pred = k + cols @ coef", ("tests/test_profile.py", "-k", "excess or bookkeeping"),
      "the fixed-cost fit forgets its column scaling"),
)


def copy_tree(dest: Path) -> Path:
    """The tracked files (plus the shipped assets) copied to dest/tree; dest/pkg/specoffload/* link to it."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tree = dest / "tree"
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / rel)
    assets = ROOT / "runtime" / "assets"
    if assets.is_dir():  # untracked large assets (the tiny pair), if any, are read from the original
        for src in assets.rglob("*"):
            dst = tree / src.relative_to(ROOT)
            if src.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    pkg = dest / "pkg" / "specoffload"
    pkg.mkdir(parents=True)
    for name, folder in PACKAGES.items():
        (pkg / name).symlink_to(tree / folder, target_is_directory=True)
    return tree


def run_tests(tree: Path, pkg: Path, args: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(pkg) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONDONTWRITEBYTECODE="1", SPECOFFLOAD_HYPOTHESIS="fail-fast")  # no shrinking a known bug
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    # 0: passed, 1: a test failed, 5: nothing collected (a broken -k selection)
    status = {0: "SURVIVED", 1: "killed", 5: "no tests"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    return status, time.perf_counter() - t0, tail[-1] if tail else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the whole fast suite for each mutation")
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutation's test run")
    args = ap.parse_args(argv)
    chosen = list(MUTATIONS)
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = names - {m.name for m in MUTATIONS}
        if unknown:
            print(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:36s} {m.path:28s} {m.what}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="specoffload-mutants-") as tmp:
        tree = copy_tree(Path(tmp))
        pkg = Path(tmp) / "pkg"
        status, secs, tail = run_tests(tree, pkg, ("tests/test_engine.py", "-k", "greedy_accept"), args.timeout)
        if status != "SURVIVED":  # the unmutated copy must pass, or every "killed" means nothing
            print(f"the unmutated copy does not pass its tests ({status}: {tail})", file=sys.stderr)
            return 2
        for m in chosen:
            target = tree / m.path
            original = target.read_text()
            count = original.count(m.old)
            if count != 1:
                results.append((m, f"not applied ({count} matches)", 0.0, ""))
                print(f"{m.name:36s} not applied: the snippet occurs {count} times in {m.path}", flush=True)
                continue
            try:
                target.write_text(original.replace(m.old, m.new))
                status, secs, tail = run_tests(tree, pkg, () if args.full else m.tests, args.timeout)
            finally:
                target.write_text(original)
            results.append((m, status, secs, tail))
            print(f"{m.name:36s} {status:10s} {secs:6.1f} s  {m.what}", flush=True)
    killed = sum(1 for _, s, *_ in results if s == "killed")
    print(f"\n{killed} of {len(results)} mutations killed"
          + ("" if killed == len(results) else ": " + ", ".join(f"{m.name} ({s})" for m, s, *_ in results
                                                                   if s != "killed")))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
