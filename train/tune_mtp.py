"""Tune a GGUF file's MTP block to the file's own main model, on a CPU or a GPU (issue 13).

    python train/tune_mtp.py data  MODEL.gguf --out RUN [--prompts 2400] [--reply 128] [--shard I/N]
    python train/tune_mtp.py train MODEL.gguf --out RUN [--minutes 20 | --steps N] [--device cuda] [--batch 64]
    python train/tune_mtp.py write MODEL.gguf --out RUN DST.gguf

A draft is accepted when it equals the token the main model itself would produce, so the block is
trained on the main model's own replies to the distillation program's prompts (train/distill.py;
every prompt that names a topic of bench/bench_mtp.py's prompts left out, so the bench measures
replies the block never saw), against the main model's own next-token distribution one position
later (KL, full vocabulary): what self-speculative decoding asks of it. distill.py trains the
block in its training checkpoint on the teacher's text (`train`, cross-entropy to that text;
`tune-mtp`, against the main model there); this needs only the GGUF file. On edgeseek-mini (one
H100, its 16 cores decoding): 12,000 prompts' replies, then 4,000 steps of 64 replies (--lr 2e-3,
200 s) raised held-out top-1 agreement from 0.642 to 0.769 (greedy replies 0.667 to 0.799) and
bench_mtp's acceptance of one draft from 0.585 to 0.645: the shipped file has that block. 25
minutes on a 2-core CPU (1,264 steps of 8 replies) had reached 0.718 from 0.690, and no change in
acceptance; cross-entropy to the main model's top token instead of KL overfits (--target top1).

`data` decodes the replies with edgeseek itself on the CPU (a share sampled at temperature 0.7 for
variety, the rest greedy, as the bench decodes), keeping the main model's final hidden states (after
output_norm: what the MTP block reads) as the runtime with MTP on has them; `--shard I/N` decodes
the I-th of N parts, so that N processes (one a core) run side by side, and `train` reads them all.
`train` starts from the file's MTP block (dequantized) as a PyTorch module that computes what
models/deepseek2.py computes (MLA in the absorbed form over the block's own latent cache, sigmoid
routing with the selection bias, the shared expert), the main model's embedding and head frozen;
before training it checks its logits against edgeseek's own `mtp_step` on a held-out sequence (on
the CPU), then trains on `--device`. `write` puts the tuned block back into a copy of the file (its
matrices quantized by gguf-py in the file's own type; every other tensor copied byte for byte),
written beside and renamed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from train.distill import prompts  # noqa: E402  (the distillation program's prompt set)

# bench/bench_mtp.py's prompts name these: no training prompt does
BENCH_TOPICS = ("printing press", "photosynthesis", "the sea", "language", "robot", "paint")
HELD_OUT = 0.05  # the last 5% of the sequences: the agreement reported, never trained on
# the block's tensors (blk.{L}. + name): attention, feed-forward, and the nextn projection and norms
BLOCK = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight",
         "attn_norm.weight", "attn_q.weight", "attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_k_b.weight",
         "attn_v_b.weight", "attn_output.weight", "ffn_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias",
         "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight",
         "ffn_up_shexp.weight", "ffn_down_shexp.weight")
FIXED = ("exp_probs_b.bias",)  # the router's selection bias ranks experts only: no gradient reaches it


# --- data ----------------------------------------------------------------------------------------
def training_prompts(n: int, seed: int) -> list[str]:
    out = [p for p in prompts(30 * n, seed) if not any(t in p for t in BENCH_TOPICS)]
    return list(dict.fromkeys(out))[:n]


def decode(engine, ids: list[list[int]], greedy: list[bool], reply: int, parallel: int, seed: int,
           report=None) -> list[tuple[list[int], np.ndarray]]:
    """Each prompt's reply (up to `reply` tokens, the end-of-generation token left out) -> (prompt +
    reply tokens, the main model's final hidden states at each of them (S, D)), as the runtime with
    MTP on has them: a prompt's from one forward pass over it (a prefill), a reply token's from the
    decode step that feeds it (a verification's rows equal a step's; a pass over the whole sequence
    differs by ~1% of a row's norm, float rounding). `parallel` sequences share each step."""
    from edgeseek.sampler import Sampler, SamplerConfig
    model, stop = engine.model, engine.tokenizer.stop_ids
    out: list = [None] * len(ids)
    active: dict[int, tuple] = {}  # i -> (cache, sampler, tokens, hidden rows, the token to feed)
    pending, done = list(range(len(ids))), 0
    while pending or active:
        while pending and len(active) < parallel:
            i = pending.pop(0)
            sampler = Sampler(SamplerConfig.greedy() if greedy[i] else SamplerConfig(temperature=0.7, seed=seed + i))
            cache = model.new_cache(len(ids[i]) + reply)
            logits, h = model.forward(np.asarray(ids[i], np.int32), cache, hidden=True)
            token = sampler(np.asarray(logits[-1]), list(ids[i]))
            if token in stop:
                out[i], done = (list(ids[i]), np.asarray(h, np.float32)), done + 1
                continue
            active[i] = (cache, sampler, list(ids[i]), [np.asarray(h, np.float32)], token)
        rows = list(active)
        logits, h = model.forward_rows(np.array([active[i][4] for i in rows], np.int32),
                                       [active[i][0] for i in rows], hidden=True)  # (B, V), (B, D)
        logits, h = np.asarray(logits), np.asarray(h, np.float32)
        for r, i in enumerate(rows):
            cache, sampler, tokens, hidden, token = active[i]
            tokens.append(token)
            hidden.append(h[r:r + 1])
            token = sampler(logits[r], tokens)
            if token in stop or len(tokens) - len(ids[i]) == reply:
                out[i], done = (tokens, np.concatenate(hidden)), done + 1
                del active[i]
                if report and done % 200 == 0:
                    report(done)
            else:
                active[i] = (cache, sampler, tokens, hidden, token)
    return out


def make_data(a) -> None:
    import edgeseek
    engine = edgeseek.load(a.model, mtp="off", device="cpu")
    template = engine.chat_template  # a file without one: the prompts as plain text
    shard, shards = a.shard
    texts = training_prompts(a.prompts, a.seed)[shard::shards]
    ids = [engine.tokenizer.encode(template.render([{"role": "user", "content": t}], add_generation_prompt=True)
                                   if template is not None else t) for t in texts]
    rng = np.random.default_rng(a.seed + shard)
    greedy = [bool(rng.random() >= a.sampled) for _ in ids]
    t0 = time.time()
    seqs = decode(engine, ids, greedy, a.reply, a.parallel, a.seed + 100_000 * shard,
                  lambda n: print(f"{n}/{len(ids)} replies, {time.time() - t0:.0f} s", flush=True))
    starts = np.cumsum([0] + [len(t) for t, _ in seqs])
    name = "data.npz" if shards == 1 else f"data-{shard:03d}.npz"
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / (name + ".tmp"), "wb") as f:  # written beside and renamed: an interrupted run leaves no half file
        np.savez(f, tokens=np.concatenate([t for t, _ in seqs]).astype(np.int32), starts=starts,
                 prompt=np.array([len(x) for x in ids]), greedy=np.array(greedy),
                 hidden=np.concatenate([h for _, h in seqs]).astype(np.float16))
    (a.out / (name + ".tmp")).replace(a.out / name)
    print(f"{len(seqs)} sequences, {starts[-1]} positions ({starts[-1] - sum(map(len, ids))} reply tokens, "
          f"{sum(greedy)} replies greedy) in {time.time() - t0:.0f} s -> {a.out / name}")


