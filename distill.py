"""
Distill a tiny Llama into Mamba/attention hybrids on Shakespeare (The Mamba in the Llama, §3).

    python distill.py              stage 0: train the teacher; stage 1: distill it stepwise into the
                                   50%, 25%, 12.5% attention hybrids (MLPs frozen); stage 2: fine-tune
                                   each end to end; the speculative-decoding draft; evaluate them all
    python distill.py --ablate     the same, then the paper's ablations as markdown tables

Finished stages are skipped on a rerun; an interrupted stage resumes from its last checkpoint.
Checkpoints live in out/<preset>/. Every setting below is overridable as --key=value.
"""
import itertools
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import kernels
import mil

# the presets: cpu finishes the whole pipeline in minutes on 2 cores; gpu is sized for one H200
PRESETS = {
    "cpu": dict(n_layer=8, d_model=64, n_head=4, n_kv_head=2, block_size=64, batch_size=16,
                teacher_steps=800, eval_every=100, lr=3e-3, distill_steps=100, distill_lr=2e-3,
                ft_steps=40, draft_steps=150, draft_sequences=256, ablate_steps=40, eval_windows=64),
    "gpu": dict(n_layer=8, d_model=384, n_head=6, n_kv_head=2, block_size=512, batch_size=32,
                teacher_steps=700, eval_every=50, lr=2e-3, distill_steps=300, distill_lr=1e-3,
                ft_steps=100, draft_steps=3000, draft_sequences=2048, ablate_steps=100,
                eval_windows=236),
}
DEFAULTS = dict(
    preset="auto",  # cpu | gpu | auto (gpu when CUDA is available)
    device="auto",  # cpu | cuda | auto
    scan="auto",  # selective scan: auto (Triton on GPU) | triton | ref
    out_dir="",  # default: out/<preset>
    seed=1337,
    **PRESETS["cpu"],
    warmup=50,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    grad_clip=1.0,
    log_every=50,
    ckpt_every=100,  # resume checkpoint every N steps
    stop_after=0,  # stop a stage after N steps of this run, as if killed (a rerun resumes); 0: never
    attn_fractions="0.5,0.25,0.125",  # stepwise: each student starts from the previous one (§3)
    alpha=0.0,  # Eq. 2: alpha * CE(targets) + beta * KL(teacher || student); the paper's 1 and 0.1. Pure KL
    beta=1.0,  # is as good in perplexity (README) and its hybrids follow the teacher, and so the draft, closer
    targets="corpus",  # corpus | teacher (pseudo-labels: the paper's sequence-level distillation)
    pseudo_sequences=512,  # how many teacher generations to sample (once, cached) for targets=teacher
    finetune=True,  # stage 2: end-to-end fine-tuning of every parameter
    draft_layers=1,  # the speculative-decoding draft's layers (README: 1 vs 2 on the H200)
    ablate=False,
)


# -----------------------------------------------------------------------------------------------
# Data


class Data:
    """Random training windows from the training works; fixed, non-overlapping validation windows."""

    def __init__(self, device, block_size):
        tok = mil.Tokenizer()
        train, val = mil.load_works()
        self.tok, self.device, self.block_size = tok, device, block_size
        self.train = torch.from_numpy(mil.encode_works(tok, train).astype("int64"))
        self.val = torch.from_numpy(mil.encode_works(tok, val).astype("int64"))

    def batch(self, batch_size, gen, tokens=None):  # (b, l) inputs and next-token targets
        tokens = self.train if tokens is None else tokens
        i = torch.randint(len(tokens) - self.block_size - 1, (batch_size,), generator=gen)
        w = torch.stack([tokens[j:j + self.block_size + 1] for j in i.tolist()]).to(self.device)
        return w[:, :-1], w[:, 1:]

    def val_windows(self, length, count):  # (count, length + 1), evenly spread over the held-out works
        starts = torch.linspace(0, len(self.val) - length - 1, count).long().tolist()
        return torch.stack([self.val[s:s + length + 1] for s in starts]).to(self.device)


