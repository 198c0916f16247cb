"""
Distill a Llama into Mamba/attention hybrids (The Mamba in the Llama, §3): a tiny one trained here on
Shakespeare, or a real pretrained one (SmolLM2-135M-Instruct, or any local GGUF / Hugging Face Llama).

    python distill.py                    stage 0: train the toy teacher; stage 1: distill it stepwise into
                                         the 50%, 25%, 12.5% attention hybrids (MLPs frozen); stage 2:
                                         fine-tune each end to end; the speculative-decoding draft; evaluate
    python distill.py --teacher=smollm2  the same from SmolLM2-135M-Instruct (no stage 0), evaluated on
                                         held-out plays and on the teacher's own held-out generations
    python distill.py --ablate           then the paper's ablations as markdown tables
    python distill.py --mixer=mamba1,mamba2   Mamba-1 and Mamba-2 (Mamba2InLlama) hybrids, one table
    torchrun --standalone --nproc_per_node=N distill.py ...   the same, data-parallel over N processes

Finished stages are skipped on a rerun; an interrupted stage resumes from its last checkpoint.
Checkpoints live in out/<preset>/ (out/<teacher>/ for a pretrained one). Every setting below is
overridable as --key=value; --help lists them.
"""
import copy
import gc
import itertools
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import kernels
import mil

# the presets: cpu finishes the toy pipeline in minutes on 2 cores; gpu is the toy sized for one H200;
# smollm2 distills a pretrained teacher (its own architecture) on one H200 in about 12 minutes. dropout and
# teacher_wd (AdamW's weight decay) regularize the toy teacher only; the students train with --weight_decay
PRESETS = {
    "cpu": dict(n_layer=8, d_model=64, n_head=4, n_kv_head=2, block_size=64, batch_size=16, dropout=0.0,
                teacher_wd=0.1, teacher_steps=600, eval_every=100, lr=3e-3, distill_steps=80, distill_lr=2e-3,
                ft_steps=30, draft_steps=150, generations=512, ablate_steps=40, eval_windows=32),
    "gpu": dict(n_layer=8, d_model=384, n_head=6, n_kv_head=2, block_size=512, batch_size=32, dropout=0.3,
                teacher_wd=1.0, teacher_steps=1500, eval_every=50, lr=2e-3, distill_steps=300, distill_lr=1e-3,
                ft_steps=100, draft_steps=2000, generations=4096, ablate_steps=100, eval_windows=236),
    "smollm2": dict(block_size=512, batch_size=16, eval_every=100, distill_steps=1200, later_steps=300,
                    distill_lr=2e-3, ft_steps=100, ft_lr=2e-4, draft_steps=2000, draft_layers=2, generations=8192,
                    ablate_steps=200, eval_windows=128, attn_fractions="0.5,0.25", targets="mix", align_steps=600),
}
SUFFIX = {"mamba1": "", "mamba2": "_m2"}  # of a hybrid's checkpoint name, per mixer
hybrid_name = lambda frac, mixer: f"attn{round(frac * 100)}{SUFFIX[mixer]}"  # 0.5, mamba2 -> attn50_m2
ARCH = ("n_layer", "d_model", "n_head", "n_kv_head")  # the toy teacher's; a pretrained one brings its own
DEFAULTS = dict(
    teacher="toy",  # toy (stage 0 trains it here) | smollm2 | a .gguf file | a Hugging Face Llama directory
    preset="auto",  # cpu | gpu | smollm2 | auto (cpu without CUDA; else gpu, or smollm2 for a pretrained teacher)
    device="auto",  # cpu | cuda | auto
    scan="auto",  # selective scan: auto (Triton on GPU) | triton | ref | mamba_ssm (the official kernels, if installed)
    out_dir="",  # default: out/<preset>, or out/<teacher name> (out/<name>-cpu on the cpu preset)
    seed=1337,
    **PRESETS["cpu"],  # sizes and step counts, per --preset; generations: how many teacher sequences to sample
    # once (cached): the draft's training text, and the students' with --targets=teacher or mix
    warmup=50,
    min_lr_ratio=0.1,
    weight_decay=0.1,
    grad_clip=1.0,
    log_every=50,
    ckpt_every=100,  # resume checkpoint every N steps
    stop_after=0,  # stop a stage after N steps of this run, as if killed (a rerun resumes); 0: never
    attn_fractions="0.5,0.25,0.125",  # stepwise: each student starts from the previous one (§3)
    mixer="mamba1",  # the hybrids' Mamba layers: mamba1 | mamba2 (Mamba2InLlama's; attn50_m2, ...) | mamba1,mamba2
    gate_norm_init=0.1,  # Mamba-2's gated-norm weight at initialization; the official 1 makes each head's output
    # RMS 1, far louder than the attention outputs it replaces: 0.1 distills far better (README)
    alpha=0.0,  # Eq. 2: alpha * CE(targets) + beta * KL(teacher || student); the paper's 1 and 0.1
    beta=1.0,  # pure KL (alpha 0): the students learn the teacher alone (README: CE on the corpus wins on its domain)
    targets="corpus",  # the text distilled on: corpus | teacher (its own generations: sequence-level KD) | mix (half each)
    align_steps=0,  # before stage 1: each Mamba layer alone to its attention layer's output (not in the paper)
    later_steps=0,  # stage 1 of each later stepwise student, which starts from the one before (0: distill_steps)
    finetune=True,  # stage 2: end-to-end fine-tuning of every parameter
    ft_lr=0.0,  # stage 2's peak learning rate (0: a third of distill_lr; smollm2 preset: 2e-4, where stage 2 helps)
    draft_layers=1,  # the speculative-decoding draft's layers, from the teacher's (0: no draft; smollm2 preset: 2)
    draft_teacher="teacher",  # whose distributions the draft learns: teacher | a hybrid of this run (attn50: the
    # target it drafts for) | both, comma-separated; checkpoint draft.pt, draft_attn50.pt (speculative.py --draft=)
    graphs=True,  # training steps as CUDA graphs (one process on a GPU, no dropout: the toy teacher trains eagerly)
    ablate=False,
    bench="",  # train: time a stage-1 step of the 50% hybrid with each scan backend that runs here, and exit
)