# --- the block in PyTorch --------------------------------------------------------------------------
def read_block(path: Path):
    """The file's MTP block (dequantized, numpy order), its layer index, and the model's config,
    embedding and head."""
    from gguf import GGUFReader, quants

    from edgeseek.gguf_file import GGUFFile
    from edgeseek.models.deepseek2 import DeepSeek2Config
    cfg = DeepSeek2Config.from_gguf(GGUFFile(path))
    if not cfg.n_mtp:
        raise SystemExit(f"{path}: no MTP layer ('{cfg.arch}.nextn_predict_layers' is 0)")
    if cfg.q_lora_rank or not cfg.mla_layout or cfg.router.n_group > 1:
        raise SystemExit(f"{path}: tune_mtp handles blocks without q-LoRA, in the attn_k_b/attn_v_b layout, "
                         f"without expert groups")
    L = cfg.n_layer
    r = GGUFReader(path)
    t = {x.name: x for x in r.tensors}

    def arr(name):
        x = t[name]
        return np.array(quants.dequantize(x.data, x.tensor_type).reshape(  # a copy: F32 comes as the file's mmap
            tuple(int(d) for d in reversed(x.shape))), dtype=np.float32)
    weights = {n: arr(f"blk.{L}.{n}") for n in BLOCK}
    head = "output.weight" if "output.weight" in t else "token_embd.weight"
    return cfg, L, weights, arr("token_embd.weight"), arr(head)


