"""
Speculative decoding for hybrids (The Mamba in the Llama, §4, Algorithm 2).

    python speculative.py                       plain vs speculative decoding of each hybrid, greedy
                                                and sampled, K in {2, 3, 4, 6}, over validation prompts
    python speculative.py --prompt="HAMLET."    decode one prompt both ways and show the text
    python speculative.py --bench=context       decode speed and cache memory as the context grows
    python speculative.py --mixer=mamba2        the Mamba-2 hybrids of `python distill.py --mixer=mamba2`
    python speculative.py --teacher=smollm2     the same for `python distill.py --teacher=smollm2`'s run
                                                (--prompt then goes through the model's chat template)

A small Transformer draft (out/<preset>/draft.pt, made by `python distill.py`) proposes K tokens; the
hybrid scores all K+1 positions in one pass. Attention layers append K+1 KV entries and drop the
rejected ones; Mamba layers keep one committed state and replay the accepted tokens inside the next
verification kernel (Algorithm 2). On a GPU plain decoding replays one CUDA graph per token and
speculative decoding one per round (draft, verification, acceptance, rollback), so that a round never
waits for the host.
"""
import os
import sys
import time
from dataclasses import replace

import torch

import distill
import kernels
import mil

DEFAULTS = dict(
    teacher="toy",  # whose distill.py run to load: toy | smollm2 | the .gguf file or directory it distilled
    preset="auto",  # which distill.py run to load: cpu | gpu | smollm2 | auto
    device="auto",
    scan="auto",
    mixer="mamba1",  # the hybrids' Mamba layers: mamba1 | mamba2 (distill.py --mixer=mamba2's attn50_m2, ...)
    out_dir="",  # default: distill.py's for the same --teacher and --preset
    models="attn50,attn25",  # the targets to benchmark
    draft="draft",  # the draft's checkpoint: draft | draft_attn50 (distill.py --draft_teacher=attn50)
    k="2,3,4,6",  # draft lengths
    temperature="0,1",  # 0: greedy (output identical to the target's); > 0: exact rejection sampling
    top_k=0,
    prompts=20,  # validation prompts per configuration
    prompt_tokens=64,
    max_new_tokens=0,  # 0: 128 on GPU, 24 on CPU
    prompt="",  # decode this text instead of benchmarking (a chat model: as a user message, in its template)
    bench="speculative",  # speculative | context
    graphs=True,  # CUDA graphs on GPU
    seed=1337,
)


def clock(device):  # seconds, after the device has finished its queued work
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, device):
    t0 = clock(device)
    result = fn()
    return result, clock(device) - t0


@torch.no_grad()
def plain_generate(model, prompt, max_new_tokens, temperature=0.0, top_k=0, generator=None, graphs=False):
    """generate() with each one-token step (forward, sample, write) one CUDA graph. prompt (1, l) ->
    (1, l + max_new_tokens) and the seconds spent decoding (after the prefill and the capture). Inside
    graphs the default generator samples (seeded by torch.manual_seed), not `generator`."""
    assert max_new_tokens >= 1, "at least one new token"
    l, gen = prompt.shape[1], None if graphs else generator
    caches = model.new_caches(1, l + max_new_tokens)
    last = mil.sample(model(prompt, caches=caches)[0][:, -1], temperature, top_k, generator)  # (1, 1)
    tokens = torch.cat([prompt, last, prompt.new_zeros(1, max_new_tokens - 1)], dim=1)
    written = torch.tensor([l + 1], device=prompt.device)  # tokens written so far

    def step():  # the last token in, the next one sampled and written
        last.copy_(mil.sample(model(last, caches=caches)[0][:, -1], temperature, top_k, gen))
        tokens.index_copy_(1, written, last)
        written.add_(1)

    step = mil.graphed(step, [caches], [last, tokens, written], graphs)
    t0 = clock(prompt.device)
    for _ in range(max_new_tokens - 1):
        step()
    return tokens, dict(seconds=clock(prompt.device) - t0)


# -----------------------------------------------------------------------------------------------
# Speculative decoding


