"""Train the tiny Mixtral target / Mistral draft pair that ships in runtime/assets/tiny-pair/.

Scope: everything on the CPU, from scratch, in about ten minutes on two cores:

1. corpus: the Python standard library's .py files of the running interpreter, read at training time
   (never committed). A deterministic ~10% of files (by a hash of their relative path) is held out
   for evaluation.
2. tokenizer: byte-level BPE, 4096 entries, special tokens <s> </s> <pad>; a document is
   <s> file-text </s>.
3. target: MixtralForCausalLM, 4 layers, hidden 128, 8 experts top-2 (FFN 256), 8 heads / 2 KV heads,
   trained on next-token cross-entropy plus a per-layer load-balancing loss (transformers' aux loss
   pools all layers' router statistics, so one layer's dead experts can hide behind another's
   balanced ones; we ask every layer to balance on its own).
4. draft: MistralForCausalLM, 2 layers, hidden 128, FFN 384, distilled from the target:
   0.8 * KL(target || draft) + 0.2 * cross-entropy; embedding, final norm and lm_head start as copies
   of the target's (same width), which gives the draft the target's output space for free.
5. export: bf16 safetensors with real-checkpoint tensor names + config, generation config and
   tokenizer files per model, then an evaluation of the *shipped* files through our own runtime in
   fp32: held-out loss of both, expert load, and greedy speculative decoding at k=4 (per-position
   acceptance and tokens per verification). Results go to TRAINING.md and training_report.json.

6. (--eagle, separately, on the shipped target) the tiny feature draft `tiny-eagle`: an EAGLE-style head
   trained on the target's final-norm hidden states, exported to eagle/ in the EAGLE layout and measured
   through the engine at k=4 beside the draft model (eagle/TRAINING.md, eagle/training_report.json).

Usage (from the repo root):  nice .venv/bin/python tools/train_tiny_pair.py [--out DIR] [--quick]
                             nice .venv/bin/python tools/train_tiny_pair.py --eagle --threads 1   (~10 min)
--quick is a smoke run (a few steps, a temporary output folder unless --out is given).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "runtime" / "assets" / "tiny-pair"
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
BOS, EOS, PAD = 0, 1, 2
VOCAB = 4096
SEQ = 256

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Corpus and tokenizer
# ----------------------------------------------------------------------------------------------

def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) .py files of the standard library, split by a hash of the relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(f.parts) and f.is_file())
    is_held = [zlib.crc32(str(f.relative_to(root)).encode()) % 10 == 0 for f in files]
    return [f for f, h in zip(files, is_held) if not h], [f for f, h in zip(files, is_held) if h]


def read(f: Path) -> str:
    return f.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], max_chars: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        n = 0
        for f in files:
            t = read(f)
            yield t
            n += len(t)
            if n >= max_chars:
                return

    tok.train_from_iterator(texts(), trainer)
    # Encoding a text yields <s> first, as every training document starts.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


def token_stream(tok, files: list[Path], max_tokens: int) -> torch.Tensor:
    """<s> doc </s> <s> doc </s> ... as one long 1-D tensor, at most max_tokens long."""
    ids: list[int] = []
    for i in range(0, len(files), 64):
        for enc in tok.encode_batch([read(f) for f in files[i:i + 64]]):
            ids.extend(enc.ids)  # starts with <s>
            ids.append(EOS)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, g: torch.Generator):
    """Endless random windows: inputs [batch, SEQ], labels [batch, SEQ] (the next tokens)."""
    while True:
        start = torch.randint(0, len(stream) - SEQ - 1, (batch,), generator=g)
        win = torch.stack([stream[s:s + SEQ + 1] for s in start.tolist()])  # [batch, SEQ+1]
        yield win[:, :-1], win[:, 1:]


# ----------------------------------------------------------------------------------------------
# Models and losses
# ----------------------------------------------------------------------------------------------

def target_config():
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024, rope_theta=10000.0, sliding_window=None,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, router_aux_loss_coef=0.0,
                        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    # transformers 5 defaults MoE experts to "grouped_mm", ~15x slower than the per-expert loop on a CPU.
    cfg._experts_implementation = "eager"
    return cfg


def draft_config():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         rope_theta=10000.0, sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Mean over layers of E * sum_e f_e * P_e, per layer (Switch-Transformer style; 1 when uniform).

    f_e: fraction of the layer's top-k assignments that went to expert e; P_e: mean router
    probability of e. Minimising the product pushes each layer's load and preference towards uniform.
    """
    losses = []
    for logits in router_logits:  # [N, E] per layer
        E = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # [N, k]
        f = F.one_hot(chosen, E).sum(1).float().mean(0) / top_k  # [E]
        losses.append(E * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, lr: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def train_target(model, data, steps: int, lr: float, balance_coef: float, log_every: int):
    opt = make_optimizer(model, lr)
    model.train()
    k = model.config.num_experts_per_tok
    t0 = time.time()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        x, y = next(data)
        out = model(input_ids=x, output_router_logits=True)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        bal = balance_loss(out.router_logits, k)
        loss = ce + balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"target step {step + 1}/{steps}  ce {ce.item():.3f}  balance {bal.item():.3f}  "
                f"{(step + 1) * x.numel() / (time.time() - t0):.0f} tok/s")