def torch_block(cfg, weights: dict, embed: np.ndarray, head: np.ndarray):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from edgeseek.models.common import rope_freqs
    H, C, N, R, k = cfg.n_head, cfg.kv_lora_rank, cfg.qk_nope, cfg.qk_rope, cfg.n_expert_used
    eps, scale = cfg.rms_eps, cfg.kq_scale

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.from_numpy(v.copy()))
                                       for n, v in weights.items() if n not in FIXED})
            self.register_buffer("bias", torch.from_numpy(weights["exp_probs_b.bias"].copy()))
            # the main model's (frozen, not saved with the block)
            self.register_buffer("embed", torch.from_numpy(embed), persistent=False)
            self.register_buffer("head", torch.from_numpy(head), persistent=False)
            inv = torch.from_numpy(rope_freqs(R, cfg.rope_base))  # llama.cpp's "norm" rope: adjacent pairs
            self.register_buffer("inv", inv, persistent=False)

        def p(self, name):
            return self.w[name.replace(".", "_")]

        def rope(self, x, pos):  # x (B, S, ..., R)
            ang = pos[:, None].double() * self.inv[None]  # (S, R/2)
            cos, sin = ang.cos().float(), ang.sin().float()
            shape = (1, len(pos)) + (1,) * (x.dim() - 3) + (R // 2,)
            cos, sin = cos.view(shape), sin.view(shape)
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

        def forward(self, hidden, next_ids):
            """hidden (B, S, D) main hidden states h_i, next_ids (B, S) tokens i+1 -> the block's
            output (B, S, D) (positions 0..S-1)."""
            p = self.p
            B, S, _ = hidden.shape
            pos = torch.arange(S, device=hidden.device)
            e = rms(self.embed[next_ids], p("nextn.enorm.weight"))
            h = rms(hidden, p("nextn.hnorm.weight"))
            x = torch.cat([e, h], -1) @ p("nextn.eh_proj.weight").T
            a = rms(x, p("attn_norm.weight"))
            q = (a @ p("attn_q.weight").T).view(B, S, H, N + R)
            kv = a @ p("attn_kv_a_mqa.weight").T
            lat = rms(kv[..., :C], p("attn_kv_a_norm.weight"))  # (B, S, C)
            k_pe = self.rope(kv[..., C:], pos)  # (B, S, R)
            q_pe = self.rope(q[..., N:], pos)  # (B, S, H, R)
            q_lat = torch.einsum("bshn,hcn->bshc", q[..., :N], p("attn_k_b.weight"))
            scores = (torch.einsum("bshc,btc->bhst", q_lat, lat) + torch.einsum("bshr,btr->bhst", q_pe, k_pe)) * scale
            scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool, device=hidden.device).triu(1), float("-inf"))
            o_lat = torch.einsum("bhst,btc->bshc", scores.softmax(-1), lat)
            o = torch.einsum("bshc,hvc->bshv", o_lat, p("attn_v_b.weight")).reshape(B, S, -1)
            x = x + o @ p("attn_output.weight").T
            f = rms(x, p("ffn_norm.weight"))
            probs = torch.sigmoid(f @ p("ffn_gate_inp.weight").T)  # (B, S, E)
            ids = (probs + self.bias).topk(k, dim=-1).indices
            w = probs.gather(-1, ids)
            if cfg.router.norm_weights:
                w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
            w = w * (cfg.router.scale if cfg.router.scale not in (0.0, 1.0) else 1.0)
            mix = torch.zeros_like(probs).scatter(-1, ids, w)  # (B, S, E): every expert runs, 32 of 64 wide
            g = torch.einsum("bsd,efd->bsef", f, p("ffn_gate_exps.weight"))
            u = torch.einsum("bsd,efd->bsef", f, p("ffn_up_exps.weight"))
            routed = torch.einsum("bsef,edf,bse->bsd", F.silu(g) * u, p("ffn_down_exps.weight"), mix)
            shared = (F.silu(f @ p("ffn_gate_shexp.weight").T) * (f @ p("ffn_up_shexp.weight").T)) \
                @ p("ffn_down_shexp.weight").T
            return x + (routed + shared)

        def logits(self, out):
            return rms(out, self.p("nextn.shared_head_norm.weight")) @ self.head.T

    return Block()