# -----------------------------------------------------------------------------------------------
# Data


class Data:
    """The corpus in the teacher's tokenizer: random training windows from the training works; fixed,
    non-overlapping validation windows from the held-out plays."""

    def __init__(self, device, block_size, tok):
        train, val = mil.load_works()
        self.tok, self.device, self.block_size = tok, device, block_size
        self.train = torch.from_numpy(mil.encode_works(tok, train).astype("int64"))
        self.val = torch.from_numpy(mil.encode_works(tok, val).astype("int64"))

    def batch(self, batch_size, gen, tokens=None):
        """(b, l) inputs and next-token targets, windows of `tokens` (default: the training works), or of
        each stream of a list of them in equal shares."""
        streams = tokens if isinstance(tokens, list) else [self.train if tokens is None else tokens]
        windows = []
        for k, s in enumerate(streams):
            share = batch_size // len(streams) + (k < batch_size % len(streams))
            i = torch.randint(len(s) - self.block_size - 1, (share,), generator=gen)
            windows += [s[j:j + self.block_size + 1] for j in i.tolist()]
        w = torch.stack(windows).to(self.device)
        return w[:, :-1], w[:, 1:]

    def val_windows(self, length, count, tokens=None):  # (count, length + 1), evenly spread over `tokens`
        tokens = self.val if tokens is None else tokens
        starts = torch.linspace(0, len(tokens) - length - 1, count).long().tolist()
        return torch.stack([tokens[s:s + length + 1] for s in starts]).to(self.device)


# -----------------------------------------------------------------------------------------------
# Data parallel under torchrun: every rank draws the same global batch and trains on its own rows, so
# that N processes train what one process trains; rank 0 writes every file

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start_data_parallel(device):
    if WORLD > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
        if RANK == 0:
            print(f"data-parallel over {WORLD} processes ({backend})")


def mine(*batch):  # this rank's rows of a global batch
    return tuple(t.chunk(WORLD)[RANK] for t in batch) if dist.is_initialized() else batch


def barrier():  # every rank waits here for rank 0's files
    if dist.is_initialized():
        dist.barrier()


def end_data_parallel():  # before a rank exits: a process group the interpreter's exit ends may abort it
    if dist.is_initialized():
        gc.collect()  # the DDP wrappers of finished stages hold it too
        dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------
# One training loop for every stage: AdamW, warmup then cosine, clipping, bf16 on GPU, resumable


class Loss(torch.nn.Module):  # loss_fn(model, x, y) as a module: what make_graphed_callables graphs, with its parameters
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y):
        return self.loss_fn(self.model, x, y)