def accept_drafts(p, q, drafts, temperature, generator=None):
    """The acceptance rule, batched over rows. p (b, K+1, v): target probabilities at the K+1
    verified positions; q (b, K, v): the draft's (unused when greedy); drafts (b, K). Returns
    (n accepted (b,), next (b,)).
    Greedy: accept while the draft is the target's argmax, then the target's own token. Sampling
    (Leviathan et al. 2023): accept draft x with probability min(1, p(x) / q(x)); at the first
    rejection sample from max(0, p - q), normalized; after K accepted, a bonus token from p."""
    if temperature == 0:
        best = kernels.argmax(p)  # (b, K+1)
        n = (drafts == best[:, :-1]).cumprod(-1).sum(-1)
        return n, best.gather(1, n[:, None])[:, 0]
    p_x = p[:, :-1].gather(-1, drafts[..., None])[..., 0]  # (b, K)
    q_x = q.gather(-1, drafts[..., None])[..., 0]
    r = torch.rand(drafts.shape, generator=generator, device=p.device)
    n = (r * q_x <= p_x).cumprod(-1).sum(-1)
    residual = torch.cat([(p[:, :-1] - q).clamp(min=0), p[:, -1:]], dim=1)  # (b, K+1, v): row K is the bonus
    dist = residual.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0]  # (b, v)
    dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1]))[:, 0])
    return n, mil.sample_probs(dist, generator)[:, 0]