def load_data(run: Path):
    """The sequences of RUN's data (one file, or a sharded run's data-*.npz) -> (train, held out),
    each a list of (tokens, hidden states, prompt length, greedy)."""
    seqs = []
    for path in sorted(run.glob("data*.npz")):
        with np.load(path) as d:  # (each d[name] reads the array from the file again)
            tokens, hidden, starts, prompt, greedy = d["tokens"], d["hidden"], d["starts"], d["prompt"], d["greedy"]
        seqs += [(tokens[a:b], hidden[a:b], int(p), bool(g))
                 for a, b, p, g in zip(starts[:-1], starts[1:], prompt, greedy)]
    if not seqs:
        raise SystemExit(f"{run}: no data*.npz (run `data` first)")
    cut = len(seqs) - max(1, int(len(seqs) * HELD_OUT))
    return seqs[:cut], seqs[cut:]


def padded(seqs, device, torch):
    """Sequences padded to one length, on the device that trains: tokens (N, S), the main model's
    final hidden states (N, S, D) (float16, as stored), lengths and prompt lengths (N,)."""
    N, S, D = len(seqs), max(len(t) for t, _, _, _ in seqs), seqs[0][1].shape[1]
    tokens, hidden = np.zeros((N, S), np.int64), np.zeros((N, S, D), np.float16)
    for r, (t, h, _, _) in enumerate(seqs):
        tokens[r, :len(t)], hidden[r, :len(t)] = t, h
    n, p = np.array([len(t) for t, _, _, _ in seqs]), np.array([p for _, _, p, _ in seqs])
    return tuple(torch.from_numpy(x).to(device) for x in (tokens, hidden, n, p))


def batch_of(data, idx, torch):
    """Rows idx of padded data, cut to the longest of them: hidden (B, S-1, D), next tokens
    (B, S-1), the main model's hidden state one position later (B, S-1, D) (its head gives the
    target) and a mask of the reply positions (B, S-1) (the drafts a reply asks for)."""
    tokens, hidden, n, p = (x[idx] for x in data)
    S = int(n.max())
    t, h = tokens[:, :S], hidden[:, :S].float()
    j = torch.arange(S - 1, device=t.device)[None]
    # row i drafts token i+2: the reply's second token (row p-1) on
    mask = (j >= (p - 1).clamp_min(0)[:, None]) & (j < (n - 1)[:, None])
    return h[:, :-1], t[:, 1:], h[:, 1:], mask


def agreement(block, data, torch, batch: int = 32) -> float:
    """Top-1 agreement of the block's drafts with the main model's next token over the reply
    positions of padded data: the greedy acceptance of one draft."""
    hits = total = 0
    with torch.no_grad():
        for i in range(0, len(data[0]), batch):
            hid, nxt, tgt, rows = batch_of(data, slice(i, i + batch), torch)
            draft = block.logits(block(hid, nxt)[rows]).argmax(-1)
            main = (tgt[rows] @ block.head.T).argmax(-1)
            hits += int((draft == main).sum())
            total += int(rows.sum())
    return hits / max(total, 1)