def train(name, model, cfg, data, steps, lr, loss_fn, params, eval_fn=None, save=True, weight_decay=None, pool=None):
    """Trains `params` of `model` for `steps` on batches of `pool` (Data.batch), resuming from
    out_dir/name.resume.pt if present, and (with save) writes out_dir/name.pt. loss_fn(model, x, y) ->
    loss. With eval_fn, keeps the best-validation weights. On one GPU (--graphs, no dropout) the loss's
    forward and backward replay as CUDA graphs: the step is host-bound without. Returns the state:
    step, loss log, best validation loss and step."""
    path = os.path.join(cfg["out_dir"], name + ".resume.pt")
    decay = cfg["weight_decay"] if weight_decay is None else weight_decay  # the toy teacher's is its own
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=decay)
    gen = torch.Generator().manual_seed(cfg["seed"])
    trains = {id(p) for p in params}  # a resume checkpoint holds what trains; the frozen rest is rebuilt as it was
    trained = lambda: {k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if id(v) in trains}
    state = dict(step=0, log=[], best_val=math.inf, best_step=0, best_model=None)
    if os.path.exists(path):
        ckpt = torch.load(path, map_location=data.device, weights_only=True)
        if set(ckpt["model"]) != set(trained()):
            raise SystemExit(f"{path}: holds other weights than this stage trains; delete it to restart the stage")
        model.load_state_dict(ckpt["model"], strict=False)
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["gen"].cpu())  # the batch sampler draws on the CPU
        state = ckpt["state"]
        if RANK == 0:
            print(f"{name}: resuming at step {state['step']} from {path}")

    def checkpoint():
        if RANK == 0:
            mil.save_checkpoint(path, model=trained(), optimizer=opt.state_dict(), gen=gen.get_state(), state=state)

    # DDP averages the gradients of the parameters that train (frozen ones are not synchronized)
    ddp = DistributedDataParallel(model) if dist.is_initialized() else model
    # autocast's weight cache off: CUDA graphs refuse it, and each weight is cast once a step anyway
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if data.device.type == "cuda" \
        else nullcontext()
    step_loss = lambda x, y: loss_fn(ddp, x, y)
    warmup, min_lr = min(cfg["warmup"], steps // 10), lr * cfg["min_lr_ratio"]
    model.train()
    bar = tqdm(range(state["step"], steps), desc=name, initial=state["step"], total=steps, leave=False, disable=RANK > 0)
    if cfg["graphs"] and data.device.type == "cuda" and not dist.is_initialized() and not model.cfg.dropout:
        sample = data.batch(cfg["batch_size"], torch.Generator().manual_seed(0), pool)  # not the training draw
        with autocast:  # warm-up passes (Triton compiles there), then capture
            step_loss = torch.cuda.make_graphed_callables(Loss(model, loss_fn), sample, allow_unused_input=True)
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
        x, y = mine(*data.batch(cfg["batch_size"], gen, pool))
        with autocast:
            loss = step_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        state["step"], ran = step + 1, ran + 1
        if dist.is_initialized():  # the log holds the global batch's loss: the mean over ranks
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= WORLD
        state["log"].append(loss.item())
        if ((step + 1) % cfg["log_every"] == 0 or step + 1 == steps) and RANK == 0:
            dt = (time.time() - t0) / ran
            tqdm.write(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}, {dt * 1000:.0f} ms/step, "
                       f"{cfg['batch_size'] * cfg['block_size'] / dt:,.0f} tokens/s")
        if step + 1 < steps and ((step + 1) % cfg["ckpt_every"] == 0 or ran == cfg["stop_after"]):
            checkpoint()  # not after the last step: the finished stage is saved next
        if ran == cfg["stop_after"] and step + 1 < steps:
            if RANK == 0:
                print(f"{name}: stopped after {ran} steps (--stop_after); rerun to resume")
            barrier()
            del ddp  # it holds the process group
            end_data_parallel()
            sys.exit(0)
    step_loss = None  # a graphed step's memory pool goes with it (its autograd class sits in a cycle: collect)
    gc.collect()
    if eval_fn:
        val = eval_fn(model)
        if val < state["best_val"]:
            state.update(best_val=val, best_step=steps, best_model=None)
        if state["best_model"] is not None:
            model.load_state_dict(state["best_model"])
        if RANK == 0:
            print(f"{name}: best validation loss {state['best_val']:.4f} at step {state['best_step']} of {steps}"
                  + (" (still falling: raise the step count)" if state["best_step"] == steps else ""))
    if save and RANK == 0:
        mil.save_checkpoint(os.path.join(cfg["out_dir"], name + ".pt"), model=model.state_dict(), config=model.cfg.to_dict(),
                            run=cfg, log=state["log"], best_val=state["best_val"], best_step=state["best_step"])
    barrier()
    if os.path.exists(path) and RANK == 0:
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


def greedy_sample(model, data, new_tokens=48):  # a greedy continuation of a fixed validation prompt
    prompt = data.val[1000:1016][None].to(data.device)
    return data.tok.decode(mil.generate(model, prompt, new_tokens, temperature=0)[0, 16:].tolist())


def results_table(cfg, data, teacher, students):
    """Perplexity (and its ratio to the teacher's) and top-1 agreement with the teacher, on (a) the
    held-out plays and (b) held-out text the teacher sampled at T = 1 from their passages, which no
    stage trained on; then perplexity at 1x, 2x, 4x the distillation length, on the plays."""
    L, count = cfg["block_size"], cfg["eval_windows"]
    heldout = teacher_generations(cfg, data, teacher, "heldout", 2 * count, split="val", temperatures=(1.0,))
    sets = [data.val_windows(L, count), data.val_windows(L, count, heldout)]
    lines = ["| model | attention layers | plays: perplexity | / teacher | top-1 agreement | teacher's T=1 text: "
             "perplexity | / teacher | top-1 agreement | greedy sample |", "|" + " --- |" * 9]
    base = None
    for name, model in [("teacher", teacher)] + students:
        evals = [evaluate(model, w, None if model is teacher else teacher) for w in sets]
        base = base or [loss for loss, _ in evals]
        cells = [f"{math.exp(loss):.2f} | {math.exp(loss - b):.3f} | {1.0 if model is teacher else agree:.3f}"
                 for (loss, agree), b in zip(evals, base)]
        sample = greedy_sample(model, data).replace("\n", " / ").replace("|", "/")[:60]
        lines.append(f"| {name} | {','.join(map(str, model.cfg.attn_layers)) or 'none'} | {' | '.join(cells)} | {sample} |")
    return "\n".join(lines + ["", length_table(cfg, data, [("teacher", teacher)] + students, (1, 2, 4))])


