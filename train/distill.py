"""Distil SmolLM2-135M-Instruct into a small DeepSeek-V3-architecture model (issue 12), on a GPU.

    python train/distill.py data    --teacher SmolLM2.gguf --out RUN [--prompts 4000]
    python train/distill.py train   --teacher SmolLM2.gguf --out RUN [--minutes 8] [--size small]
    python train/distill.py export  --teacher SmolLM2.gguf --out RUN  # -> RUN/hf (config, safetensors, tokenizer)

The student is transformers' DeepseekV3ForCausalLM (MLA with a latent KV and the rope/nope split;
one leading dense layer, then MoE layers with a shared expert and fine-grained routed experts;
sigmoid routing whose selection bias is nudged each step toward equal load, b_i += gamma *
sign(mean load - load_i), with no auxiliary loss) plus one MTP module as DeepSeek-V3 has it: the
embedding of token t+1 and the main model's final (normed) hidden state at t, each RMS-normed,
concatenated [embedding; hidden], projected, one decoder block, the shared head after its own norm;
trained with its own loss weight. Exported in Hugging Face's DeepseekV3 layout with the MTP block as
layer num_hidden_layers (num_nextn_predict_layers = 1), where `edgeseek convert --keep-mtp` and
llama.cpp's converter find it.

The teacher is the GGUF file itself (no model hub): its tensors dequantized by gguf-py into
transformers' LlamaForCausalLM (q/k rows un-permuted from llama.cpp's rope order). Data: the
teacher's own replies to varied prompts in its chat template, sampled on the GPU (`data`). Loss: KL
to the teacher's top-k logits (temperature 1) plus next-token cross-entropy, and the MTP module's
cross-entropy on the token after next.

GPU time comes in runs of minutes and what comes back is at most 64 MB: `train` stops after
--minutes and saves RUN/ckpt/ (files of at most 15 MiB: bf16 weights, the routers' biases in
float32, the step; the optimizer's moments are not kept: a resumed run warms its learning rate up
again), and resumes from it.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

SIZES = {
    # hidden, layers (1 dense + MoE), heads, kv_lora, nope, rope, v, experts, top-k, expert width, dense width
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=32, intermediate_size=128),
    # ~27 M parameters (19 M of them the 49152 x 192 embedding and head): 54 MB of bf16 checkpoint,
    # under the 64 MB a GPU run can send back; about 29 MB as Q8_0
    "small": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=4, kv_lora_rank=128, qk_nope_head_dim=32,
                  qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4,
                  moe_intermediate_size=64, intermediate_size=768),
}
PROMPT_TOPICS = [
    "the sea", "bread", "a city at night", "prime numbers", "photosynthesis", "the moon", "a bicycle", "friendship",
    "rain", "the printing press", "volcanoes", "a library", "chess", "coffee", "the history of writing",
    "a mountain village", "electricity", "trees", "the ocean tides", "music", "honey bees", "the Roman Empire",
    "a train journey", "gravity", "cooking rice", "the desert", "a lighthouse", "clouds", "the internet", "dogs",
    "cats", "a garden in spring", "the human heart", "recycling", "the stars", "an old castle", "learning a language",
    "mathematics", "a thunderstorm", "birds migrating", "the Pyramids", "a market", "sleep", "snow", "rivers",
    "the wheel", "a robot", "teamwork", "maps", "the alphabet", "a birthday party", "saving money", "exercise",
    "the brain", "a forest", "dinosaurs", "the solar system", "a sailing ship", "paper", "the telephone", "tea",
    "a school day", "kindness", "time", "a bridge", "computers", "the weather", "an island", "fire", "glass",
    "the calendar", "a museum", "football", "painting", "the piano", "a letter to a friend", "the autumn", "apples",
    "a kitchen", "the post office", "whales", "ants", "a hospital", "the rainbow", "water", "salt", "a farmer",
    "the newspaper", "a clock", "courage", "the first airplane", "the compass", "a picnic", "a good habit",
    "the Earth's core", "earthquakes", "a small town", "memory", "the color blue", "a journey to the mountains",
    "a busy street", "the night sky", "a penguin", "a recipe for soup", "the Olympic games", "a thank-you note",
    "a mystery", "the future of cities", "a quiet morning", "an inventor", "the seasons", "a dragon", "a poem",
]
PROMPT_FORMS = [
    "Write a short story about {}.", "Explain {} to a child.", "Give three facts about {}.", "Write a poem about {}.",
    "What is the most interesting thing about {}?", "Describe {} in two sentences.", "Why does {} matter?",
    "List some questions about {}.", "What do you know about {}?", "Tell me a joke about {}.",
    "Write a paragraph about {}.", "How would you describe {} to someone who has never seen it?",
    "What are the pros and cons of {}?", "Summarize the main ideas about {}.", "Write a haiku about {}.",
    "Can you teach me something about {}?", "Write a dialogue between two friends about {}.",
    "What would happen if there were no {}?", "Give me advice related to {}.", "Compare {} and {}.",
]
HELD_OUT = 0.04  # the last 4% of the data's rows: never trained on, the held-out text for perplexity


# --- the teacher ---------------------------------------------------------------------------------
def load_teacher(path: Path, device: str = "cpu"):
    """SmolLM2 (any llama GGUF) as transformers' LlamaForCausalLM, weights dequantized to float32."""
    import torch
    from gguf import GGUFReader, quants
    from transformers import LlamaConfig, LlamaForCausalLM

    r = GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    a = f["general.architecture"]
    H, n_head = f[f"{a}.embedding_length"], f[f"{a}.attention.head_count"]
    n_kv = f.get(f"{a}.attention.head_count_kv", n_head)
    vocab = len(f["tokenizer.ggml.tokens"])
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=H, intermediate_size=f[f"{a}.feed_forward_length"],
                      num_hidden_layers=f[f"{a}.block_count"], num_attention_heads=n_head, num_key_value_heads=n_kv,
                      rms_norm_eps=f[f"{a}.attention.layer_norm_rms_epsilon"],
                      rope_theta=f.get(f"{a}.rope.freq_base", 10000.0),
                      max_position_embeddings=f.get(f"{a}.context_length", 2048),
                      tie_word_embeddings="output.weight" not in {t.name for t in r.tensors})
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    state = {}
    for t in r.tensors:
        w = quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind in ("attn_q", "attn_k"):  # llama.cpp's rope pairs -> transformers' halves
                heads = n_head if kind == "attn_q" else n_kv
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            key = f"model.layers.{parts[1]}.{names[kind]}.weight"
        else:
            key = f"{names[parts[0]]}.weight"
        state[key] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]:
        raise ValueError(f"{path}: teacher tensors do not fit: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval(), f


# --- the student ---------------------------------------------------------------------------------
def student_config(size: str, vocab: int, bos: int, eos: int):
    from transformers import DeepseekV3Config
    s = SIZES[size]
    cfg = DeepseekV3Config(vocab_size=vocab, q_lora_rank=None, n_shared_experts=1, first_k_dense_replace=1,
                           n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                           num_nextn_predict_layers=1, tie_word_embeddings=False, max_position_embeddings=2048,
                           rope_theta=10000.0, bos_token_id=bos, eos_token_id=eos, rope_scaling=None,
                           rms_norm_eps=1e-6, num_key_value_heads=s["num_attention_heads"], **s)  # MLA: one kv head each
    cfg._attn_implementation = "sdpa"  # causal attention with no mask: the MTP block relies on it
    return cfg


def build_student(cfg):
    import torch
    from torch import nn
    from transformers import DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    class MTP(nn.Module):
        """DeepSeek-V3's MTP module: [enorm(embed(t+1)); hnorm(h_t)] -> eh_proj -> block -> head norm."""

        def __init__(self):
            super().__init__()
            H = cfg.hidden_size
            self.enorm = DeepseekV3RMSNorm(H, eps=cfg.rms_norm_eps)
            self.hnorm = DeepseekV3RMSNorm(H, eps=cfg.rms_norm_eps)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
            self.block = DeepseekV3DecoderLayer(cfg, cfg.num_hidden_layers)
            self.head_norm = DeepseekV3RMSNorm(H, eps=cfg.rms_norm_eps)

        def forward(self, model, hidden, next_ids):
            e = model.model.embed_tokens(next_ids)
            x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(hidden)], dim=-1))
            pos = torch.arange(x.shape[1], device=x.device)[None]
            x = self.block(x, position_embeddings=model.model.rotary_emb(x, pos), attention_mask=None,
                           position_ids=pos)
            x = x[0] if isinstance(x, tuple) else x
            return model.lm_head(self.head_norm(x))

    model = DeepseekV3ForCausalLM(cfg)
    mtp = MTP()
    mtp.apply(model._init_weights)  # a block built outside the model: its experts and router start as torch.empty
    return model, mtp


