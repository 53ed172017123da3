"""Tune a GGUF file's MTP block to the file's own main model, on a CPU (issue 13).

    python train/tune_mtp.py data  MODEL.gguf --out RUN [--prompts 2400] [--reply 128]
    python train/tune_mtp.py train MODEL.gguf --out RUN [--minutes 20]
    python train/tune_mtp.py write MODEL.gguf --out RUN DST.gguf

A draft is accepted when it equals the token the main model itself would produce, so the block is
trained on the main model's own replies to the distillation program's prompts (train/distill.py;
every prompt that names a topic of bench/bench_mtp.py's prompts left out, so the bench measures
replies the block never saw), against the main model's own next-token distribution one position
later (KL, full vocabulary): what self-speculative decoding asks of it. distill.py trains the
block in its training checkpoint on the teacher's text (`train`, cross-entropy to that text;
`tune-mtp`, against the main model there); this needs only the GGUF file. On edgeseek-mini, 25
minutes raised held-out top-1 agreement from 0.690 to 0.718 but not bench_mtp's acceptance (0.58
against 0.59): the shipped file keeps its block.

`data` decodes the replies with edgeseek itself (a share sampled at temperature 0.7 for variety,
the rest greedy, as the bench decodes), then runs each whole sequence through the main model once
more for its final hidden states (after output_norm: what the MTP block reads). `train` starts from
the file's MTP block (dequantized) as a PyTorch module that computes what models/deepseek2.py
computes (MLA in the absorbed form over the block's own latent cache, sigmoid routing with the
selection bias, the shared expert), the main model's embedding and head frozen; before training it
checks its logits against edgeseek's own `mtp_step` on a held-out sequence. `write` puts the tuned
block back into a copy of the file (its matrices quantized by gguf-py in the file's own type;
every other tensor copied byte for byte), written beside and renamed.
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
    out = [p for p in prompts(3 * n, seed) if not any(t in p for t in BENCH_TOPICS)]
    return list(dict.fromkeys(out))[:n]


def make_data(a) -> None:
    import edgeseek
    from edgeseek.generation import BatchGenerator
    from edgeseek.sampler import SamplerConfig
    engine = edgeseek.load(a.model, mtp="off")
    model = engine.model
    texts = training_prompts(a.prompts, a.seed)
    rng = np.random.default_rng(a.seed)
    template = engine.chat_template  # a file without one: the prompts as plain text
    ids = [engine.tokenizer.encode(template.render([{"role": "user", "content": t}], add_generation_prompt=True)
                                   if template is not None else t) for t in texts]
    replies: dict[int, list[int]] = {i: [] for i in range(len(ids))}
    gen, pending, t0 = BatchGenerator(engine), list(range(len(ids))), time.time()
    while pending or gen:
        queued = False
        while pending and len(gen) < a.parallel:
            i = pending.pop(0)
            sampler = SamplerConfig(temperature=0.7, seed=a.seed + i) if rng.random() < a.sampled \
                else SamplerConfig.greedy()
            gen.queue(ids[i], max_tokens=a.reply, sampler=sampler, uid=i)
            queued = True
        deltas = gen.prefill() if queued else gen.step()
        for d in deltas:
            if d.token is not None:
                replies[d.uid].append(d.token)
        done = len(ids) - len(pending) - len(gen)
        if deltas and done % 100 == 0 and any(x.finish_reason for x in deltas):
            print(f"{done}/{len(ids)} replies, {time.time() - t0:.0f} s", flush=True)
    seqs = [ids[i] + replies[i] for i in range(len(ids))]
    hidden = []
    for s in seqs:  # the whole sequence once more: its final hidden states, every position
        _, h = model.forward(np.asarray(s, np.int32), model.new_cache(len(s)), hidden=True)
        hidden.append(np.asarray(h, np.float32))
    starts = np.cumsum([0] + [len(s) for s in seqs])
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "data.npz.tmp", "wb") as f:  # written beside and renamed: an interrupted run leaves no half file
        np.savez(f, tokens=np.concatenate(seqs).astype(np.int32), starts=starts,
                 prompt=np.array([len(x) for x in ids]), hidden=np.concatenate(hidden).astype(np.float16))
    (a.out / "data.npz.tmp").replace(a.out / "data.npz")
    print(f"{len(seqs)} sequences, {starts[-1]} positions ({sum(map(len, replies.values()))} reply tokens) "
          f"in {time.time() - t0:.0f} s -> {a.out / 'data.npz'}")


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
            pos = torch.arange(S)
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
            scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
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
    with np.load(run / "data.npz") as d:  # (each d[name] reads the array from the file again)
        tokens, hidden, starts, prompt = d["tokens"], d["hidden"], d["starts"], d["prompt"]
    seqs = [(tokens[a:b], hidden[a:b], int(p)) for a, b, p in zip(starts[:-1], starts[1:], prompt)]
    cut = len(seqs) - max(1, int(len(seqs) * HELD_OUT))
    return seqs[:cut], seqs[cut:]


def batch_of(seqs, torch):
    """Sequences padded to one length: hidden (B, S-1, D), next tokens (B, S-1), the main model's
    hidden state one position later (B, S-1, D) (its head gives the target) and a mask of the reply
    positions (the drafts a reply asks for)."""
    S = max(len(t) for t, _, _ in seqs)
    B, D = len(seqs), seqs[0][1].shape[1]
    hid, nxt, tgt = np.zeros((B, S - 1, D), np.float32), np.zeros((B, S - 1), np.int64), np.zeros((B, S - 1, D), np.float32)
    mask = np.zeros((B, S - 1), np.float32)
    for r, (t, h, p) in enumerate(seqs):
        n = len(t) - 1
        hid[r, :n], nxt[r, :n], tgt[r, :n] = h[:-1], t[1:], h[1:]
        mask[r, max(0, p - 1):n] = 1.0  # row i drafts token i+2: the reply's second token (row p-1) on
    return tuple(torch.from_numpy(x) for x in (hid, nxt, tgt, mask))


def agreement(block, seqs, torch) -> float:
    """Top-1 agreement of the block's drafts with the main model's next token over the reply
    positions of seqs: the greedy acceptance of one draft."""
    hits = total = 0.0
    with torch.no_grad():
        for i in range(0, len(seqs), 8):
            hid, nxt, tgt, mask = batch_of(seqs[i:i + 8], torch)
            rows = mask.bool()
            draft = block.logits(block(hid, nxt)[rows]).argmax(-1)
            main = (tgt[rows] @ block.head.T).argmax(-1)
            hits += float((draft == main).sum())
            total += float(rows.sum())
    return hits / max(total, 1.0)


def check_against_engine(a, block, seq, torch) -> float:
    """The largest |logit| difference between the PyTorch block and edgeseek's mtp_step over a
    sequence's last draft, relative to the logits' spread."""
    import edgeseek
    engine = edgeseek.load(a.model, mtp=1)
    model = engine.model
    tokens, hidden, _ = seq
    cache = model.new_cache(len(tokens))
    q, _ = model.mtp_step(np.asarray(hidden[:-1], np.float32), np.asarray(tokens[1:]), np.arange(len(tokens) - 1),
                          cache)
    hid, nxt, _, _ = batch_of([seq], torch)
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
        block.load_state_dict(torch.load(a.out / "block.pt"))
        print(f"resumed from {a.out / 'block.pt'}")
    train_seqs, held = load_data(a.out)
    gap = check_against_engine(a, block, held[0], torch)
    print(f"the PyTorch block against edgeseek's mtp_step: max |logit difference| {gap:.2e} of the spread")
    if gap > 0.05:
        raise SystemExit("the PyTorch block does not compute what edgeseek's does: not training it")
    before = agreement(block, held, torch)
    print(f"held-out top-1 agreement with the main model before: {before:.3f} ({len(held)} sequences)", flush=True)
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(a.seed)
    t0, step = time.time(), 0
    log = []
    while time.time() - t0 < 60 * a.minutes:
        progress = (time.time() - t0) / (60 * a.minutes)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        hid, nxt, tgt, mask = batch_of([train_seqs[i] for i in rng.integers(0, len(train_seqs), a.batch)], torch)
        rows = mask.bool()
        with torch.no_grad():
            p_main = F.softmax(tgt[rows] @ block.head.T, -1)  # the main model's next token, one position on
        logq = F.log_softmax(block.logits(block(hid, nxt)[rows]), -1)
        loss = -(p_main * logq).sum(-1).mean()  # cross-entropy to p_main: the KL up to p_main's entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            agree = float((logq.argmax(-1) == p_main.argmax(-1)).float().mean())
            print(f"step {step} loss {loss.item():.3f} batch agreement {agree:.3f} {time.time() - t0:.0f} s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4), "agreement": round(agree, 4)})
    after = agreement(block, held, torch)
    print(f"held-out top-1 agreement with the main model after {step} steps: {after:.3f} (before {before:.3f})")
    torch.save(block.state_dict(), a.out / "block.pt.tmp")
    (a.out / "block.pt.tmp").replace(a.out / "block.pt")
    info = json.loads((a.out / "train.json").read_text()) if (a.out / "train.json").exists() and not a.restart else {}
    info.setdefault("before", before)
    info.update(after=after, steps=info.get("steps", 0) + step, minutes=info.get("minutes", 0) + a.minutes,
                engine_gap=gap, held_out_sequences=len(held), train_sequences=len(train_seqs), log=log)
    (a.out / "train.json").write_text(json.dumps(info, indent=1) + "\n")


def write(a) -> None:
    """The file with the tuned block: written beside DST and renamed."""
    import torch
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

    from edgeseek.convert.convert import copy_metadata
    cfg, L, weights, embed, head = read_block(a.model)
    block = torch_block(cfg, weights, embed, head)
    block.load_state_dict(torch.load(a.out / "block.pt"))
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["data", "train", "write"])
    p.add_argument("model", type=Path, help="a GGUF file with an MTP layer")
    p.add_argument("dst", type=Path, nargs="?", help="write: the file with the tuned block")
    p.add_argument("--out", type=Path, required=True, help="the run's folder (data, the tuned block)")
    p.add_argument("--prompts", type=int, default=2400)
    p.add_argument("--reply", type=int, default=128)
    p.add_argument("--sampled", type=float, default=0.3, help="data: the share of replies sampled, not greedy")
    p.add_argument("--parallel", type=int, default=16, help="data: sequences decoded together")
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--restart", action="store_true", help="train: from the file's block, not RUN/block.pt")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.command == "write" and a.dst is None:
        p.error("write needs DST")
    {"data": make_data, "train": train, "write": write}[a.command](a)


if __name__ == "__main__":
    main()