# -----------------------------------------------------------------------------------------------
# One training loop for every stage: AdamW, warmup then cosine, clipping, bf16 on GPU, resumable


def train(name, model, cfg, data, steps, lr, loss_fn, params, eval_fn=None, save=True):
    """Trains `params` of `model` for `steps`, resuming from out_dir/name.resume.pt if present, and
    (with save) writes out_dir/name.pt. loss_fn(model, gen) -> loss. With eval_fn, keeps the
    best-validation weights. Returns the state: step, loss log, best validation loss and step."""
    path = os.path.join(cfg["out_dir"], name + ".resume.pt")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    state = dict(step=0, log=[], best_val=math.inf, best_step=0, best_model=None)
    if os.path.exists(path):
        ckpt = torch.load(path, map_location=data.device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["gen"].cpu())  # the batch sampler draws on the CPU
        state = ckpt["state"]
        print(f"{name}: resuming at step {state['step']} from {path}")

    def checkpoint():
        mil.save_checkpoint(path, model=model.state_dict(), optimizer=opt.state_dict(), gen=gen.get_state(), state=state)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if data.device.type == "cuda" else nullcontext()
    warmup, min_lr = min(cfg["warmup"], steps // 10), lr * cfg["min_lr_ratio"]
    model.train()
    bar = tqdm(range(state["step"], steps), desc=name, initial=state["step"], total=steps, leave=False)
    t0, ran = time.time(), 0
    for step in bar:
        if eval_fn and step % cfg["eval_every"] == 0:
            val = eval_fn(model)
            if val < state["best_val"]:
                state.update(best_val=val, best_step=step, best_model={k: v.clone() for k, v in model.state_dict().items()})
            model.train()
        # warmup then cosine decay to min_lr
        frac = (step - warmup) / max(1, steps - warmup)
        for g in opt.param_groups:
            g["lr"] = lr * (step + 1) / warmup if step < warmup else min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
        with autocast:
            loss = loss_fn(model, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        state["step"], ran = step + 1, ran + 1
        state["log"].append(loss.item())
        if (step + 1) % cfg["log_every"] == 0 or step + 1 == steps:
            dt = (time.time() - t0) / ran
            tqdm.write(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}, {dt * 1000:.0f} ms/step, "
                       f"{cfg['batch_size'] * cfg['block_size'] / dt:,.0f} tokens/s")
        if (step + 1) % cfg["ckpt_every"] == 0 or ran == cfg["stop_after"]:
            checkpoint()
        if ran == cfg["stop_after"] and step + 1 < steps:
            print(f"{name}: stopped after {ran} steps (--stop_after); rerun to resume")
            sys.exit(0)
    if eval_fn:
        val = eval_fn(model)
        if val < state["best_val"]:
            state.update(best_val=val, best_step=steps, best_model=None)
        if state["best_model"] is not None:
            model.load_state_dict(state["best_model"])
        print(f"{name}: best validation loss {state['best_val']:.4f} at step {state['best_step']} of {steps}"
              + (" (still falling: raise the step count)" if state["best_step"] == steps else ""))
    if save:
        mil.save_checkpoint(os.path.join(cfg["out_dir"], name + ".pt"), model=model.state_dict(), config=model.cfg.to_dict(),
                            run=cfg, log=state["log"], best_val=state["best_val"], best_step=state["best_step"])
    if os.path.exists(path):
        os.remove(path)  # only now: the finished stage is on disk
    return state


# -----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, windows, teacher=None, batch=8):
    """Mean next-token loss on validation windows (b, l+1); with a teacher, also top-1 agreement."""
    model.eval()
    total, agree, n = 0.0, 0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if windows.is_cuda else nullcontext()
    for w in windows.split(batch):
        with autocast:
            logits, _ = model(w[:, :-1])
            if teacher is not None:
                agree += (logits.argmax(-1) == teacher(w[:, :-1])[0].argmax(-1)).sum().item()
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    return total / n, agree / n


@torch.no_grad()
def decode_speed(model, data, new_tokens=48):
    """Greedy sample from a fixed validation prompt; returns (text, tokens/s)."""
    prompt = data.val[1000:1016][None].to(data.device)
    mil.generate(model, prompt, 4, temperature=0)  # warm-up
    if data.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    out = mil.generate(model, prompt, new_tokens, temperature=0)
    if data.device.type == "cuda":
        torch.cuda.synchronize()
    return data.tok.decode(out[0, 16:].tolist()), new_tokens / (time.time() - t0)


def results_table(rows):
    head = "| model | attention layers | val loss | perplexity | ppl / teacher | top-1 agreement | decode tokens/s | greedy sample |"
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        sample = r["sample"].replace("\n", " / ").replace("|", "/")[:60]
        lines.append(f"| {r['name']} | {r['layers']} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['ratio']:.3f} | "
                     f"{r['agree']:.3f} | {r['tps']:.0f} | {sample} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The stages


def distill_loss(student, teacher, data, cfg, pool=None, alpha=None, beta=None):
    """Eq. 2, per token: alpha * CE(student, targets) + beta * KL(p_teacher || p_student)."""
    alpha = cfg["alpha"] if alpha is None else alpha
    beta = cfg["beta"] if beta is None else beta

    def loss_fn(model, gen):
        x, y = data.batch(cfg["batch_size"], gen, pool)
        with torch.no_grad():
            t_logits, _ = teacher(x)
        s_logits, ce = model(x, y)
        kl = F.kl_div(F.log_softmax(s_logits.flatten(0, 1).float(), -1), F.log_softmax(t_logits.flatten(0, 1).float(), -1),
                      log_target=True, reduction="batchmean")
        return alpha * ce + beta * kl

    return loss_fn


def trainable(model, which):
    """which: mamba (stage 1: only the Mamba layers train; MLPs, norms, embeddings frozen) | all."""
    for name, p in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        p.requires_grad_(which == "all" or (layer is not None and layer not in model.cfg.attn_layers and ".mixer." in name))
    return [p for p in model.parameters() if p.requires_grad]


def finished(cfg, data, name, expect):
    """The stage's model if an earlier run finished it (trained with another config: an error), else None."""
    path = os.path.join(cfg["out_dir"], name + ".pt")
    return mil.load_model(path, expect=expect, device=data.device)[0] if os.path.exists(path) else None


def teacher_stage(cfg, data, mcfg):
    if done := finished(cfg, data, "teacher", mcfg):
        return done
    torch.manual_seed(cfg["seed"])
    model = mil.Model(mcfg).to(data.device)
    print(f"stage 0: training the teacher, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    windows = data.val_windows(cfg["block_size"], cfg["eval_windows"])

    def loss_fn(m, gen):
        return m(*data.batch(cfg["batch_size"], gen))[1]

    train("teacher", model, cfg, data, cfg["teacher_steps"], cfg["lr"], loss_fn, list(model.parameters()),
          eval_fn=lambda m: evaluate(m, windows)[0])
    return model


def student_stage(cfg, data, teacher, name, attn_layers, prev=None, init="attention", freeze="mamba", steps=None,
                  pool=None, conv_init=None, alpha=None, beta=None, save=True):
    """Stage 1 (freeze="mamba") or an ablation run: a hybrid from the teacher (and the previous
    student, stepwise), distilled with Eq. 2."""
    expect = mil.hybrid_config(teacher.cfg, attn_layers, conv_init)
    if save and (done := finished(cfg, data, name, expect)):
        return done
    torch.manual_seed(cfg["seed"])
    model = mil.hybrid_from_teacher(teacher, attn_layers, init=init, student=prev, conv_init=conv_init)
    train(name, model, cfg, data, steps or cfg["distill_steps"], cfg["distill_lr"],
          distill_loss(model, teacher, data, cfg, pool, alpha, beta), trainable(model, freeze), save=save)
    return model


def finetune_stage(cfg, data, teacher, student, name):
    """Stage 2: every parameter trains, same loss (the paper's end-to-end stage)."""
    if done := finished(cfg, data, name, student.cfg):
        return done
    model = mil.Model(student.cfg).to(data.device)
    model.load_state_dict(student.state_dict())
    train(name, model, cfg, data, cfg["ft_steps"], cfg["distill_lr"] / 3, distill_loss(model, teacher, data, cfg),
          trainable(model, "all"))
    return model


def draft_stage(cfg, data, teacher):
    """The speculative-decoding draft, shared by every hybrid: a `draft_layers`-layer Transformer made
    of the teacher's layers, first and last kept ("shrink and fine-tune", the paper's Table 5), trained
    with KL to the teacher. At batch 1 a step costs about its number of kernels, so fewer layers is a
    cheaper draft. It trains on the teacher's own continuations, greedy and sampled, half each: text
    like what the hybrids decode, where the draft must agree with them (README: it is accepted more
    often than a draft trained on the corpus)."""
    n, m = teacher.cfg.n_layer, cfg["draft_layers"]
    if not 1 <= m <= n:
        raise SystemExit(f"--draft_layers takes 1 to {n} (the teacher's layers); got {m}")
    draft_cfg = replace(teacher.cfg, n_layer=m, attn_layers=None, dropout=0.0)
    if done := finished(cfg, data, "draft", draft_cfg):
        return done
    pool = torch.cat([teacher_generations(cfg, data, teacher, temp, cfg["draft_sequences"], name)
                      for temp, name in ((0.0, "draft_greedy"), (1.0, "draft_sampled"))])
    draft = mil.Model(draft_cfg).to(data.device)
    sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith("layers.")}
    for i, src in enumerate([round(i * (n - 1) / (m - 1)) for i in range(m)] if m > 1 else [0]):
        sd.update({k.replace(f"layers.{src}.", f"layers.{i}.", 1): v for k, v in teacher.state_dict().items()
                   if k.startswith(f"layers.{src}.")})
    draft.load_state_dict(sd)
    train("draft", draft, cfg, data, cfg["draft_steps"], cfg["distill_lr"],
          distill_loss(draft, teacher, data, cfg, pool, alpha=0.0, beta=1.0), trainable(draft, "all"))
    return draft


def teacher_generations(cfg, data, teacher, temperature, count, name):
    """`count` teacher continuations (temperature 0: greedy) of 16-token corpus prompts, a block long,
    sampled once and cached in out_dir/<name>.pt as one token stream, from which training windows are
    drawn as from the corpus. With temperature 1 they are the paper's pseudo-labels."""
    path = os.path.join(cfg["out_dir"], name + ".pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    dev_gen = torch.Generator(device=data.device).manual_seed(cfg["seed"] + 1)
    batch, seqs = 512 if data.device.type == "cuda" else 64, []
    for i in tqdm(range(0, count, batch), desc=name, leave=False):
        prompt, _ = data.batch(min(batch, count - i), gen)
        seqs.append(mil.generate(teacher, prompt[:, :16], cfg["block_size"] - 15, temperature, generator=dev_gen).cpu())
    pool = torch.cat(seqs).flatten()
    mil.atomic_write(lambda f: torch.save(pool, f), path)
    return pool


def pseudo_labels(cfg, data, teacher):  # the paper's sequence-level targets (--targets=teacher)
    return teacher_generations(cfg, data, teacher, 1.0, cfg["pseudo_sequences"], "pseudo")


# -----------------------------------------------------------------------------------------------
# The paper's ablations (`--ablate`), each student trained for the same ablate_steps


def copy_probe_loss(model, data, gap, span=64, probes=16, seed=0):
    """Recall: a random 64-token validation span, `gap` tokens of other validation text, then the span
    again; the mean loss on the repeated span (its first token excepted: nothing predicts it)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(probes):
        i, j = torch.randint(len(data.val) - span - gap - 1, (2,), generator=g).tolist()
        seqs.append(torch.cat([data.val[i:i + span], data.val[j:j + gap], data.val[i:i + span]]))
    x = torch.stack(seqs).to(data.device)  # (probes, 2 span + gap)
    with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else nullcontext()):
        logits = torch.cat([model(part)[0] for part in x[:, :-1].split(4)])
    second = slice(span + gap, 2 * span + gap - 1)  # predictions of the repeated span's tokens 2..span
    return F.cross_entropy(logits[:, second].flatten(0, 1).float(), x[:, second.start + 1:].flatten()).item()


def ablations(cfg, data, teacher, students):
    steps, n, L = cfg["ablate_steps"], cfg["n_layer"], cfg["block_size"]
    half, quarter = mil.kept_attention(n, 0.5), mil.kept_attention(n, 0.25)
    windows = data.val_windows(L, cfg["eval_windows"])
    ppl = lambda m: math.exp(evaluate(m, windows)[0])
    t_ppl = ppl(teacher)
    run = lambda name, layers, **kw: student_stage(cfg, data, teacher, "ablate_" + name, layers, steps=steps, save=False, **kw)
    fmt = lambda p: f"{p:.2f} ({p / t_ppl:.3f}x)"
    out = [f"Validation perplexity (ratio to the teacher's {t_ppl:.2f}), every student trained {steps} steps.\n",
           "| model | attention init, frozen MLP | attention init, trainable MLP | random init, frozen MLP | random init, trainable MLP |",
           "| --- | --- | --- | --- | --- |"]
    trained = {}
    for frac, layers in (("50%", half), ("0%", ())):  # Table 7, left
        cells = []
        for init, freeze in itertools.product(("attention", "random"), ("mamba", "all")):
            trained[frac, init, freeze] = run(f"{frac[:-1]}_{init}_{freeze}", layers, init=init, freeze=freeze)
            cells.append(fmt(ppl(trained[frac, init, freeze])))
        out.append(f"| {frac} attention | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    base = trained["50%", "attention", "mamba"]
    removed = mil.Model(base.cfg).to(data.device)
    removed.load_state_dict(base.state_dict())
    with torch.no_grad():  # Table 9: the Mamba mixers' outputs removed, MLPs and attention kept
        for i, block in enumerate(removed.layers):
            if i not in half:
                block.mixer.o_proj.weight.zero_()
    variants = [  # Table 7, right; the targets; the loss; the conv's initialization; Table 9
        ("25%: stepwise (from the 50% student)", run("25_stepwise", quarter, prev=base)),
        ("25%: one jump from the teacher", run("25_jump", quarter)),
        ("50%: interleaved (layers " + ",".join(map(str, half)) + ")", base),
        ("50%: contiguous (layers " + ",".join(map(str, range(n - len(half), n))) + ")",
         run("50_contiguous", tuple(range(n - len(half), n)))),
        ("50%: pure KL (the default)", base),
        ("50%: corpus targets, CE + 0.1 KL (Eq. 2)", run("50_cekl", half, alpha=1.0, beta=0.1)),
        ("50%: teacher pseudo-labels, CE + 0.1 KL", run("50_pseudo", half, pool=pseudo_labels(cfg, data, teacher),
                                                         alpha=1.0, beta=0.1)),
        ("50%: conv initialized as identity (the default)", base),
        ("50%: conv with PyTorch's default init", run("50_conv", half, conv_init="default")),
        ("50%: Mamba mixers removed, MLPs kept", removed),
    ]
    out += ["", "| variant | perplexity |", "| --- | --- |"] + [f"| {name} | {fmt(ppl(m))} |" for name, m in variants]
    models = [("teacher", teacher)] + students + [("0% (pure Mamba)", trained["0%", "attention", "mamba"])]
    mults = (1, 2, 4, 8)
    out += ["", "Length: perplexity on validation windows of 1x-8x the training context (" + str(L) + " tokens).", "",
            "| model | " + " | ".join(f"{m}x" for m in mults) + " |", "|" + " --- |" * (len(mults) + 1)]
    for name, m in models:
        cells = [math.exp(evaluate(m, data.val_windows(L * k, min(cfg["eval_windows"], (len(data.val) - 1) // (L * k))),
                                   batch=max(1, 8 // k))[0]) for k in mults]
        out.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    gaps = sorted({0, 256, 1024, 4 * L})
    out += ["", "Recall: mean loss on a repeated 64-token span after a gap of G tokens (lower: better recall).", "",
            "| model | " + " | ".join(f"G={g}" for g in gaps) + " |", "|" + " --- |" * (len(gaps) + 1)]
    for name, m in models:
        out.append(f"| {name} | " + " | ".join(f"{copy_probe_loss(m, data, g):.3f}" for g in gaps) + " |")
    return "\n".join(out)


def resolve(argv):
    """Options: the preset's values are the defaults; --key=value overrides them."""
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), "auto")
    if preset == "auto":
        preset = "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        raise SystemExit(f"--preset takes {', '.join(PRESETS)} or auto; got {preset!r}")
    cfg = mil.parse_options({**DEFAULTS, **PRESETS[preset], "preset": preset}, argv, __doc__)
    cfg["preset"] = preset
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    cfg["out_dir"] = cfg["out_dir"] or os.path.join(mil.HERE, "out", preset)
    if cfg["targets"] not in ("corpus", "teacher"):
        raise SystemExit(f"--targets takes corpus or teacher; got {cfg['targets']!r}")
    for key in ("draft_sequences", "pseudo_sequences"):
        if cfg[key] < 1:
            raise SystemExit(f"--{key} takes a positive number of teacher generations; got {cfg[key]}")
    kernels.BACKEND = cfg["scan"]
    kernels.use_triton(torch.device(cfg["device"]))  # validates --scan and says which path runs
    return cfg


def model_config(cfg):
    return mil.Config(n_layer=cfg["n_layer"], d_model=cfg["d_model"], n_head=cfg["n_head"],
                      n_kv_head=cfg["n_kv_head"], block_size=cfg["block_size"])


def main(argv=None):
    cfg = resolve(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg["seed"])
    data = Data(torch.device(cfg["device"]), cfg["block_size"])
    t_start = time.time()
    print(f"preset {cfg['preset']} on {cfg['device']}; checkpoints in {cfg['out_dir']}")
    teacher = teacher_stage(cfg, data, model_config(cfg))
    teacher.requires_grad_(False)
    fractions = [float(f) for f in cfg["attn_fractions"].split(",")]
    pool = pseudo_labels(cfg, data, teacher) if cfg["targets"] == "teacher" else None
    students, prev = [], None
    for frac in fractions:
        name = f"attn{int(frac * 100)}"
        prev = student_stage(cfg, data, teacher, name, mil.kept_attention(cfg["n_layer"], frac), prev, pool=pool)
        students.append((name, prev))
        if cfg["finetune"]:
            students.append((name + "_ft", finetune_stage(cfg, data, teacher, prev, name + "_ft")))
    students.append(("draft", draft_stage(cfg, data, teacher)))
    print(f"pipeline trained in {time.time() - t_start:.0f}s; evaluating")
    windows = data.val_windows(cfg["block_size"], cfg["eval_windows"])
    rows, t_loss = [], None
    for name, model in [("teacher", teacher)] + students:
        loss, agree = evaluate(model, windows, None if model is teacher else teacher)
        t_loss = loss if t_loss is None else t_loss
        text, tps = decode_speed(model, data)
        rows.append(dict(name=name, layers=",".join(map(str, model.cfg.attn_layers)) or "none", loss=loss,
                         ppl=math.exp(loss), ratio=math.exp(loss - t_loss), agree=1.0 if model is teacher else agree,
                         tps=tps, sample=text))
    table = results_table(rows)
    print(table)
    mil.atomic_write(lambda f: f.write(table.encode() + b"\n"), os.path.join(cfg["out_dir"], "results.md"))
    if cfg["ablate"]:
        print(f"ablations, {cfg['ablate_steps']} steps each")
        table = ablations(cfg, data, teacher, students[:-1])
        print(table)
        mil.atomic_write(lambda f: f.write(table.encode() + b"\n"), os.path.join(cfg["out_dir"], "ablations.md"))
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