def routers(model) -> list:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


# --- data ----------------------------------------------------------------------------------------
def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        form = PROMPT_FORMS[rng.integers(len(PROMPT_FORMS))]
        topics = rng.choice(len(PROMPT_TOPICS), 2, replace=False)
        text = form.format(*(PROMPT_TOPICS[t] for t in topics[:form.count("{}")]))
        out.append(text + ("" if rng.random() < 0.7 else " Be brief."))
    return out


class _Chat:
    """Prompts in the teacher's chat template (rendered in edgeseek's jinja2 sandbox) and tokenized by
    its tokenizer rebuilt as tokenizer.json: nothing here needs edgeseek's numba kernels, so the GPU
    machine runs it without them."""

    def __init__(self, teacher_path: Path, work: Path):
        from tokenizers import Tokenizer

        from edgeseek.chat_template import ChatTemplate
        from edgeseek.gguf_file import GGUFFile
        write_tokenizer(teacher_path, work)
        self.tok = Tokenizer.from_file(str(work / "tokenizer.json"))
        self.template = ChatTemplate.from_gguf(GGUFFile(teacher_path))

    def ids(self, text: str) -> list[int]:
        rendered = self.template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        return self.tok.encode(rendered, add_special_tokens=False).ids


def make_data(a) -> None:
    """The teacher's replies to varied prompts, sampled on the GPU: RUN/data.npy (token ids of
    prompt + reply, one sequence per row, padded with -1)."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    t_end = time.time() + 60 * a.data_minutes
    teacher, meta = load_teacher(a.teacher, device)
    chat = _Chat(a.teacher, a.out / "tokenizer")
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 2))
    rows = []
    texts = prompts(a.prompts, a.seed)
    torch.manual_seed(a.seed)
    for i in range(0, len(texts), a.gen_batch):
        if time.time() > t_end:
            print(f"--data-minutes reached after {i} prompts")
            break
        batch = [chat.ids(t) for t in texts[i:i + a.gen_batch]]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, b in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[j, width - len(b):] = torch.tensor(b)
            mask[j, width - len(b):] = 1
        with torch.no_grad():
            out = teacher.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=a.reply,
                                   do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=eos)
        for j, b in enumerate(batch):
            reply = out[j, width:].tolist()
            if eos in reply:
                reply = reply[:reply.index(eos) + 1]
            rows.append(b + reply)
    a.out.mkdir(parents=True, exist_ok=True)
    seq = max(map(len, rows))
    arr = np.full((len(rows), seq), -1, np.int32)
    for j, r in enumerate(rows):
        arr[j, :len(r)] = r
    np.save(a.out / "data.npy", arr)
    print(f"{len(rows)} sequences, {int((arr >= 0).sum())} tokens -> {a.out / 'data.npy'}")


# --- training ------------------------------------------------------------------------------------
def train(a) -> None:
    import torch
    import torch.nn.functional as F
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    teacher, meta = load_teacher(a.teacher, device)
    data = np.load(a.out / "data.npy")
    data = data[:len(data) - held_out(len(data))]
    cfg = student_config(a.size, teacher.config.vocab_size, int(meta.get("tokenizer.ggml.bos_token_id", 1)),
                         int(meta.get("tokenizer.ggml.eos_token_id", 2)))
    model, mtp = build_student(cfg)
    model.to(device)
    mtp.to(device)
    ckpt = a.out / "ckpt"
    (a.out / "meta.json").write_text(json.dumps({"vocab": cfg.vocab_size, "bos": cfg.bos_token_id,
                                                 "eos": cfg.eos_token_id}))
    step, seconds = 0, 0.0
    if (ckpt / "index.json").exists():
        state = load_ckpt(ckpt, device)
        model.load_state_dict({k: v.float() for k, v in state["model"].items()})
        mtp.load_state_dict({k: v.float() for k, v in state["mtp"].items()})
        step, seconds = state["step"], state["seconds"]
        print(f"resumed at step {step}")
    params = list(model.parameters()) + list(mtp.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = 100
    if a.opt_state and Path(a.opt_state).exists():  # the moments, where the machine kept them
        saved = torch.load(a.opt_state, map_location=device)
        if saved["step"] == step:  # float32 weights too: the checkpoint's are bf16
            model.load_state_dict(saved["model"])
            mtp.load_state_dict(saved["mtp"])
            opt.load_state_dict(saved["opt"])
            warm = 0
            print("optimizer state resumed")
    gates = routers(model) + routers_of_block(mtp)
    loads: dict = {}

    def hook(gate):
        def record(module, inputs, output):
            idx = output[2]
            loads[gate] = torch.bincount(idx.reshape(-1), minlength=module.num_experts).float()
        return record
    handles = [g.register_forward_hook(hook(g)) for g in gates]
    t_start = time.time()
    t_end = t_start + 60 * a.minutes
    total = 60 * a.total_minutes  # the learning rate's cosine runs over the whole training's time
    rng = np.random.default_rng(a.seed + step)
    model.train()
    mtp.train()
    first = step
    while time.time() < t_end and step < a.steps and seconds + time.time() - t_start < total:
        rows = data[rng.integers(0, len(data), a.batch)]
        width = int((rows >= 0).sum(1).max())
        x = torch.from_numpy(np.where(rows[:, :width] >= 0, rows[:, :width], 0).astype(np.int64)).to(device)
        valid = torch.from_numpy(rows[:, :width] >= 0).to(device)
        progress = min(1.0, max(step / a.steps, (seconds + time.time() - t_start) / total))
        lr = a.lr * min(1.0, (step - first + 1) / warm if warm else 1.0) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16,
                            enabled=device == "cuda"):
            out = model(input_ids=x, output_hidden_states=False)
            logits = out.logits[:, :-1].float()
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits[:, :-1].float()
            top, idx = t_logits.topk(a.top_k, dim=-1)
            t_p = F.softmax(top, dim=-1)
            s_logp = F.log_softmax(logits, dim=-1).gather(-1, idx)
            m = valid[:, 1:].float()
            kd = -(t_p * s_logp).sum(-1)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
            ce = ce.view_as(kd)
            hidden = model.model(input_ids=x).last_hidden_state
            mtp_logits = mtp(model, hidden[:, :-2], x[:, 1:-1]).float()  # (h_i, t_i+1) -> t_i+2
            mtp_ce = F.cross_entropy(mtp_logits.reshape(-1, mtp_logits.shape[-1]), x[:, 2:].reshape(-1),
                                     reduction="none").view(x.shape[0], -1)
            m2 = valid[:, 2:].float()
            loss = ((kd + ce) * m).sum() / m.sum() + a.mtp_weight * (mtp_ce * m2).sum() / m2.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        balance(gates, loads, a.gamma)
        step += 1
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.3f} kd {((kd * m).sum() / m.sum()).item():.3f} "
                  f"mtp {((mtp_ce * m2).sum() / m2.sum()).item():.3f} lr {lr:.2e}", flush=True)
    for h in handles:
        h.remove()
    state = {"model": checkpoint_dtypes(model), "mtp": checkpoint_dtypes(mtp),
             "step": step, "size": a.size, "seconds": seconds + time.time() - t_start}
    save_ckpt(state, ckpt)
    if a.opt_state:
        torch.save({"step": step, "opt": opt.state_dict(), "model": model.state_dict(), "mtp": mtp.state_dict()},
                   a.opt_state)
    print(f"{step - first} steps in {time.time() - t_start:.0f} s")
    print(f"saved step {step} -> {ckpt}")


def balance(gates, loads: dict, gamma: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3): each router's selection bias nudged toward equal
    load, b_i += gamma * sign(mean load - load_i), from the step's counts."""
    import torch
    with torch.no_grad():
        for g in gates:
            if g in loads:
                g.e_score_correction_bias += gamma * torch.sign(loads[g].mean() - loads[g])