def distill_draft(draft, teacher, data, steps: int, lr: float, kl_weight: float, log_every: int):
    opt = make_optimizer(draft, lr)
    draft.train()
    teacher.eval()
    t0 = time.time()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        x, y = next(data)
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher(input_ids=x).logits.float(), dim=-1)  # [B, T, V]
        s_logits = draft(input_ids=x).logits
        s_logp = torch.log_softmax(s_logits.float(), dim=-1)
        # KL(target || draft) = sum_v p_t (log p_t - log p_s), averaged over tokens
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        ce = F.nll_loss(s_logp.reshape(-1, s_logp.shape[-1]), y.reshape(-1))
        loss = kl_weight * kl + (1 - kl_weight) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"draft step {step + 1}/{steps}  kl {kl.item():.3f}  ce {ce.item():.3f}  "
                f"{(step + 1) * x.numel() / (time.time() - t0):.0f} tok/s")


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def save_model(model, tok, out: Path) -> None:
    """bf16 safetensors (real-checkpoint names), config, generation config, tokenizer files."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer_files(tok, out, model.config.max_position_embeddings)
    model.to(torch.float32)


# A plain chat template (the models were not trained on chats; it lets chat inputs be tried end to end):
# "<s># user:\n...\n# assistant:\n", each turn a comment line naming the role, then its content.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '# ' + message['role'] + ':\\n' + message['content'] "
                 "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '# assistant:\\n' }}{% endif %}")


def write_tokenizer_files(tok, out: Path, max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json with <s> </s> <pad> named.

    The class is recorded as PreTrainedTokenizerFast (transformers 5 writes its new backend name,
    which transformers 4 cannot resolve; both resolve this one).
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=max_length)
    fast.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Evaluation of the shipped files, through our runtime (fp32)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over held-out windows [N, SEQ+1]."""
    total, n = 0.0, 0
    for i in range(0, len(windows), 8):
        w = windows[i:i + 8]
        logits = model.logits_full(w[:, :-1])  # [b, SEQ, V]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        n += w[:, 1:].numel()
    return total / n


@torch.no_grad()
def heldout_agreement(target, draft, windows: torch.Tensor) -> float:
    """Fraction of held-out text positions where draft and target argmax agree, both reading the real
    text (teacher-forced). Unlike speculative acceptance this never sees the models' own, often
    repetitive, continuations, so it is the harder number."""
    same, n = 0, 0
    for i in range(0, len(windows), 8):
        x = windows[i:i + 8, :-1]
        same += (target.logits_full(x).argmax(-1) == draft.logits_full(x).argmax(-1)).sum().item()
        n += x.numel()
    return same / n


@torch.no_grad()
def expert_load(model, windows: torch.Tensor) -> list[list[float]]:
    """Per layer, the fraction of top-k assignments each expert receives on held-out text."""
    from specoffload.runtime import layers as L

    a, w = model.args, model.weights
    x_ids = windows[:8, :-1]
    cache = model.new_cache(x_ids.shape[0], x_ids.shape[1])
    pos = cache.positions(range(x_ids.shape[0]), x_ids.shape[1])
    cs = L.rope_cos_sin(model.inv_freq, pos)
    x = F.embedding(x_ids, w.embed)
    loads = []
    for i, lw in enumerate(w.layers):
        q, k, v = L.qkv(a, lw.attn, x, cs)
        x = x + L.attn_out(lw.attn, cache.attend(i, range(x.shape[0]), q, k, v))
        h = L.ffn_norm(a, lw.ffn, x).reshape(-1, a.dim)
        r = L.route(a, lw.ffn, h)
        loads.append((torch.bincount(r.experts.reshape(-1), minlength=a.n_experts).float() / r.experts.numel()).tolist())
        x = x + L.moe_experts(lw.experts, h, r).view_as(x)
    return loads