def check_against_engine(a, block, seq, torch) -> float:
    """The largest |logit| difference between the PyTorch block (on the CPU) and edgeseek's
    mtp_step over a sequence's last draft, relative to the logits' spread."""
    import edgeseek
    engine = edgeseek.load(a.model, mtp=1, device="cpu")
    model = engine.model
    tokens, hidden, _, _ = seq
    cache = model.new_cache(len(tokens))
    q, _ = model.mtp_step(np.asarray(hidden[:-1], np.float32), np.asarray(tokens[1:]), np.arange(len(tokens) - 1),
                          cache)
    hid, nxt, _, _ = batch_of(padded([seq], "cpu", torch), slice(0, 1), torch)
    with torch.no_grad():
        mine = block.logits(block(hid, nxt)[:, -1]).numpy()
    ref = np.asarray(q, np.float32).reshape(-1)
    return float(np.abs(mine.reshape(-1) - ref).max() / (ref.max() - ref.min()))


def train(a) -> None:
    import torch
    import torch.nn.functional as F
    torch.manual_seed(a.seed)
    cfg, L, weights, embed, head = read_block(a.model)
    block = torch_block(cfg, weights, embed, head)
    if (a.out / "block.pt").exists() and not a.restart:  # resume
        block.load_state_dict(torch.load(a.out / "block.pt", map_location="cpu"))
        print(f"resumed from {a.out / 'block.pt'}")
    train_seqs, held = load_data(a.data or a.out)
    gap = check_against_engine(a, block, held[0], torch)
    print(f"the PyTorch block against edgeseek's mtp_step: max |logit difference| {gap:.2e} of the spread")
    if gap > 0.05:
        raise SystemExit("the PyTorch block does not compute what edgeseek's does: not training it")
    device = torch.device(a.device)
    block.to(device)
    if a.greedy_only:
        train_seqs = [s for s in train_seqs if s[3]]
    data = padded(train_seqs, device, torch)
    greedy = [s for s in held if s[3]]
    held_all, held_greedy = padded(held, device, torch), padded(greedy, device, torch) if greedy else None

    def held_out():  # all held-out replies, and the greedy ones (as the bench decodes)
        return agreement(block, held_all, torch), agreement(block, held_greedy, torch) if greedy else math.nan
    before = held_out()
    print(f"held-out top-1 agreement with the main model before: {before[0]:.3f}, greedy replies {before[1]:.3f} "
          f"({len(held)} sequences, {len(greedy)} greedy)", flush=True)
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(a.seed)
    t0, step = time.time(), 0
    log = []
    while (step < a.steps) if a.steps else (time.time() - t0 < 60 * a.minutes):
        progress = step / a.steps if a.steps else (time.time() - t0) / (60 * a.minutes)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        idx = torch.randint(0, len(data[0]), (a.batch,), device=device, generator=gen)
        hid, nxt, tgt, rows = batch_of(data, idx, torch)
        with torch.no_grad():
            main = tgt[rows] @ block.head.T  # the main model's next-token logits, one position on
        logq = F.log_softmax(block.logits(block(hid, nxt)[rows]), -1)
        if a.target == "top1":  # cross-entropy to the main model's token: all of the block's capacity on the argmax
            loss = F.nll_loss(logq, main.argmax(-1))
        else:  # cross-entropy to the main model's distribution: the KL up to its entropy
            loss = -(F.softmax(main, -1) * logq).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        evaluate = a.eval_every and step % a.eval_every == 0
        if step % 25 == 0 or evaluate:
            agree = float((logq.argmax(-1) == main.argmax(-1)).float().mean())
            entry = {"step": step, "loss": round(loss.item(), 4), "agreement": round(agree, 4)}
            if evaluate:
                entry["held_out"], entry["held_out_greedy"] = (round(x, 4) for x in held_out())
            print(" ".join(f"{k} {v}" for k, v in entry.items()) + f" {time.time() - t0:.0f} s", flush=True)
            log.append(entry)
    after = held_out()
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"held-out top-1 agreement with the main model after {step} steps: {after[0]:.3f}, greedy replies "
          f"{after[1]:.3f} (before {before[0]:.3f}, {before[1]:.3f})")
    torch.save({k: v.cpu() for k, v in block.state_dict().items()}, a.out / "block.pt.tmp")
    (a.out / "block.pt.tmp").replace(a.out / "block.pt")
    path = a.out / "train.json"
    info = json.loads(path.read_text()) if path.exists() and not a.restart else {}
    info.setdefault("before", before[0])
    info.setdefault("before_greedy", before[1])
    info.update(after=after[0], after_greedy=after[1], steps=info.get("steps", 0) + step,
                seconds=round(info.get("seconds", 0) + time.time() - t0), engine_gap=gap,
                held_out_sequences=len(held), train_sequences=len(train_seqs), device=a.device, batch=a.batch,
                lr=a.lr, target=a.target, greedy_only=a.greedy_only, log=log)
    path.write_text(json.dumps(info, indent=1) + "\n")