def checkpoint_dtypes(module) -> dict:
    """A module's state for the checkpoint: bf16, but the routers' selection biases in float32 (their
    steps of gamma would vanish in bf16)."""
    import torch
    return {k: v.to(torch.bfloat16) if v.is_floating_point() and "e_score_correction_bias" not in k else v
            for k, v in module.state_dict().items()}


SHARD = 15 << 20  # bytes per checkpoint file: a GPU run sends back files of at most 16 MiB


def save_ckpt(state: dict, path: Path) -> None:
    """The checkpoint in files of at most SHARD bytes and an index, written beside and swapped in."""
    import shutil

    import torch
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, cur, size = [], {}, 0
    for part in ("model", "mtp"):
        for k, v in state[part].items():
            v = v.detach().cpu()
            n = v.numel() * v.element_size()
            pieces = [(f"{part}/{k}", v)] if n <= SHARD // 2 else \
                [(f"{part}/{k}#{i}", c) for i, c in enumerate(v.chunk(-(-2 * n // SHARD), 0))]  # the embedding
            for key, t in pieces:
                n = t.numel() * t.element_size()
                if cur and size + n > SHARD:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[key] = t.clone()
                size += n
    shards.append(cur)
    for i, sh in enumerate(shards):
        torch.save(sh, tmp / f"shard-{i:02d}.pt")
    (tmp / "index.json").write_text(json.dumps({"step": state["step"], "size": state["size"], "shards": len(shards),
                                                "seconds": state.get("seconds", 0.0)}))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_ckpt(path: Path, device: str = "cpu") -> dict:
    import torch
    index = json.loads((path / "index.json").read_text())
    state = {"model": {}, "mtp": {}, "step": index["step"], "size": index["size"], "seconds": index.get("seconds", 0.0)}
    pieces: dict = {}
    for i in range(index["shards"]):
        for k, v in torch.load(path / f"shard-{i:02d}.pt", map_location=device).items():
            k, _, piece = k.partition("#")  # a tensor larger than a shard comes in row pieces
            pieces.setdefault(k, []).append((int(piece or 0), v))
    for k, parts in pieces.items():
        part, name = k.split("/", 1)
        state[part][name] = torch.cat([v for _, v in sorted(parts, key=lambda p: p[0])], 0)
    return state


def held_out(rows: int) -> int:
    return max(1, int(rows * HELD_OUT)) if rows > 1 else 0


def routers_of_block(mtp) -> list:
    return [mtp.block.mlp.gate] if hasattr(mtp.block.mlp, "gate") else []


def write_tokenizer(teacher: Path, out: Path) -> None:
    """The teacher's tokenizer as Hugging Face files, rebuilt from its GGUF: tokenizer.json (byte-level
    BPE with SmolLM2's pre-tokenizer, single digits then GPT-2's byte-level split, so that converters
    recognise it as `smollm`), tokenizer_config.json with the chat template and the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from edgeseek.gguf_file import GGUFFile
    g = GGUFFile(teacher)
    if g.meta("tokenizer.ggml.model") != "gpt2" or g.meta("tokenizer.ggml.pre", "") != "smollm":
        raise ValueError(f"{teacher}: only SmolLM2's byte-level BPE tokenizer (pre 'smollm') is rebuilt here")
    tokens, types = g.meta("tokenizer.ggml.tokens"), g.meta("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in g.meta("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                          use_regex=True)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(special)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    name = lambda key: tokens[g.meta(key)]  # noqa: E731
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"), "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"), "add_bos_token": False, "add_eos_token": False,
        "add_prefix_space": False,
        "model_max_length": 8192, "chat_template": g.meta("tokenizer.chat_template")}, indent=1))


def tune_mtp(a) -> None:
    """The MTP module alone, the main model frozen: KL to the main model's own next-token distribution
    one position later (what a draft must agree with to be accepted) plus cross-entropy on the token
    after next. Small enough for a CPU; --reset-experts starts the block's routed experts and router
    afresh (keeping its attention, shared expert and projection)."""
    import torch
    import torch.nn.functional as F
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = load_ckpt(a.out / "ckpt", device)
    meta = json.loads((a.out / "meta.json").read_text())
    cfg = student_config(state["size"], meta["vocab"], meta["bos"], meta["eos"])
    model, mtp = build_student(cfg)
    model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    fresh = {k: v.clone() for k, v in mtp.state_dict().items()}  # (state_dict() aliases the parameters)
    mtp.load_state_dict({k: v.float() for k, v in state["mtp"].items()})
    if a.reset_experts:
        mtp.load_state_dict({k: fresh[k] if ".experts." in k or ".mlp.gate." in k else v
                             for k, v in mtp.state_dict().items()})
    model.to(device).eval().requires_grad_(False)
    mtp.to(device).train()
    data = np.load(a.out / "data.npy")
    data = data[:len(data) - held_out(len(data))]
    opt = torch.optim.AdamW(mtp.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    gates = routers_of_block(mtp)
    loads: dict = {}
    handles = [g.register_forward_hook(lambda m, i, o, g=g: loads.__setitem__(g, torch.bincount(
        o[2].reshape(-1), minlength=m.num_experts).float())) for g in gates]
    rng = np.random.default_rng(a.seed + 1)
    t_start, step = time.time(), 0
    while time.time() - t_start < 60 * a.minutes and step < a.steps:
        rows = data[rng.integers(0, len(data), a.batch)]
        width = int((rows >= 0).sum(1).max())
        x = torch.from_numpy(np.where(rows[:, :width] >= 0, rows[:, :width], 0).astype(np.int64)).to(device)
        valid = torch.from_numpy(rows[:, 2:width] >= 0).to(device).float()
        with torch.no_grad():
            hidden = model.model(input_ids=x).last_hidden_state  # after the output norm, as in training
            top, idx = model.lm_head(hidden[:, 1:-1]).float().topk(a.top_k, dim=-1)
            t_p = F.softmax(top, dim=-1)
        progress = (time.time() - t_start) / (60 * a.minutes)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        logits = mtp(model, hidden[:, :-2], x[:, 1:-1]).float()
        logp = F.log_softmax(logits, dim=-1)
        kd = -(t_p * logp.gather(-1, idx)).sum(-1)
        ce = F.nll_loss(logp.reshape(-1, logp.shape[-1]), x[:, 2:].reshape(-1), reduction="none").view_as(kd)
        agree = (logits.argmax(-1) == idx[..., 0]).float()
        loss = ((kd + ce) * valid).sum() / valid.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mtp.parameters(), 1.0)
        opt.step()
        balance(gates, loads, a.gamma)
        step += 1
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.3f} top-1 agreement with the main model "
                  f"{((agree * valid).sum() / valid.sum()).item():.3f}", flush=True)
    for h in handles:
        h.remove()
    state["mtp"] = checkpoint_dtypes(mtp)
    save_ckpt(state, a.out / "ckpt")
    print(f"MTP tuned for {step} steps -> {a.out / 'ckpt'}")


def export(a) -> None:
    """RUN/ckpt -> RUN/hf: config.json, model.safetensors (the MTP block as layer L) and the teacher's
    tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file
    state = load_ckpt(a.out / "ckpt")
    meta = json.loads((a.out / "meta.json").read_text()) if (a.out / "meta.json").exists() else {}
    cfg = student_config(state["size"], meta.get("vocab", a.vocab), meta.get("bos", 1), meta.get("eos", 2))
    model, mtp = build_student(cfg)
    model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    mtp.load_state_dict({k: v.float() for k, v in state["mtp"].items()})
    out = a.out / "hf"
    model.save_pretrained(out)  # config.json with num_nextn_predict_layers = 1
    config = json.loads((out / "config.json").read_text())
    config.update(scoring_func="sigmoid", topk_method="noaux_tc")  # as DeepSeek-V3's: converters read them
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(out / "model.safetensors")
    L = cfg.num_hidden_layers
    for k, v in mtp.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):  # (E, 2F, H) fused in memory; per expert on disk, as
            gate, up = v.chunk(2, dim=1)             # save_pretrained writes the main layers
            for e in range(v.shape[0]):
                tensors[f"model.layers.{L}.mlp.experts.{e}.gate_proj.weight"] = gate[e].contiguous()
                tensors[f"model.layers.{L}.mlp.experts.{e}.up_proj.weight"] = up[e].contiguous()
            continue
        if k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                tensors[f"model.layers.{L}.mlp.experts.{e}.down_proj.weight"] = v[e].contiguous()
            continue
        if k.startswith("block."):
            name = f"model.layers.{L}.{k[len('block.'):]}"
        else:
            name = {"enorm.weight": f"model.layers.{L}.enorm.weight", "hnorm.weight": f"model.layers.{L}.hnorm.weight",
                    "eh_proj.weight": f"model.layers.{L}.eh_proj.weight",
                    "head_norm.weight": f"model.layers.{L}.shared_head.norm.weight"}[k]
        tensors[name] = v.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(a.teacher, out)
    print(f"-> {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["data", "train", "tune-mtp", "export"])
    p.add_argument("--teacher", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", default="small", choices=list(SIZES))
    p.add_argument("--prompts", type=int, default=16000)
    p.add_argument("--reply", type=int, default=192)
    p.add_argument("--batch", type=int, default=64, help="training sequences per step")
    p.add_argument("--gen-batch", type=int, default=256, help="prompts the teacher answers at once")
    p.add_argument("--data-minutes", type=float, default=4.0)
    p.add_argument("--minutes", type=float, default=8.0, help="this run's training time")
    p.add_argument("--total-minutes", type=float, default=16.0, help="the whole training's time (lr schedule)")
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--opt-state", help="where to keep the optimizer's moments between runs on one machine")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--gamma", type=float, default=1e-3, help="router bias step of the load balancing")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reset-experts", action="store_true", help="tune-mtp: the block's routed experts afresh")
    a = p.parse_args()
    {"data": make_data, "train": train, "tune-mtp": tune_mtp, "export": export}[a.command](a)


if __name__ == "__main__":
    main()
