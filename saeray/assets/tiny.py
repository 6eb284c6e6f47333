"""Tiny real parts built in-process: a BPE tokenizer, Llama/Gemma-style models, a PaliGemma-style VLM,
sae-lens SAEs, text and image+text datasets.

Nothing is downloaded. Models have random weights but are ordinary `transformers` models
saved to disk and loaded the same way a hub model is. Used by the tests and by
`saeray demo --tiny`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

SPECIAL = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be "
         "def return class import self None True False if else for while print value list dict "
         "model feature sparse token layer energy river mountain music planet code data python").split()


def corpus(n_docs: int, seed: int = 0, min_words: int = 1, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        k = rng.randint(min_words, max_words)
        words = [rng.choice(WORDS) for _ in range(k)]
        if i % 5 == 0:
            words.insert(rng.randint(0, len(words)), "<|im_start|>assistant\n")
        docs.append(" ".join(words) + ("." if i % 3 else ""))
    return docs


def make_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(400, seed=123), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.save_pretrained(path)
    return fast


def make_model(path: Path, arch: str, n_layers: int = 4, d_model: int = 64, seed: int = 0) -> Path:
    """A randomly initialised Llama-, Gemma2- or Gemma3-style causal LM with its tokenizer, saved to `path`."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig

    tok = make_tokenizer(path)
    common = dict(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    elif arch == "gemma2":  # attention logits soft-capped at 50, as Gemma 2 ships
        cfg = Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return path


def make_sae(path: Path, arch: str, d_in: int, hook: str, d_sae: int = 96, seed: int = 0,
             prepend_bos: bool = True, context_size: int = 24, k: int = 8) -> Path:
    """A sae-lens SAE of architecture standard | topk | jumprelu with random weights, saved to `path`."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook, prepend_bos=prepend_bos, context_size=context_size, model_name="tiny")
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    else:
        raise ValueError(arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif name == "b_enc":
                p.copy_(-0.5 - torch.rand(p.shape, generator=g))  # sparse but not empty codes
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    sae.save_model(path)
    return path


def write_dataset(path: Path, docs: list[str], n_files: int = 3, extra: dict[str, list] | None = None) -> Path:
    """Parquet files part-0..n with columns text (+ extra), rows in order across files."""
    path.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(docs), n_files + 1).astype(int)
    for i in range(n_files):
        a, b = bounds[i], bounds[i + 1]
        cols = {"text": docs[a:b]}
        for k, v in (extra or {}).items():
            cols[k] = v[a:b]
        pq.write_table(pa.table(cols), path / f"part-{i}.parquet", row_group_size=7)
    return path


def make_vlm(path: Path, n_layers: int = 4, d_model: int = 64, image_size: int = 28, patch_size: int = 14,
             seed: int = 0) -> Path:
    """A randomly initialised PaliGemma-style model (tiny SigLIP tower + Gemma 2 text model) with its
    PaliGemmaProcessor, saved to `path`: (image_size / patch_size)^2 image tokens per image."""
    from transformers import (
        Gemma2Config,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tok = make_tokenizer(path)
    pixels = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    pixels.image_seq_length = (image_size // patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=pixels, tokenizer=tok)  # adds <image> and loc/seg tokens
    text = Gemma2Config(vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
                        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=512, sliding_window=8, query_pre_attn_scalar=16,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                          vocab_size=len(tok), projection_dim=d_model, hidden_size=d_model)
    torch.manual_seed(seed)
    PaliGemmaForConditionalGeneration(cfg).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def language_model_of(vlm: Path, path: Path, noise: float = 0.0, seed: int = 0) -> Path:
    """The text half of a tiny VLM as a Gemma 2 causal LM (weights copied; plus Gaussian `noise` x each
    weight's std when asked, to plant differences), saved with the VLM's tokenizer to `path`."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Gemma2ForCausalLM

    model = AutoModelForImageTextToText.from_pretrained(vlm, dtype=torch.float32)
    text_cfg = model.config.text_config
    text_cfg.use_bidirectional_attention = False
    lm = Gemma2ForCausalLM(text_cfg)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.tie_weights()
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lm.model.layers.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std().clamp_min(1e-3))
    lm.save_pretrained(path)
    AutoTokenizer.from_pretrained(vlm).save_pretrained(path)
    return path


def images(n: int, seed: int = 0) -> list[bytes]:
    """`n` deterministic PNG images of varied sizes: smooth colour gradients with noise, every third one bright."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * rng.uniform(0.2, 1.0, 3)
        pixels = base + rng.normal(0, 0.1, (h, w, 3)) + (0.5 if i % 3 == 0 else 0.0)
        buf = io.BytesIO()
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_image_dataset(path: Path, texts: list[str], n_files: int = 2, seed: int = 0,
                        missing: tuple[int, ...] = ()) -> Path:
    """Parquet files part-0..n with columns text and image (HF Image structs {bytes, path}); rows in
    `missing` have a null image."""
    path.mkdir(parents=True, exist_ok=True)
    pngs = images(len(texts), seed)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    structs = [None if i in missing else {"bytes": b, "path": f"img-{i}.png"} for i, b in enumerate(pngs)]
    bounds = np.linspace(0, len(texts), n_files + 1).astype(int)
    for i in range(n_files):
        a, b = bounds[i], bounds[i + 1]
        pq.write_table(pa.table({"text": pa.array(texts[a:b], pa.string()),
                                 "image": pa.array(structs[a:b], image_type)}), path / f"part-{i}.parquet",
                       row_group_size=5)
    return path