def write(a) -> None:
    """The file with the tuned block: written beside DST and renamed."""
    import torch
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

    from edgeseek.convert.convert import copy_metadata
    cfg, L, weights, embed, head = read_block(a.model)
    block = torch_block(cfg, weights, embed, head)
    block.load_state_dict(torch.load(a.out / "block.pt", map_location="cpu"))
    tuned = {f"blk.{L}.{n}": (block.p(n) if n not in FIXED else block.bias).detach().numpy() for n in BLOCK}
    r = GGUFReader(a.model)
    tmp = a.dst.with_name(a.dst.name + ".tmp")
    w = GGUFWriter(tmp, r.fields["general.architecture"].contents())
    copy_metadata(r, w)
    for t in r.tensors:
        if t.name not in tuned:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        elif t.tensor_type == GGMLQuantizationType.F32:
            w.add_tensor(t.name, np.ascontiguousarray(tuned[t.name], np.float32))
        else:
            w.add_tensor(t.name, quants.quantize(np.ascontiguousarray(tuned[t.name], np.float32), t.tensor_type),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(a.dst)
    print(f"-> {a.dst}")


def shard(text: str) -> tuple[int, int]:
    i, n = (int(x) for x in text.split("/"))
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: expected I/N with 0 <= I < N")
    return i, n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["data", "train", "write"])
    p.add_argument("model", type=Path, help="a GGUF file with an MTP layer")
    p.add_argument("dst", type=Path, nargs="?", help="write: the file with the tuned block")
    p.add_argument("--out", type=Path, required=True, help="the run's folder (data, the tuned block)")
    p.add_argument("--prompts", type=int, default=2400)
    p.add_argument("--reply", type=int, default=128)
    p.add_argument("--sampled", type=float, default=0.3, help="data: the share of replies sampled, not greedy")
    p.add_argument("--parallel", type=int, default=64, help="data: sequences decoded together")
    p.add_argument("--shard", type=shard, default=(0, 1), metavar="I/N",
                   help="data: the I-th of N parts of the prompts (N processes side by side; train reads them all)")
    p.add_argument("--data", type=Path, help="train: the folder of the data (default: --out)")
    p.add_argument("--device", default="cpu", help="train: where the block trains (cpu, cuda)")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=0,
                   help="train: this many steps (the schedule's length) instead of --minutes")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--target", choices=["kl", "top1"], default="kl",
                   help="train: the main model's next-token distribution, or its most likely token")
    p.add_argument("--greedy-only", action="store_true", help="train: on the greedy replies alone")
    p.add_argument("--eval-every", type=int, default=0, help="train: held-out agreement every this many steps")
    p.add_argument("--restart", action="store_true", help="train: from the file's block, not RUN/block.pt")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_intermixed_args()  # DST after --out RUN, as the usage above writes it
    if a.command == "write" and a.dst is None:
        p.error("write needs DST")
    {"data": make_data, "train": train, "write": write}[a.command](a)


if __name__ == "__main__":
    main()