@torch.no_grad()
def speculative_acceptance(target, draft, prompts: list[list[int]], k: int, rounds: int) -> dict:
    """Greedy speculative decoding, batched over prompts: per-position acceptance and tokens/verification.

    Per row and round: the draft proposes d_1..d_k greedily; the target scores [last, d_1..d_k] in one
    pass (argmaxes t_0..t_k); d_i is accepted while d_i == t_{i-1}; the row gains the accepted d's plus
    t_n (the target's own next token). Acceptance at position i = P(d_i accepted | d_1..d_{i-1} were).
    Caches are rolled back to the committed sequence after each round.
    """
    B = len(prompts)
    max_len = max(map(len, prompts)) + rounds * (k + 1) + 2
    tc, dc = target.new_cache(B, max_len), draft.new_cache(B, max_len)
    seqs = [list(p) for p in prompts]  # committed tokens per row
    # Both caches hold every committed token but the last one, which the next round feeds.
    for model, cache in ((target, tc), (draft, dc)):
        n = torch.tensor([len(p) - 1 for p in prompts])
        x = torch.full((B, int(n.max())), PAD, dtype=torch.long)
        for b, p in enumerate(prompts):
            x[b, :len(p) - 1] = torch.tensor(p[:-1])
        model(x, cache, n_new=n, logits="last")
    reached, accepted, per_verify = torch.zeros(k), torch.zeros(k), []
    for _ in range(rounds):
        # Draft: catch up on committed tokens it has not seen (1 or 2), then propose k tokens.
        n_cat = torch.tensor([len(s) - int(dc.lengths[b]) for b, s in enumerate(seqs)])
        x = torch.full((B, int(n_cat.max())), PAD, dtype=torch.long)
        for b, s in enumerate(seqs):
            x[b, :n_cat[b]] = torch.tensor(s[len(s) - n_cat[b]:])
        proposal = [draft(x, dc, n_new=n_cat, logits="last").argmax(-1)]  # [B]
        for _ in range(k - 1):
            proposal.append(draft(proposal[-1][:, None], dc, logits="last").argmax(-1))
        d = torch.stack(proposal, 1)  # [B, k]
        # Target: one verification pass over [last committed, d_1..d_k].
        last = torch.tensor([s[-1] for s in seqs])
        t = target(torch.cat([last[:, None], d], 1), tc).argmax(-1)  # [B, k+1]
        match = (d == t[:, :k]).long().cumprod(1)  # [B, k], 1 while every earlier guess matched
        n_acc = match.sum(1)  # [B]
        for i in range(k):
            reached[i] += (n_acc >= i).sum()
            accepted[i] += (n_acc > i).sum()
        for b in range(B):
            n = int(n_acc[b])
            seqs[b].extend(d[b, :n].tolist() + [int(t[b, n])])
            per_verify.append(n + 1)
            # Keep the committed sequence minus its newest token in both caches.
            tc.rollback([b], len(seqs[b]) - 1)
            dc.rollback([b], min(int(dc.lengths[b]), len(seqs[b]) - 1))
    return {"k": k, "rows": B, "rounds": rounds,
            # None where no round got that far (only in smoke runs)
            "per_position_acceptance": [float(a / r) if r else None for a, r in zip(accepted, reached)],
            "mean_token_acceptance": float(accepted.sum() / reached.sum()),
            "tokens_per_verification": sum(per_verify) / len(per_verify),
            "sequences": seqs}


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def write_report(out: Path, report: dict) -> None:
    r = report
    acc = r["acceptance"]
    lines = [
        "# Tiny model pair: training report",
        "",
        "Written by `tools/train_tiny_pair.py`; numbers are for the shipped bf16 files, evaluated in fp32",
        "through `specoffload.runtime`. Corpus: the Python standard library's .py files of the training",
        f"interpreter (Python {r['python']}), {r['corpus']['train_files']} training / "
        f"{r['corpus']['heldout_files']} held-out files (held out: crc32(relative path) % 10 == 0).",
        "",
        "| | target (Mixtral) | draft (Mistral) |",
        "|---|---|---|",
        f"| layers, hidden | {r['target']['layers']}, 128 (8 experts top-2, FFN 256) | "
        f"{r['draft']['layers']}, 128 (FFN 384) |",
        f"| parameters | {r['target']['params']:,} | {r['draft']['params']:,} |",
        f"| model.safetensors (bf16) | {r['target']['file_mib']:.2f} MiB | {r['draft']['file_mib']:.2f} MiB |",
        f"| training | {r['target']['steps']} steps x {r['batch']}x{SEQ} tokens, {r['target']['minutes']:.1f} min | "
        f"{r['draft']['steps']} steps, {r['draft']['minutes']:.1f} min (0.8 KL to target + 0.2 CE) |",
        f"| held-out loss (nats/token) | {r['target']['heldout_loss']:.3f} | {r['draft']['heldout_loss']:.3f} |",
        "",
        f"Greedy speculative decoding, k={acc['k']}, {acc['rows']} held-out prompts x {acc['rounds']} rounds:",
        "",
        "| draft position i | " + " | ".join(str(i + 1) for i in range(acc["k"])) + " |",
        "|---|" + "---|" * acc["k"],
        "| P(accept i given 1..i-1 accepted) | "
        + " | ".join("n/a" if p is None else f"{p:.3f}" for p in acc["per_position_acceptance"]) + " |",
        "",
        f"Per-token acceptance {acc['mean_token_acceptance']:.3f}; tokens per verification "
        f"{acc['tokens_per_verification']:.2f} (out of at most {acc['k'] + 1}).",
        f"Speculative output equal to plain target greedy decoding: {r['spec_equals_greedy']}.",
        "",
        "Caveat: greedy continuations of a model this small fall into repetition within a few dozen",
        "tokens, where the draft agrees easily, which flatters the numbers above. Reading real held-out",
        "text instead (teacher-forced), the draft's argmax equals the target's at "
        f"{r['heldout_greedy_agreement']:.3f} of positions.",
        "",
        *(["Evaluation re-run with `--eval-only` on the trained files (tokenizer metadata files rewritten);",
           "the training numbers are those of the training run.", ""] if r.get("eval_rerun") else []),
        "Expert load of the target on held-out text (share of top-2 assignments per expert, per layer):",
        "",
    ]
    for i, load in enumerate(r["target"]["expert_load"]):
        lines.append(f"- layer {i}: " + " ".join(f"{x:.2f}" for x in load))
    lines += ["", f"Training wall time {r['train_wall_minutes']:.1f} min (tokenizer, data, both models), "
              f"evaluation {r['eval_minutes']:.1f} min, on {r['threads']} CPU threads "
              f"(torch {r['torch']}, transformers {r['transformers']}); 1-minute load average at the end of "
              f"the target / draft phases: {_fmt(r['target']['load_avg_at_end'])} / "
              f"{_fmt(r['draft']['load_avg_at_end'])} (above 2: the two cores were shared with other work).", ""]
    (out / "TRAINING.md").write_text("\n".join(lines))
    (out / "training_report.json").write_text(json.dumps(r, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------

def train(a, out: Path, tok, train_files: list[Path]) -> dict:
    """Train target then draft, export both to ``out``; returns the training half of the report."""
    from transformers import MistralForCausalLM, MixtralForCausalLM

    need = (a.target_steps + a.draft_steps) * a.batch * (SEQ + 1)
    train_stream = token_stream(tok, train_files, max_tokens=max(need, 200_000))
    log(f"tokens: {len(train_stream):,} train")
    g = torch.Generator().manual_seed(a.seed)
    log_every = 1 if a.quick else 50

    target = MixtralForCausalLM(target_config())
    t = time.time()
    train_target(target, batches(train_stream, a.batch, g), a.target_steps, lr=3e-3, balance_coef=0.02,
                 log_every=log_every)
    target_min, target_load = (time.time() - t) / 60, os.getloadavg()[0]
    save_model(target, tok, out / "target")
    log(f"saved target to {out / 'target'}")

    # The teacher is the shipped (bf16-rounded) target, so the draft learns what the target will say.
    teacher = MixtralForCausalLM.from_pretrained(out / "target", dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    draft = MistralForCausalLM(draft_config())
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
        draft.model.norm.weight.copy_(teacher.model.norm.weight)
        draft.lm_head.weight.copy_(teacher.lm_head.weight)
    t = time.time()
    distill_draft(draft, teacher, batches(train_stream, a.batch, g), a.draft_steps, lr=3e-3, kl_weight=0.8,
                  log_every=log_every)
    draft_min, draft_load = (time.time() - t) / 60, os.getloadavg()[0]
    save_model(draft, tok, out / "draft")
    log(f"saved draft to {out / 'draft'}")
    return {
        "threads": a.threads, "seed": a.seed, "batch": a.batch, "quick": a.quick,
        "train_tokens": len(train_stream),
        "target": {"layers": 4, "params": param_count(teacher), "steps": a.target_steps, "minutes": target_min,
                   "load_avg_at_end": target_load},
        "draft": {"layers": 2, "params": param_count(draft), "steps": a.draft_steps, "minutes": draft_min,
                  "load_avg_at_end": draft_load},
        "train_wall_minutes": (time.time() - T0) / 60,
    }


def evaluate(out: Path, tok, held_files: list[Path], quick: bool, seed: int) -> dict:
    """Evaluate the folders in ``out`` as shipped: our loader, bf16 files -> fp32 compute."""
    from specoffload.runtime.generate import generate
    from specoffload.runtime.loader import checkpoint_size_bytes
    from specoffload.runtime.model import Transformer

    held_stream = token_stream(tok, held_files, max_tokens=(8 if quick else 64) * (SEQ + 1))
    held_windows = held_stream.view(-1, SEQ + 1)  # [N, SEQ+1], non-overlapping
    ours_t, ours_d = Transformer.from_pretrained(out / "target"), Transformer.from_pretrained(out / "draft")
    loss_t, loss_d = heldout_loss(ours_t, held_windows), heldout_loss(ours_d, held_windows)
    log(f"held-out loss ({held_windows.numel():,} tokens): target {loss_t:.3f}, draft {loss_d:.3f}")
    agree = heldout_agreement(ours_t, ours_d, held_windows)
    log(f"teacher-forced greedy agreement on held-out text: {agree:.3f}")
    loads = expert_load(ours_t, held_windows)

    n_prompts, rounds = (4, 3) if quick else (32, 24)
    rng = random.Random(seed + 1)
    prompts = []
    for f in held_files[: n_prompts * 3]:
        ids = [BOS] + tok.encode(read(f), add_special_tokens=False).ids
        if len(ids) > 80 and len(prompts) < n_prompts:
            prompts.append(ids[: rng.randint(16, 64)])
    acc = speculative_acceptance(ours_t, ours_d, prompts, k=4, rounds=rounds)
    log(f"acceptance at k=4 per position {acc['per_position_acceptance']}, "
        f"per token {acc['mean_token_acceptance']:.3f}, tokens/verification {acc['tokens_per_verification']:.2f}")
    # The speculative output must be the target's own greedy continuation (checked, not assumed).
    n_spec = [len(s) - len(p) for s, p in zip(acc["sequences"], prompts)]
    greedy = generate(ours_t, prompts, max_new_tokens=n_spec, eos_token_id=None)
    same = sum(g_.tokens == s[len(p):] for g_, s, p in zip(greedy, acc.pop("sequences"), prompts))
    return {
        "heldout_tokens": held_windows.numel(),
        "target": {"file_mib": checkpoint_size_bytes(out / "target") / 2**20, "heldout_loss": loss_t,
                   "expert_load": loads},
        "draft": {"file_mib": checkpoint_size_bytes(out / "draft") / 2**20, "heldout_loss": loss_d},
        "acceptance": acc, "heldout_greedy_agreement": agree,
        "spec_equals_greedy": f"{same}/{len(prompts)} sequences",
    }


# ----------------------------------------------------------------------------------------------
# The tiny feature draft (EAGLE-style head) over the shipped target
# ----------------------------------------------------------------------------------------------

EAGLE_FFN = 384


class TrainableHead(torch.nn.Module):
    """The feature head's math (runtime/feature_draft.py) with trainable parameters under the canonical
    names: fc over [embedding; feature], one decoder layer without an input norm, the target's frozen
    embedding and LM head."""

    def __init__(self, args, embed: torch.Tensor, lm_head: torch.Tensor, ffn_dim: int):
        super().__init__()
        from specoffload.runtime.layers import rope_inv_freq

        D, H, Hkv, Dh = args.dim, args.n_heads, args.n_kv_heads, args.head_dim
        self.args = args
        lin = lambda o, i: torch.nn.Parameter(torch.randn(o, i) * (1 / math.sqrt(i)))  # noqa: E731
        self.p = torch.nn.ParameterDict({
            "fc_w": lin(D, 2 * D), "fc_b": torch.nn.Parameter(torch.zeros(D)),
            "wq": lin(H * Dh, D), "wk": lin(Hkv * Dh, D), "wv": lin(Hkv * Dh, D), "wo": lin(D, H * Dh),
            "ffn_norm": torch.nn.Parameter(torch.ones(D)), "w_gate": lin(ffn_dim, D), "w_up": lin(ffn_dim, D),
            "w_down": lin(D, ffn_dim)})
        with torch.no_grad():
            self.p["wo"].mul_(0.1)
            self.p["w_down"].mul_(0.1)
        self.register_buffer("embed", embed.detach().clone())
        self.register_buffer("lm_head", lm_head.detach().clone())
        self.register_buffer("inv_freq", rope_inv_freq(args))

    def forward(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], feats [B, T, D] (pair i: feature of position i, token i + 1) -> predicted
        features [B, T, D] (of positions 1..T), causal over the window."""
        from specoffload.runtime.layers import apply_rope, rms_norm, rope_cos_sin

        a, p = self.args, self.p
        B, T = tokens.shape
        x = F.linear(torch.cat((F.embedding(tokens, self.embed), feats), -1), p["fc_w"], p["fc_b"])
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(T)[None].expand(B, T))
        q = apply_rope(F.linear(x, p["wq"]).view(B, T, a.n_heads, a.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(F.linear(x, p["wk"]).view(B, T, a.n_kv_heads, a.head_dim), cos, sin).transpose(1, 2)
        v = F.linear(x, p["wv"]).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
        x = x + F.linear(o.reshape(B, T, -1), p["wo"])
        h = rms_norm(x, p["ffn_norm"], a.norm_eps)
        return x + F.linear(F.silu(F.linear(h, p["w_gate"])) * F.linear(h, p["w_up"]), p["w_down"])

    def canonical(self) -> dict[str, torch.Tensor]:
        p = self.p
        return {"fc.w": p["fc_w"], "fc.b": p["fc_b"], "attn.wq": p["wq"], "attn.wk": p["wk"], "attn.wv": p["wv"],
                "attn.wo": p["wo"], "ffn.norm": p["ffn_norm"], "ffn.w_gate": p["w_gate"], "ffn.w_up": p["w_up"],
                "ffn.w_down": p["w_down"]}


@torch.no_grad()
def target_features(hf_target, windows: torch.Tensor) -> torch.Tensor:
    """The target's final-norm hidden states (its LM head's input) for windows [N, SEQ] -> [N, SEQ, D]."""
    out = []
    for i in range(0, len(windows), 8):
        out.append(hf_target.model(input_ids=windows[i:i + 8]).last_hidden_state.float())
    return torch.cat(out)


def train_eagle(out: Path, tok, train_files: list[Path], held_files: list[Path], steps: int, windows: int,
                batch: int, seed: int, quick: bool) -> dict:
    """Train the tiny feature draft on the shipped target's features, export it to out/eagle, measure it.

    Loss per position (as EAGLE): smooth-L1 between the predicted and the target's next feature, plus
    0.1 x cross-entropy of the LM head on the prediction against the target's next-token distribution;
    uniform noise (+-0.1 of the feature scale) on the input features during training so the head learns
    to continue from its own slightly-off predictions.
    """
    from transformers import MixtralForCausalLM

    from specoffload.runtime.config import load_args
    from specoffload.runtime.feature_draft import head_config, write_head
    from specoffload.runtime.loader import checkpoint_size_bytes

    t_start = time.time()
    args = load_args(out / "target")
    hf = MixtralForCausalLM.from_pretrained(out / "target", dtype=torch.float32,
                                            experts_implementation="eager").eval()
    stream = token_stream(tok, train_files, max_tokens=windows * (SEQ + 1))
    wins = stream[: (len(stream) // (SEQ + 1)) * (SEQ + 1)].view(-1, SEQ + 1)[:, :-1]  # [N, SEQ]
    feats = target_features(hf, wins)  # [N, SEQ, D]
    log(f"eagle: {wins.shape[0]} windows of target features in {time.time() - t_start:.0f}s")
    head = TrainableHead(args, hf.model.embed_tokens.weight.float(), hf.lm_head.weight.float(), EAGLE_FFN)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    scale = float(feats.abs().mean())
    t0 = time.time()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, 3e-3, warmup=max(1, steps // 20))
        idx = torch.randint(0, len(wins), (batch,), generator=g)
        x_tok, f = wins[idx], feats[idx]  # [b, SEQ], [b, SEQ, D]
        inp_f = f[:, :-1] + (torch.rand(f[:, :-1].shape, generator=g) - 0.5) * 0.2 * scale
        pred = head(x_tok[:, 1:], inp_f)  # predicts f[:, 1:]
        want = f[:, 1:]
        reg = F.smooth_l1_loss(pred, want)
        # The classification term on a quarter of the positions (the LM head over the vocabulary is most
        # of a step's cost on the CPU).
        pick = torch.randperm(want.shape[1], generator=g)[: want.shape[1] // 4]
        with torch.no_grad():
            t_logp = torch.log_softmax(F.linear(want[:, pick], head.lm_head), -1)
        s_logp = torch.log_softmax(F.linear(pred[:, pick], head.lm_head), -1)
        cls = -(t_logp.exp() * s_logp).sum(-1).mean()
        loss = reg + 0.1 * cls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        if step % (1 if quick else 25) == 0 or step == steps - 1:
            log(f"eagle step {step + 1}/{steps}  reg {reg.item():.4f}  cls {cls.item():.3f}")
    train_min = (time.time() - t0) / 60
    cfg = head_config(args, "eagle", ffn_dim=EAGLE_FFN)
    weights = {k: v.detach().to(torch.bfloat16) for k, v in head.canonical().items()}
    write_head(out / "eagle", cfg, weights, "eagle")
    log(f"saved eagle head to {out / 'eagle'}")
    result = {"params": sum(v.numel() for v in weights.values()), "steps": steps, "batch": batch,
              "windows": int(wins.shape[0]), "train_minutes": train_min,
              "file_mib": checkpoint_size_bytes(out / "eagle") / 2**20, "ffn_dim": EAGLE_FFN,
              "threads": torch.get_num_threads(), "load_avg_at_end": os.getloadavg()[0]}
    result.update(measure_eagle(out, tok, held_files, quick, seed))
    return result


def measure_eagle(out: Path, tok, held_files: list[Path], quick: bool, seed: int) -> dict:
    """Greedy speculative decoding at k=4 through the engine on held-out prompts: the tiny feature draft
    and the tiny draft model side by side, and both outputs checked against plain greedy decoding."""
    from specoffload.planner.schema import Plan, Prediction, Workload
    from specoffload.runtime.engine import Engine, Request

    n_prompts, gen = (4, 8) if quick else (32, 48)
    rng = random.Random(seed + 1)
    prompts = []
    for f in held_files[: n_prompts * 3]:
        ids = [BOS] + tok.encode(read(f), add_special_tokens=False).ids
        if len(ids) > 80 and len(prompts) < n_prompts:
            prompts.append(ids[: rng.randint(16, 64)])
    pred = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "h2d", 0, 0)

    def run(k: int, draft_dir):
        plan = Plan(policy="serial-spec" if k else "offload-only", model="tiny-target", model_fingerprint="",
                    draft="d" if k else "", draft_fingerprint="", profile="cpu", profile_fingerprint="",
                    workload=Workload(prompt_len_tokens=64, gen_len_tokens=gen, num_prompts=len(prompts),
                                      max_prompt_len_tokens=64),
                    decode_batch=len(prompts), num_batches=1, prefill_batch=len(prompts), draft_sub_batch=1,
                    draft_len=k, micro_batches=1, gpu_attn_layers=0, gpu_ffn_layers=0, gpu_kv_sequences=0,
                    target_attention="cpu", draft_kv="gpu", weight_buffers=2, prediction=pred)
        eng = Engine(plan, out / "target", draft_dir)
        outs = {}
        reqs = [Request(str(i), p, gen) for i, p in enumerate(prompts)]
        stats = eng.run(reqs, lambda fin: outs.__setitem__(fin.request.id, fin.tokens))
        return [outs[str(i)] for i in range(len(prompts))], stats.acceptance

    greedy, _ = run(0, None)
    res = {"prompts": len(prompts), "gen_tokens": gen, "k": 4}
    for name, d in (("eagle", out / "eagle"), ("draft", out / "draft")):
        outs, acc = run(4, d)
        pp = acc.per_position()
        res[name] = {"per_position_acceptance": pp, "tokens_per_verification": acc.mean_tokens_per_round,
                     "equals_greedy": f"{sum(o == g_ for o, g_ in zip(outs, greedy))}/{len(prompts)} sequences"}
        log(f"{name}: acceptance at k=4 per position {[round(x, 3) for x in pp]}, "
            f"tokens/verification {acc.mean_tokens_per_round:.2f}, equals greedy {res[name]['equals_greedy']}")
    return res


def write_eagle_report(out: Path, r: dict) -> None:
    e, d = r["eagle"], r["draft"]
    pos = lambda xs: " | ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    lines = [
        "# Tiny feature draft (`tiny-eagle`): training report",
        "",
        "Written by `tools/train_tiny_pair.py --eagle`. An EAGLE-style head over the shipped tiny target:",
        "fc [embedding; target feature] 256 -> 128 (with bias), one decoder layer (8 heads / 2 KV heads, no",
        f"input norm, SwiGLU FFN {r['ffn_dim']}), the target's embedding and LM head. {r['params']:,} parameters of",
        f"its own, {r['file_mib']:.2f} MiB bf16 (EAGLE layout). Trained {r['steps']} steps x {r['batch']} windows of",
        f"{SEQ} tokens drawn from {r['windows']} windows of the target's final-norm hidden states on the training",
        "corpus (smooth-L1 on the next feature + 0.1 x cross-entropy against the target's next-token",
        "distribution on a quarter of the positions, uniform noise on the input features),",
        f"{r['train_minutes']:.1f} min on the CPU ({r.get('threads', 1)} thread, machine shared).",
        "",
        f"Greedy speculative decoding through the engine (serial schedule, k={r['k']}), {r['prompts']} held-out",
        f"prompts x {r['gen_tokens']} generated tokens, the same prompts for both drafts:",
        "",
        "| draft | " + " | ".join(f"P(accept {i + 1})" for i in range(r["k"])) + " | tokens / verification |"
        " output = target greedy |",
        "|---|" + "---|" * (r["k"] + 2),
        f"| tiny-eagle (feature draft) | {pos(e['per_position_acceptance'])} | {e['tokens_per_verification']:.2f} | "
        f"{e['equals_greedy']} |",
        f"| tiny-draft (2-layer model) | {pos(d['per_position_acceptance'])} | {d['tokens_per_verification']:.2f} | "
        f"{d['equals_greedy']} |",
        "",
        "P(accept i) is the probability that draft position i is accepted given positions 1..i-1 were.",
        "",
    ]
    (out / "eagle" / "TRAINING.md").write_text("\n".join(lines))
    (out / "eagle" / "training_report.json").write_text(json.dumps(r, indent=1) + "\n")


def training_part(report: dict) -> dict:
    """The training numbers of an earlier report (for --eval-only), in the shape ``train`` returns.

    Reports from before the load-average and train/eval split have ``wall_minutes`` (training plus a
    few seconds of evaluation) and no load averages; those become the closest fields / None.
    """
    part = {k: report[k] for k in ("threads", "seed", "batch", "quick")}
    part["train_tokens"] = report.get("train_tokens", report.get("corpus", {}).get("train_tokens"))
    part["train_wall_minutes"] = report.get("train_wall_minutes", report.get("wall_minutes"))
    for m in ("target", "draft"):
        part[m] = {k: report[m].get(k) for k in ("layers", "params", "steps", "minutes", "load_avg_at_end")}
    return part


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--quick", action="store_true", help="smoke run: a few steps, temporary output folder")
    ap.add_argument("--eval-only", action="store_true",
                    help="keep the trained weights in --out; rewrite its tokenizer files, re-evaluate, "
                         "update the report (training numbers are kept from its training_report.json)")
    ap.add_argument("--target-steps", type=int, default=1000)
    ap.add_argument("--draft-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eagle", action="store_true",
                    help="train only the tiny feature draft (EAGLE-style head) over the target in --out, into "
                         "its eagle/ folder, and measure its acceptance")
    ap.add_argument("--eagle-steps", type=int, default=1000)
    ap.add_argument("--eagle-windows", type=int, default=200)
    ap.add_argument("--eagle-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.quick:
        a.target_steps, a.draft_steps = 3, 3
    out = a.out or (Path(tempfile.mkdtemp(prefix="tiny-pair-")) if a.quick else DEFAULT_OUT)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)

    import transformers

    transformers.logging.set_verbosity_error()
    train_files, held_files = stdlib_files()
    random.Random(a.seed).shuffle(train_files)  # so a token budget samples the whole library
    log(f"corpus: {len(train_files)} train / {len(held_files)} held-out files")
    if a.eagle:
        from tokenizers import Tokenizer

        if a.quick and a.out is None:
            raise SystemExit("--eagle --quick needs --out (a folder holding a trained target)")
        tok = Tokenizer.from_file(str(out / "target" / "tokenizer.json"))
        steps, windows = (3, 16) if a.quick else (a.eagle_steps, a.eagle_windows)
        r = train_eagle(out, tok, train_files, held_files, steps, windows, a.eagle_batch, a.seed, a.quick)
        write_eagle_report(out, r)
        log(f"wrote {out / 'eagle' / 'TRAINING.md'}")
        return 0
    if a.eval_only:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "target" / "tokenizer.json"))
        for sub in ("target", "draft"):
            max_len = json.loads((out / sub / "config.json").read_text())["max_position_embeddings"]
            write_tokenizer_files(tok, out / sub, max_len)
        trained = training_part(json.loads((out / "training_report.json").read_text()))
        trained["eval_rerun"] = True
    else:
        tok = train_tokenizer(train_files, max_chars=2_000_000 if a.quick else 12_000_000)
        log(f"tokenizer: {tok.get_vocab_size()} tokens")
        trained = train(a, out, tok, train_files)
    t_eval = time.time()
    evaluated = evaluate(out, tok, held_files, trained["quick"], trained["seed"])
    report = {**trained, **evaluated, "eval_minutes": (time.time() - t_eval) / 60,
              "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
              "corpus": {"train_files": len(train_files), "heldout_files": len(held_files),
                         "train_tokens": trained["train_tokens"], "heldout_tokens": evaluated["heldout_tokens"]}}
    for part in ("target", "draft"):  # each model's training and evaluation numbers together
        report[part] = {**trained[part], **evaluated[part]}
    for moved in ("train_tokens", "heldout_tokens"):  # now under "corpus"
        report.pop(moved)
    write_report(out, report)
    log(f"wrote {out / 'TRAINING.md'}; spec == greedy {report['spec_equals_greedy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