def length_table(cfg, data, models, mults):
    L = cfg["block_size"]
    lines = [f"Perplexity on the plays' windows of 1x-{mults[-1]}x the distillation length ({L} tokens):", "",
             "| model | " + " | ".join(f"{m}x" for m in mults) + " |", "|" + " --- |" * (len(mults) + 1)]
    for name, m in models:
        cells = [math.exp(evaluate(m, data.val_windows(L * k, min(cfg["eval_windows"], (len(data.val) - 1) // (L * k))),
                                   batch=max(1, 8 // k))[0]) for k in mults]
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


CHAT_QUESTIONS = ("What is the capital of France?", "Give me three tips for learning a new language.",
                  "Who wrote Hamlet, and what is it about?")


def chat_table(teacher, students, tok):  # greedy replies, teacher and hybrids side by side
    lines = ["| model | " + " | ".join(CHAT_QUESTIONS) + " |", "|" + " --- |" * (len(CHAT_QUESTIONS) + 1)]
    for name, model in [("teacher", teacher)] + students:
        replies = [mil.chat(model.eval(), tok, [{"role": "user", "content": q}], max_new_tokens=48) for q in CHAT_QUESTIONS]
        lines.append(f"| {name} | " + " | ".join(r.replace("\n", " / ").replace("|", "/") for r in replies) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The stages


def distill_loss(teacher, cfg, alpha=None, beta=None):
    """Eq. 2, per token: alpha * CE(student, targets) + beta * KL(p_teacher || p_student)."""
    alpha = cfg["alpha"] if alpha is None else alpha
    beta = cfg["beta"] if beta is None else beta

    def loss_fn(model, x, y):
        with torch.no_grad():
            t_logits, _ = teacher(x)
        s_logits, ce = model(x, y if alpha else None)  # alpha 0: no CE pass over the (b l, v) logits
        kl = F.kl_div(F.log_softmax(s_logits.flatten(0, 1).float(), -1), F.log_softmax(t_logits.flatten(0, 1).float(), -1),
                      log_target=True, reduction="batchmean")
        return (alpha * ce if alpha else 0) + beta * kl

    return loss_fn


def align_loss(student, teacher):
    """The alignment stage (MOHAWK's and LoLCATs' first stage; the paper has none): every Mamba layer of
    the student, all at once, learns to reproduce the output of the attention layer it replaces, from
    the same input, the teacher's own normalized hidden state at that layer, recomputed per batch by a
    teacher forward (nothing is cached). Per layer: the mean squared error over the attention output's
    mean square; averaged over the layers."""
    layers = [i for i in range(teacher.cfg.n_layer) if i not in student.cfg.attn_layers]

    def loss_fn(model, x, y):  # the student's mixers are called directly: one process only (resolve says so)
        seen = {}
        hooks = [teacher.layers[i].mixer.register_forward_hook(lambda m, args, out, i=i: seen.update({i: (args[0], out)}))
                 for i in layers]
        with torch.no_grad():
            teacher(x)
        for hook in hooks:
            hook.remove()
        return sum(F.mse_loss(student.layers[i].mixer(h).float(), out.float()) / out.float().pow(2).mean()
                   for i, (h, out) in seen.items()) / len(layers)

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
    """Stage 0, the toy teacher: trained on the corpus with dropout (nanoGPT's Shakespeare recipe), its
    best validation checkpoint kept."""
    if done := finished(cfg, data, "teacher", mcfg):
        return done
    torch.manual_seed(cfg["seed"])
    model = mil.Model(mcfg).to(data.device)
    print(f"stage 0: training the teacher, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"dropout {mcfg.dropout}")
    windows = data.val_windows(cfg["block_size"], cfg["eval_windows"])

    def loss_fn(m, x, y):
        return m(x, y)[1]

    train("teacher", model, cfg, data, cfg["teacher_steps"], cfg["lr"], loss_fn, list(model.parameters()),
          eval_fn=lambda m: evaluate(m, windows)[0], weight_decay=cfg["teacher_wd"])
    return model


def student_stage(cfg, data, teacher, name, attn_layers, prev=None, init="attention", freeze="mamba", steps=None,
                  pool=None, conv_init=None, alpha=None, beta=None, save=True, align=None, mixer=None):
    """Stage 1 (freeze="mamba") or an ablation run: a hybrid from the teacher (and the previous
    student, stepwise), first aligned layer by layer for `align` steps (default --align_steps), then
    distilled with Eq. 2."""
    mixer = cfg["mixers"][0] if mixer is None else mixer
    changes = dict(mixer=mixer, conv_init=conv_init, gate_norm_init=cfg["gate_norm_init"] if mixer == "mamba2" else None)
    expect = mil.hybrid_config(teacher.cfg, attn_layers, **changes)
    if save and (done := finished(cfg, data, name, expect)):
        return done
    torch.manual_seed(cfg["seed"])
    model = mil.hybrid_from_teacher(teacher, attn_layers, init=init, student=prev, **changes)
    align = cfg["align_steps"] if align is None else align
    if align:
        if save and (aligned := finished(cfg, data, name + "_aligned", expect)):
            model = aligned
        else:
            train(name + "_aligned", model, cfg, data, align, cfg["distill_lr"], align_loss(model, teacher),
                  trainable(model, "mamba"), save=save, pool=pool)
    train(name, model, cfg, data, steps or cfg["distill_steps"], cfg["distill_lr"],
          distill_loss(teacher, cfg, alpha, beta), trainable(model, freeze), save=save, pool=pool)
    return model


def finetune_stage(cfg, data, teacher, student, name, pool=None):
    """Stage 2: every parameter trains, same loss (the paper's end-to-end stage)."""
    if done := finished(cfg, data, name, student.cfg):
        return done
    model = mil.Model(student.cfg).to(data.device)
    model.load_state_dict(student.state_dict())
    lr = cfg["ft_lr"] or cfg["distill_lr"] / 3
    train(name, model, cfg, data, cfg["ft_steps"], lr, distill_loss(teacher, cfg), trainable(model, "all"), pool=pool)
    return model


def draft_stage(cfg, data, teacher, pool, target=None, name="draft"):
    """The speculative-decoding draft: a `draft_layers`-layer Transformer made of the teacher's layers,
    first and last kept ("shrink and fine-tune", the paper's Table 5), trained with KL to `target`: the
    teacher (one draft for every hybrid), or a hybrid (--draft_teacher: the model it will draft for).
    At batch 1 a step costs about its number of kernels, so fewer layers is a cheaper draft. It trains
    on the teacher's own generations: text like what the hybrids decode, where the draft must agree."""
    n, m = teacher.cfg.n_layer, cfg["draft_layers"]
    draft_cfg = replace(teacher.cfg, n_layer=m, attn_layers=None, dropout=0.0)
    if done := finished(cfg, data, name, draft_cfg):
        return done
    draft = mil.Model(draft_cfg).to(data.device)
    sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith("layers.")}
    for i, src in enumerate([round(i * (n - 1) / (m - 1)) for i in range(m)] if m > 1 else [0]):
        sd.update({k.replace(f"layers.{src}.", f"layers.{i}.", 1): v for k, v in teacher.state_dict().items()
                   if k.startswith(f"layers.{src}.")})
    draft.load_state_dict(sd)
    target = (teacher if target is None else target).eval()
    train(name, draft, cfg, data, cfg["draft_steps"], cfg["distill_lr"],
          distill_loss(target, cfg, alpha=0.0, beta=1.0), trainable(draft, "all"), pool=pool)
    return draft


REQUESTS = ("Continue this passage from a play:", "Paraphrase this passage in plain modern English:",
            "Summarize this passage in two sentences:")  # a chat teacher's generations answer these


def prompts(tok, windows, request):
    """(n, l) corpus windows -> (n, p) prompts of one length: the first 16 tokens (request None), or a
    chat request about the first 64 (l/4 if fewer), in the model's chat template."""
    if request is None:
        return windows[:, :16]
    before, after = tok.chat_text([{"role": "user", "content": f"{request}\n\n\x00"}]).split("\x00")
    ends = [torch.tensor(ids, device=windows.device).expand(len(windows), -1)
            for ids in (tok.encode(before), tok.encode_ordinary(after))]
    p = torch.cat([ends[0], windows[:, :min(64, windows.shape[1] // 4)], ends[1]], dim=1)
    if p.shape[1] > windows.shape[1] * 3 // 4:  # a quarter of the block at least for the reply
        raise SystemExit(f"--block_size={windows.shape[1]}: too short for the teacher's chat requests "
                         f"({p.shape[1]} tokens); take at least {4 * p.shape[1] // 3 + 1}")
    return p


@torch.no_grad()
def teacher_generations(cfg, data, teacher, name, count, split="train", temperatures=(0.0, 1.0)):
    """`count` of the teacher's own sequences, sampled once and cached in out_dir/<name>.pt as one token
    stream from which windows are drawn as from the corpus (the paper's sequence-level targets): in equal
    shares at each temperature (0: greedy), continuations of 16-token passages of `split` a block long,
    and, from a chat model, its replies to requests about them (REQUESTS), up to its stop token."""
    path = os.path.join(cfg["out_dir"], name + ".pt")
    if RANK > 0 or os.path.exists(path):  # rank 0 makes them, once
        barrier()
        return torch.load(path, weights_only=True)
    tok, tokens = data.tok, data.train if split == "train" else data.val
    jobs = list(itertools.product((None,) + (REQUESTS if tok.chat_template else ()), temperatures))
    gen = torch.Generator().manual_seed(cfg["seed"] + 1 + (split != "train"))
    torch.manual_seed(cfg["seed"] + 1)  # the sampling's (from the default generator: CUDA graphs replay it)
    gpu = data.device.type == "cuda"
    batch, seqs, each = 1024 if gpu else 32, [], math.ceil(count / len(jobs))
    # on a GPU a bf16 copy samples, a CUDA graph a step, as speculative decoding runs
    sampler = copy.deepcopy(teacher).to(torch.bfloat16) if gpu else teacher
    with tqdm(total=each * len(jobs), desc=name, leave=False) as bar:
        for (request, temp), i in itertools.product(jobs, range(0, each, batch)):
            p = prompts(tok, data.batch(min(batch, each - i), gen, tokens)[0], request)
            out = mil.generate(sampler.eval(), p, data.block_size + 1 - p.shape[1], temp,
                               stop=tok.stop if request else (), graphs=gpu)
            for row in out.cpu():
                if request is not None:  # a reply ends after its first stop token; EOT separates it from the next
                    stops = torch.isin(row[p.shape[1]:], torch.tensor(tok.stop)).nonzero()
                    end = p.shape[1] + int(stops[0]) + 1 if len(stops) else len(row)
                    row = torch.cat([row[:end], torch.tensor([tok.eot])])
                seqs.append(row)
            bar.update(len(out))
    pool = torch.cat(seqs)
    mil.atomic_write(lambda f: torch.save(pool, f), path)
    barrier()
    return pool


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


def ablations(cfg, data, teacher, students, generations):
    steps, n, L = cfg["ablate_steps"], teacher.cfg.n_layer, cfg["block_size"]
    half, quarter = mil.kept_attention(n, 0.5), mil.kept_attention(n, 0.25)
    windows = data.val_windows(L, cfg["eval_windows"])
    ppl = lambda m: math.exp(evaluate(m, windows)[0])
    t_ppl = ppl(teacher)
    run = lambda name, layers, **kw: student_stage(cfg, data, teacher, "ablate_" + name, layers,
                                                   **{"steps": steps, "save": False, "align": 0, **kw})
    aligned = lambda name, layers: run(name, layers, align=steps // 2, steps=steps - steps // 2)  # the same budget
    fmt = lambda p: f"{p:.2f} ({p / t_ppl:.3f}x)"
    out = [f"Validation perplexity (ratio to the teacher's {t_ppl:.2f}), every student trained {steps} steps.\n",
           "| model | attention init, frozen MLP | attention init, trainable MLP | random init, frozen MLP | random init, trainable MLP |",
           "| --- | --- | --- | --- | --- |"]
    trained = {}
    toy = cfg["teacher"] == "toy"  # a pretrained teacher's 0% students would take a third of the ablations' time
    for frac, layers in (("50%", half), ("0%", ())) if toy else (("50%", half),):  # Table 7, left
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
        (f"25%: one jump, {steps // 2} alignment steps + {steps - steps // 2} of stage 1", aligned("25_aligned", quarter)),
        (f"50%: {steps // 2} alignment steps + {steps - steps // 2} of stage 1", aligned("50_aligned", half)),
        ("50%: interleaved (layers " + ",".join(map(str, half)) + ")", base),
        ("50%: contiguous (layers " + ",".join(map(str, range(n - len(half), n))) + ")",
         run("50_contiguous", tuple(range(n - len(half), n)))),
        ("50%: pure KL (the default)", base),
        ("50%: corpus targets, CE + 0.1 KL (Eq. 2)", run("50_cekl", half, alpha=1.0, beta=0.1)),
        ("50%: teacher generations, CE + 0.1 KL", run("50_pseudo", half, pool=generations, alpha=1.0, beta=0.1)),
        ("50%: conv initialized as identity (the default)", base),
        ("50%: conv with PyTorch's default init", run("50_conv", half, conv_init="default")),
        ("50%: Mamba mixers removed, MLPs kept", removed),
    ]
    out += ["", "| variant | perplexity |", "| --- | --- |"] + [f"| {name} | {fmt(ppl(m))} |" for name, m in variants]
    models = [("teacher", teacher)] + students + ([("0% (pure Mamba)", trained["0%", "attention", "mamba"])] if toy else [])
    out += ["", length_table(cfg, data, models, (1, 2, 4, 8))]
    gaps = sorted({0, 256, 1024, 4 * L})
    out += ["", "Recall: mean loss on a repeated 64-token span after a gap of G tokens (lower: better recall).", "",
            "| model | " + " | ".join(f"G={g}" for g in gaps) + " |", "|" + " --- |" * (len(gaps) + 1)]
    for name, m in models:
        out.append(f"| {name} | " + " | ".join(f"{copy_probe_loss(m, data, g):.3f}" for g in gaps) + " |")
    return "\n".join(out)


def resolve(argv):
    """Options: the preset's values are the defaults; --key=value overrides them. Every value is checked
    here (check() for those that need the teacher's layer count), before any work."""
    given = lambda key, default: ([default] + [a.split("=", 1)[1] for a in argv if a.startswith(f"--{key}=")])[-1]
    preset, teacher = given("preset", "auto"), given("teacher", "toy")  # the last one counts, as for every option
    if preset == "auto":
        preset = "cpu" if not torch.cuda.is_available() else "gpu" if teacher == "toy" else "smollm2"
    if preset not in PRESETS:
        raise SystemExit(f"--preset={preset}: takes {', '.join(PRESETS)} or auto")
    if preset == ("smollm2" if teacher == "toy" else "gpu"):
        raise SystemExit(f"--preset={preset}: " + ("the smollm2 preset is for a pretrained --teacher" if teacher == "toy"
                                                   else "a pretrained --teacher takes --preset=smollm2 or cpu"))
    cfg = mil.parse_options({**DEFAULTS, **PRESETS[preset]}, argv, __doc__, __file__)
    cfg["preset"] = preset
    if arch := [k for k in ARCH if teacher != "toy" and any(a.startswith(f"--{k}=") for a in argv)]:
        raise SystemExit(f"--{arch[0]}={cfg[arch[0]]}: a pretrained teacher brings its own architecture")
    if teacher != "toy" and preset == "cpu":  # 128 tokens: room for a chat model's request about a passage and its
        # reply; 4 rows: at 16 SmolLM2's stage 1 outgrew 24 GiB (the reference scan's (l, b, di, n) tensors), at 4 13 GB
        cfg.update({k: v for k, v in dict(block_size=128, batch_size=4).items() if given(k, None) is None})
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["device"] not in ("cpu", "cuda") or (cfg["device"] == "cuda" and not torch.cuda.is_available()):
        raise SystemExit(f"--device={cfg['device']}: takes cpu, or cuda on a machine with a CUDA GPU (this one "
                         f"{'has' if torch.cuda.is_available() else 'has none'}), or auto")
    name = {"toy": preset, "smollm2": "smollm2"}.get(teacher) or os.path.basename(os.path.normpath(teacher))
    name = name.removesuffix(".gguf") + ("-cpu" if teacher != "toy" and preset == "cpu" else "")
    cfg["out_dir"] = cfg["out_dir"] or os.path.join(mil.HERE, "out", name)
    positive = ["block_size", "batch_size", "distill_steps", "generations", "eval_every", "eval_windows", "log_every",
                "ckpt_every", "ablate_steps"] + (list(ARCH) + ["teacher_steps"] if teacher == "toy" else [])
    for key in positive:
        need(cfg, key, cfg[key] >= 1, "takes a positive integer")
    need(cfg, "batch_size", cfg["batch_size"] % WORLD == 0, f"takes a multiple of the {WORLD} processes (the global batch)")
    for key in ("ft_steps", "warmup", "stop_after", "draft_layers", "align_steps", "later_steps", "weight_decay",
                "teacher_wd", "ft_lr"):
        need(cfg, key, cfg[key] >= 0, "takes 0 or more")
    for key in ("lr", "distill_lr", "grad_clip", "gate_norm_init"):
        need(cfg, key, cfg[key] > 0, "takes a positive number")
    need(cfg, "dropout", 0 <= cfg["dropout"] < 1, "takes a rate in [0, 1)")
    need(cfg, "min_lr_ratio", 0 <= cfg["min_lr_ratio"] <= 1, "takes a ratio in [0, 1]")
    for key in ("alpha", "beta"):
        need(cfg, key, cfg[key] >= 0 and cfg["alpha"] + cfg["beta"] > 0, "takes 0 or more, alpha + beta > 0")
    need(cfg, "targets", cfg["targets"] in ("corpus", "teacher", "mix"), "takes corpus, teacher or mix")
    cfg["mixers"] = cfg["mixer"].split(",")
    need(cfg, "mixer", len(set(cfg["mixers"])) == len(cfg["mixers"]) and set(cfg["mixers"]) <= set(SUFFIX),
         "takes mamba1, mamba2 or both, comma-separated")
    need(cfg, "bench", cfg["bench"] in ("", "train"), "takes train (or nothing: the pipeline)")
    need(cfg, "align_steps", cfg["align_steps"] == 0 or WORLD == 1, "runs in one process (not under torchrun)")
    if teacher == "toy":
        need(cfg, "d_model", cfg["d_model"] % cfg["n_head"] == 0, f"takes a multiple of --n_head={cfg['n_head']}")
        need(cfg, "n_head", cfg["n_head"] % cfg["n_kv_head"] == 0, f"takes a multiple of --n_kv_head={cfg['n_kv_head']}")
        need(cfg, "d_model", cfg["d_model"] // cfg["n_head"] % 2 == 0, "takes d_model / n_head (head_dim) even, for RoPE")
        check(cfg, cfg["n_layer"])
    kernels.BACKEND = cfg["scan"]
    try:
        kernels.use_triton(torch.device(cfg["device"]))  # says which path runs
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"--scan={cfg['scan']}: {e}") from None
    return cfg


def need(cfg, key, ok, takes):  # a bad option: one line that names it, the value given and what it takes
    if not ok:
        raise SystemExit(f"--{key}={cfg[key]}: {takes}")


def check(cfg, n_layer):
    """The options that depend on the teacher's n_layer: attention fractions 1/2, 1/4, ... (strictly
    decreasing, each set of at least one layer, nested by kept_attention's rule), the draft's layers."""
    allowed = ", ".join(f"1/{2 ** k}" for k in range(1, int(math.log2(n_layer)) + 1))
    takes = f"takes attention fractions of {n_layer} layers, strictly decreasing, comma-separated, from {allowed}"
    try:
        fractions = [float(f) for f in cfg["attn_fractions"].split(",")]
        [mil.kept_attention(n_layer, f) for f in fractions]
    except ValueError:
        fractions = []
    need(cfg, "attn_fractions", fractions and all(0 < f < 1 and 1 / f <= n_layer for f in fractions)
         and all(a > b for a, b in zip(fractions, fractions[1:])), takes)
    need(cfg, "draft_layers", cfg["draft_layers"] <= n_layer, f"takes 0 (no draft) to {n_layer}, the teacher's layers")
    hybrids = [hybrid_name(f, m) + ft for m in cfg["mixers"] for f in fractions
               for ft in ("", "_ft")[:1 + cfg["finetune"]]]
    cfg["draft_teachers"] = cfg["draft_teacher"].split(",")
    need(cfg, "draft_teacher", set(cfg["draft_teachers"]) <= {"teacher", *hybrids} and
         len(set(cfg["draft_teachers"])) == len(cfg["draft_teachers"]),
         f"takes teacher or hybrids this run makes ({', '.join(hybrids)}), comma-separated")
    return fractions


def load_teacher(cfg, device):
    """A pretrained teacher and its tokenizer; a bad --teacher is a one-line error."""
    try:
        return mil.load_pretrained(cfg["teacher"], device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--teacher={cfg['teacher']}: {e}") from None


def bench_train(cfg, data, teacher):
    """--bench=train: a stage-1 step (the teacher's forward, the 50% hybrid's forward and backward, the
    KL) with each scan backend that runs here, timed in interleaved rounds on the same batches (random
    Mamba weights: speed depends only on the shapes); on a GPU, the scan kernels' share of the step."""
    teacher.requires_grad_(False).eval()
    student = mil.hybrid_from_teacher(teacher, mil.kept_attention(teacher.cfg.n_layer, 0.5), mixer=cfg["mixers"][0])
    loss_fn, params = distill_loss(teacher, cfg), trainable(student, "mamba")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if data.device.type == "cuda" else nullcontext()
    backends = ["triton"] * (data.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") + ["ref"]
    try:
        kernels.official(data.device)
        backends.append("mamba_ssm")
    except RuntimeError as e:
        print(f"mamba_ssm: not timed ({e})")

    sync = torch.cuda.synchronize if data.device.type == "cuda" else lambda: None

    def step():
        x, y = data.batch(cfg["batch_size"], gen)
        with autocast:
            loss = loss_fn(student, x, y)
        loss.backward()
        for p in params:
            p.grad = None

    times = {b: [] for b in backends}
    for _ in range(3):
        for backend in backends:
            kernels.BACKEND, gen = backend, torch.Generator().manual_seed(cfg["seed"])
            step()  # compiles, warms up
            sync()
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            sync()
            times[backend].append((time.perf_counter() - t0) / 3)
    tokens = cfg["batch_size"] * cfg["block_size"]
    ref = "mamba_ssm" if "mamba_ssm" in times else backends[0]
    base = min(times[ref])
    print(f"\n| scan | ms / step | tokens/s | / {ref} | scan kernels' share |")
    print("| --- | --- | --- | --- | --- |")
    for backend, ts in times.items():
        kernels.BACKEND, share = backend, "-"
        if data.device.type == "cuda":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                sync()
            total = sum(e.self_device_time_total for e in prof.key_averages())
            share = f"{sum(e.self_device_time_total for e in prof.key_averages() if 'scan' in e.key) / total:.0%}"
        t = min(ts)
        print(f"| {backend} | {t * 1e3:.1f} | {tokens / t:,.0f} | {t / base:.3f}x | {share} |")
    kernels.BACKEND = cfg["scan"]


def main(argv=None):
    cfg = resolve(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg["seed"])
    device, t_start = torch.device(cfg["device"]), time.time()
    if cfg["teacher"] == "toy":
        teacher, tok = None, mil.Tokenizer()
    else:
        teacher, tok = load_teacher(cfg, device)
        need(cfg, "block_size", cfg["block_size"] <= teacher.cfg.block_size,
             f"takes at most the teacher's context, {teacher.cfg.block_size}")
    fractions = check(cfg, teacher.cfg.n_layer if teacher else cfg["n_layer"])
    start_data_parallel(device)
    data = Data(device, cfg["block_size"], tok)
    for request in REQUESTS if tok.chat_template else ():  # every chat request fits the block, checked before any work
        prompts(tok, data.train[None, :cfg["block_size"]], request)
    if cfg["bench"]:  # random weights for the toy teacher: speed depends only on the shapes
        return bench_train(cfg, data, teacher or mil.Model(mil.Config(**{k: cfg[k] for k in ARCH},
                                                                      block_size=cfg["block_size"])).to(device))
    print(f"preset {cfg['preset']}, teacher {cfg['teacher']}, on {cfg['device']}; checkpoints in {cfg['out_dir']}")
    if cfg["teacher"] != "toy" and cfg["device"] == "cpu":
        print("a pretrained teacher on a CPU: each step runs it in full (SmolLM2, 2 cores: 18 s a stage-1 step, "
              "over an hour in all; fewer --distill_steps, --ft_steps, --draft_steps, --attn_fractions=0.5 shorten it)")
    if teacher is None:
        teacher = teacher_stage(cfg, data, mil.Config(**{k: cfg[k] for k in ARCH}, block_size=cfg["block_size"],
                                                      dropout=cfg["dropout"]))
    teacher.requires_grad_(False).eval()  # its distributions are the targets: no dropout
    needed = cfg["draft_layers"] or cfg["targets"] != "corpus" or cfg["ablate"]  # the draft's, the students' text
    generations = teacher_generations(cfg, data, teacher, "generations", cfg["generations"]) if needed else None
    pool = {"corpus": None, "teacher": generations, "mix": [data.train, generations]}[cfg["targets"]]
    students = []
    for mixer in cfg["mixers"]:  # both variants: one table, the same budget
        prev = None
        for frac in fractions:
            name = hybrid_name(frac, mixer)
            prev = student_stage(cfg, data, teacher, name, mil.kept_attention(teacher.cfg.n_layer, frac), prev,
                                 pool=pool, mixer=mixer, steps=cfg["later_steps"] if prev else None)
            students.append((name, prev))
            if cfg["finetune"]:
                students.append((name + "_ft", finetune_stage(cfg, data, teacher, prev, name + "_ft", pool)))
    for target in cfg["draft_teachers"] if cfg["draft_layers"] else ():
        name = "draft" + ("" if target == "teacher" else "_" + target)
        students.append((name, draft_stage(cfg, data, teacher, generations, dict(students).get(target), name)))
    end_data_parallel()
    if RANK > 0:  # rank 0 evaluates
        return
    results = os.path.join(cfg["out_dir"], "results.md")
    if os.path.exists(results) and all(os.path.getmtime(results) > os.path.getmtime(os.path.join(cfg["out_dir"], n + ".pt"))
                                       for n, _ in students):  # evaluated since the last stage finished
        print(f"every stage finished before; the evaluation is {results} (delete it to evaluate again):")
        table = open(results).read().rstrip("\n")
    else:
        print(f"pipeline trained in {time.time() - t_start:.0f}s; evaluating")
        table = results_table(cfg, data, teacher, students)
        if tok.chat_template:
            table += "\n\nGreedy replies (up to 48 tokens):\n\n" + chat_table(teacher, students, tok)
        mil.atomic_write(lambda f: f.write(table.encode() + b"\n"), results)
    print(table)
    if cfg["ablate"]:
        print(f"ablations, {cfg['ablate_steps']} steps each")
        table = ablations(cfg, data, teacher, [s for s in students if not s[0].startswith("draft")], generations)
        print(table)
        mil.atomic_write(lambda f: f.write(table.encode() + b"\n"), os.path.join(cfg["out_dir"], "ablations.md"))
    print(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