@torch.no_grad()
def speculative_generate(target, draft, prompt, max_new_tokens, k, temperature=0.0, top_k=0, generator=None,
                         graphs=False):
    """prompt (1, l >= 2) -> (1, l + max_new_tokens) and stats. The target's caches hold every token but
    the last, `pending`; the draft's one fewer, so that each round feeds the draft the last two tokens
    (rewriting one KV entry it had) and every round has the same shapes. A round never waits for the
    host: the acceptance, the caches' rollback and the output all happen on the device, so on GPU a
    whole round is one CUDA graph and the host syncs only to see how many tokens are done."""
    assert prompt.shape[0] == 1 and prompt.shape[1] >= 2, "batch 1, at least two prompt tokens"
    assert all(isinstance(b.mixer, mil.Attention) for b in draft.layers), "the draft is a Transformer"
    l, dev, gen = prompt.shape[1], prompt.device, None if graphs else generator
    max_len = l + max_new_tokens + k  # the last round may verify K tokens past the end
    t_caches, d_caches = target.new_caches(1, max_len, draft_len=k), draft.new_caches(1, max_len)
    target(prompt[:, :-1], caches=t_caches)
    draft(prompt[:, :-1], caches=d_caches)
    d_caches.truncate(t_caches.pos - 1)
    tokens = torch.cat([prompt, prompt.new_zeros(1, max_new_tokens + k + 1)], dim=1)  # pending at t_caches.pos
    last_two = torch.tensor([-1, 0], device=dev)  # from the target's position: the token before pending, pending
    slots = torch.arange(-k, 1, device=dev)  # after a verification, the K+1 slots after pending
    rejections = torch.zeros((), dtype=torch.long, device=dev)  # rounds that rejected a draft

    def round_():
        # the draft proposes K tokens
        seq = tokens.index_select(1, t_caches.pos + last_two)  # (1, 2)
        logits = draft(seq, caches=d_caches)[0][:, -1]
        drafts, qs = [], []
        for i in range(k):
            qs.append(mil.probabilities(logits, temperature, top_k) if temperature > 0 else None)
            drafts.append(mil.sample_probs(qs[-1], gen) if temperature > 0 else mil.sample(logits, 0))
            if i < k - 1:
                logits = draft(drafts[-1], caches=d_caches)[0][:, -1]
        seq = torch.cat([seq[:, 1:]] + drafts, dim=1)  # (1, K+1): pending, d_1 .. d_K
        # the target scores the K+1 positions in one pass and accepts a prefix
        t_logits = target(seq, caches=t_caches)[0]  # (1, K+1, v)
        p = mil.probabilities(t_logits, temperature, top_k) if temperature > 0 else t_logits
        n, nxt = accept_drafts(p, torch.stack(qs, dim=1) if temperature > 0 else None, seq[:, 1:], temperature, gen)
        # write d_1 .. d_n, next after pending (the slots after them are overwritten by the next round)
        emitted = torch.cat([seq[:, 1:], nxt[:, None]], dim=1).scatter_(1, n[:, None], nxt[:, None])
        tokens.index_copy_(1, t_caches.pos + slots, emitted)
        t_caches.accept(n[0] + 1)  # pending and the n accepted drafts; next is the new pending
        d_caches.truncate(t_caches.pos - 1)
        rejections.add_(n[0] < k)

    round_ = mil.graphed(round_, [t_caches, d_caches], [tokens, rejections], graphs)
    rounds, t0 = 0, clock(dev)
    while (left := max_new_tokens - (int(t_caches.pos) + 1 - l)) > 0:
        for _ in range(max(1, left // (k + 1))):  # rounds that cannot write past the buffers
            round_()
            rounds += 1
    accepted = int(t_caches.pos) + 1 - l - rounds  # each round wrote its accepted drafts and one token more
    return tokens[:, :l + max_new_tokens], dict(rounds=rounds, accepted=accepted, tested=accepted + int(rejections),
                                                seconds=clock(dev) - t0)


# -----------------------------------------------------------------------------------------------
# The benchmark


@torch.no_grad()
def step_time(model, device, graphs, tokens=1, context=64, max_len=0, steps=50):
    """Seconds per one-token decode step (CUDA graph on GPU); with tokens = K+1, per verification of
    K+1 tokens and its rollback to one accepted. Either way the caches advance one position a call,
    from `context`; they hold max_len positions (at least what the steps need), as attention reads
    every position a cache holds (masked), so that its cost is the decoding's it stands for."""
    caches = model.new_caches(1, max(max_len, context + steps + tokens + 8), draft_len=tokens - 1)
    model(torch.zeros(1, context, dtype=torch.long, device=device), caches=caches)
    tok, one = torch.zeros(1, tokens, dtype=torch.long, device=device), torch.ones((), dtype=torch.long, device=device)

    def call():
        model(tok, caches=caches)
        if tokens > 1:
            caches.accept(one)

    step = mil.graphed(call, [caches], [], graphs)
    step()
    _, dt = timed(lambda: [step() for _ in range(steps)], device)
    return dt / steps


def load(cfg, name):
    path = os.path.join(cfg["out_dir"], name + ".pt")
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: run `python distill.py --preset={cfg['preset']}` first")
    model = mil.load_model(path, device=cfg["device"])[0].eval()
    return model.to(torch.bfloat16) if cfg["device"] == "cuda" else model


def benchmark(cfg, data, draft):
    dev = torch.device(cfg["device"])
    graphs = cfg["graphs"] and dev.type == "cuda"
    windows = data.val_windows(cfg["prompt_tokens"] - 1, cfg["prompts"])  # prompts from the held-out works
    ks, temps = cfg["ks"], cfg["temps"]
    n_new = cfg["max_new_tokens"]
    rows = ["| model | decoding | K | plain tokens/s | speculative tokens/s | acceptance a | tokens / verification "
            "| draft cost c | verification cost v | predicted speedup | measured speedup |", "|" + " --- |" * 11]
    l, mid = cfg["prompt_tokens"], cfg["prompt_tokens"] + n_new // 2  # timed at the decoding's mean context,
    for name in cfg["models"].split(","):  # with caches of the size each decoding allocates
        target = load(cfg, name)
        step = step_time(target, dev, graphs, context=mid, max_len=l + n_new)  # in the target's decode steps:
        c = {k: step_time(draft, dev, graphs, context=mid, max_len=l + n_new + k) / step for k in ks}
        v = {k: step_time(target, dev, graphs, k + 1, context=mid, max_len=l + n_new + k) / step for k in ks}
        for temp in temps:
            gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
            plain_time, plain_out = 0.0, []
            for w in windows:
                out, st = plain_generate(target, w[None], n_new, temp, cfg["top_k"], gen, graphs)
                plain_time, plain_out = plain_time + st["seconds"], plain_out + [out]
            plain_tps = len(windows) * n_new / plain_time
            for k in ks:
                stats, diverged = dict(rounds=0, accepted=0, tested=0, seconds=0.0), []
                for i, w in enumerate(windows):
                    out, st = speculative_generate(target, draft, w[None], n_new, k, temp, cfg["top_k"], gen, graphs)
                    for key in stats:
                        stats[key] += st[key]
                    if temp == 0 and not torch.equal(out, plain_out[i]):
                        diverged.append(first_divergence(target, out, plain_out[i], w.shape[0]))
                a = stats["accepted"] / max(1, stats["tested"])
                per_verify = len(windows) * n_new / stats["rounds"]
                predicted = ((1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1) / (k * c[k] + v[k])  # tokens / round
                spec_tps = len(windows) * n_new / stats["seconds"]
                rows.append(f"| {name} | {'greedy' if temp == 0 else f'T={temp:g}'} | {k} | {plain_tps:.0f} | "
                            f"{spec_tps:.0f} | {a:.2f} | {per_verify:.2f} | {c[k]:.2f} | {v[k]:.2f} | {predicted:.2f}x | "
                            f"{spec_tps / plain_tps:.2f}x |")
                for d in diverged:
                    print(f"  {name} K={k}: greedy output diverged from plain decoding at {d}")
                print(rows[-1], flush=True)
    return "\n".join(rows)


@torch.no_grad()
def first_divergence(target, a, b, prompt_len):
    """Where two greedy outputs part, and the target's top-2 logit gap there (a near tie in bf16)."""
    i = int((a[0] != b[0]).nonzero()[0])
    logits = target(a[:, :i])[0][0, -1].float()
    top = logits.topk(2).values
    return f"token {i - prompt_len} (top-2 logit gap {float(top[0] - top[1]):.4f})"


# -----------------------------------------------------------------------------------------------
# Why hybrids: decode speed and cache memory as the context grows


def context_benchmark(cfg):
    """The teacher and the 50/25/12.5/0% hybrids of the preset's architecture (random weights: speed
    depends only on the architecture; the gpu preset is the real benchmark, the cpu one a smoke run).
    Decode: the caches are set to hold `context` positions and one-token steps are timed (CUDA
    graphs); memory: the bytes of the caches' tensors over the batch (the state, and the RoPE table
    and positions every sequence shares; not the weights decoding derives, a copy of the model's). Prefill:
    one forward of `context` tokens at batch 1."""
    dev = torch.device(cfg["device"])
    gpu, full = dev.type == "cuda", cfg["preset"] != "cpu"  # the cpu preset: a smoke run, on any device
    arch = mil.Config(**{k: distill.PRESETS[cfg["preset"]][k] for k in distill.ARCH}) if cfg["teacher"] == "toy" \
        else distill.load_teacher(cfg, "cpu")[0].cfg  # a pretrained teacher's architecture
    contexts = [512 * 2 ** i for i in range(7)] if full else [32, 64, 128]
    batches, steps = ((1, 64), 20) if full else ((1, 4), 4)
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = ["| model | attention layers | batch | context | decode tokens/s | cache MiB / sequence | prefill ms (batch 1) |",
            "|" + " --- |" * 7]
    for frac in (1.0, 0.5, 0.25, 0.125, 0.0):
        mcfg = replace(arch, attn_layers=mil.kept_attention(arch.n_layer, frac), mixer=cfg["mixer"])
        model = mil.Model(mcfg).to(dev, dtype).eval()
        name = "teacher" if frac == 1 else f"{frac:.1%} attention".replace(".0%", "%")
        for batch in batches:
            for context in contexts:
                cell = measure_context(model, batch, context, steps, dev, cfg["graphs"] and gpu)
                rows.append(f"| {name} | {len(mcfg.attn_layers)} | {batch} | {context} | {cell} |")
                print(rows[-1], flush=True)
        del model
    table = "\n".join(rows)
    print(table)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    mil.atomic_write(lambda f: f.write(table.encode() + b"\n"), os.path.join(cfg["out_dir"], "context.md"))


@torch.no_grad()
def measure_context(model, batch, context, steps, dev, graphs):
    gpu = dev.type == "cuda"
    try:
        if gpu:
            torch.cuda.empty_cache()
        caches = model.new_caches(batch, context + steps + 2)
        cache_mib = sum(t.numel() * t.element_size() for t in mil.cache_tensors(caches)) / batch / 2 ** 20
        caches.len = context  # as if `context` tokens had been decoded: speed does not depend on their values
        caches.pos.fill_(context)
        tok = torch.randint(0, model.cfg.vocab_size, (batch, 1), device=dev)
        step = mil.graphed(lambda: model(tok, caches=caches), [caches], [], graphs)
        step()
        _, dt = timed(lambda: [step() for _ in range(steps)], dev)
        del caches, step
        prefill = "-"
        if batch == 1:
            idx = torch.randint(0, model.cfg.vocab_size, (1, context), device=dev)
            runs = []
            for _ in range(10):  # three warm-ups (compilation, per-shape setup), then the median of seven
                caches = model.new_caches(1, context)
                runs.append(timed(lambda: model(idx, caches=caches), dev)[1])
            prefill = f"{sorted(runs[3:])[3] * 1000:.1f}"
        return f"{batch * steps / dt:,.0f} | {cache_mib:.2f} | {prefill}"
    except torch.cuda.OutOfMemoryError:
        return "out of memory | - | -"


def resolve(argv):
    """Options, each checked before any work: distill.py's rules for the teacher, preset, device, scan
    and checkpoint folder; then this script's own."""
    shared = [a for a in argv if a.split("=", 1)[0].removeprefix("--") in ("teacher", "preset", "device", "scan", "out_dir")]
    cfg = mil.parse_options(DEFAULTS, argv, __doc__, __file__)  # first: --help and unknown options end here
    base = distill.resolve(shared)  # the run whose checkpoints we load
    cfg.update({k: base[k] for k in ("preset", "device", "out_dir")})
    need = lambda key, ok, takes: distill.need(cfg, key, ok, takes)
    try:
        ks, temps = [int(k) for k in cfg["k"].split(",")], [float(t) for t in cfg["temperature"].split(",")]
    except ValueError:
        ks = temps = []
    need("k", ks and min(ks) >= 1, "takes draft lengths >= 1, comma-separated")
    need("temperature", temps and min(temps) >= 0, "takes temperatures >= 0 (0: greedy), comma-separated")
    for key, least in (("prompts", 1), ("prompt_tokens", 2), ("max_new_tokens", 0), ("top_k", 0)):
        need(key, cfg[key] >= least, f"takes {least} or more")
    need("bench", cfg["bench"] in ("speculative", "context"), "takes speculative or context")
    need("mixer", cfg["mixer"] in distill.SUFFIX, "takes mamba1 or mamba2")
    cfg["models"] = ",".join(name + distill.SUFFIX[cfg["mixer"]] for name in cfg["models"].split(","))
    if cfg["bench"] == "speculative":
        for key, name in [("models", m) for m in cfg["models"].split(",")] + [("draft", cfg["draft"])]:
            path = os.path.join(cfg["out_dir"], name + ".pt")
            need(key, os.path.exists(path), f"{path} is missing: `python distill.py` with the same --teacher, --preset "
                                            f"and --mixer makes the models and the draft (draft_attn50: --draft_teacher=attn50)")
    cfg["ks"], cfg["temps"] = ks, temps
    cfg["max_new_tokens"] = cfg["max_new_tokens"] or (128 if cfg["device"] == "cuda" else 24)
    return cfg


def main(argv=None):
    cfg = resolve(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg["seed"])
    dev = torch.device(cfg["device"])
    if cfg["bench"] == "context":
        return context_benchmark(cfg)
    draft = load(cfg, cfg["draft"])
    tok = mil.Tokenizer() if cfg["teacher"] == "toy" else distill.load_teacher(cfg, "cpu")[1]
    data = distill.Data(dev, draft.cfg.block_size, tok)
    if cfg["prompt"]:
        chat = tok.chat_template is not None
        ids = tok.chat([{"role": "user", "content": cfg["prompt"]}]) if chat else tok.encode(cfg["prompt"])
        if len(ids) + cfg["max_new_tokens"] > draft.cfg.block_size or len(ids) < 2:
            raise SystemExit(f"--prompt: {len(ids)} tokens; with --max_new_tokens={cfg['max_new_tokens']} it must fit "
                             f"the context, {draft.cfg.block_size} (and be 2 tokens at least)")
        target = load(cfg, cfg["models"].split(",")[0])
        prompt = torch.tensor([ids], device=dev)
        temp, k = cfg["temps"][0], cfg["ks"][0]
        gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
        graphs = cfg["graphs"] and dev.type == "cuda"
        plain, pst = plain_generate(target, prompt, cfg["max_new_tokens"], temp, cfg["top_k"], gen, graphs)
        spec, st = speculative_generate(target, draft, prompt, cfg["max_new_tokens"], k, temp, cfg["top_k"], gen, graphs)
        def shown(out):  # a chat model's reply, up to its first stop token
            reply = out[0, len(ids) if chat else 0:].tolist()
            ends = [i for i, t in enumerate(reply) if chat and t in tok.stop]
            return tok.decode(reply[:ends[0] + 1] if ends else reply)

        print(f"plain ({pst['seconds']:.2f}s):\n{shown(plain)}\n")
        print(f"speculative, K={k} ({st['seconds']:.2f}s, {st['accepted']} of {st['tested']} tested drafts accepted, "
              f"{st['rounds']} verifications):\n{shown(spec)}")
        return
    print(f"speculative decoding on {cfg['device']} ({'CUDA graphs' if cfg['graphs'] and dev.type == 'cuda' else 'eager'}), "
          f"{cfg['prompts']} validation prompts of {cfg['prompt_tokens']} tokens, {cfg['max_new_tokens']} new tokens each")
    if dev.type == "cpu":
        print("(on a CPU, without CUDA graphs or the fused kernels, a verification of K+1 tokens costs several plain "
              "steps: speculative decoding is slower here; the acceptance rates are the models', on any device)")
    table = benchmark(cfg, data, draft)
    print(table)
    mil.atomic_write(lambda f: f.write(table.encode() + b"\n"), os.path.join(cfg["out_dir"], "speculative.md"))


if __name__ == "__main__":
    main()
