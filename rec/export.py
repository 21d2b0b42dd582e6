"""Serving export: consolidated fp32 weights (safetensors) plus the config that built them;
its backbone also as a standard `transformers` model directory.

    save_export(recommender, "out/export", extra={"dataset": "beauty"})
    rec = load_export("out/export")  # eval mode, ready for score_next / relevance / ...

An export directory holds:

    model.safetensors   every persistent tensor of the `Recommender` in fp32, including the
                        `model.item_categories` buffer (the item table depends on it)
    model_config.json   {"format", "model": ModelConfig, "data": DataDims, "extra": {...}}
    backbone/           the Llama decoder alone (`save_hf_backbone`, added by the training
                        job's export): config.json + model.safetensors, loadable with no
                        project code by `transformers.LlamaModel.from_pretrained`

Vocabulary files (raw id <-> index) are written next to them by the caller. Loading never
unpickles anything: the config is JSON and the weights go through `safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rec.config_loader import from_dict
from rec.model import DataDims, ModelConfig, llama_config
from rec.recommender import Recommender

EXPORT_FORMAT = "raydiv-rec/seqrec-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
BACKBONE_DIR = "backbone"
BACKBONE_PREFIX = "model.backbone."  # the backbone's tensors in the Recommender's state dict


def save_export(
    recommender: Recommender,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write weights and config to `out_dir`; returns the directory.

    state_dict: pass the consolidated weights when the live module holds only shards (e.g.
    DeepSpeed ZeRO-3 `_zero3_consolidated_16bit_state_dict()`); default: the module's own.
    `extra` must be JSON-serialisable (dataset name, vocab file names, metrics, ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = recommender.state_dict() if state_dict is None else state_dict
    # clone(): safetensors rejects tensors that share storage, and views of a bigger buffer.
    tensors = {
        name: (t.detach().float() if t.is_floating_point() else t.detach()).cpu().clone()
        for name, t in source.items()
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    config = {
        "format": EXPORT_FORMAT,
        "model": dataclasses.asdict(recommender.cfg),
        "data": dataclasses.asdict(recommender.dims),
        "extra": dict(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_export_config(export_dir: str | Path) -> tuple[ModelConfig, DataDims, dict[str, Any]]:
    """The (model config, data dims, extra) an export was built with."""
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"no {CONFIG_FILE} in export directory {str(export_dir)!r}")
    raw = json.loads(path.read_text())
    if raw.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{str(path)!r}: format {raw.get('format')!r}, expected {EXPORT_FORMAT!r}")
    # from_dict rejects unknown keys, so an export from a different code version fails loudly.
    return from_dict(ModelConfig, raw["model"]), from_dict(DataDims, raw["data"]), raw["extra"]


def load_export(
    export_dir: str | Path,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> Recommender:
    """Rebuild the `Recommender` from `model_config.json` and load its weights, in eval mode.

    attn_implementation: override the exported one, e.g. "sdpa" to serve on CPU a model
    trained with "flash_attention_2" (the weights do not depend on it).
    """
    cfg, dims, _ = read_export_config(export_dir)
    if attn_implementation is not None:
        cfg = dataclasses.replace(cfg, attn_implementation=attn_implementation)
    path = Path(export_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"no {WEIGHTS_FILE} in export directory {str(export_dir)!r}")
    tensors = load_file(str(path), device=str(device))
    key = "model.item_categories"
    if key not in tensors:
        raise ValueError(f"{str(path)!r} has no {key!r} tensor")
    if "repeat_logit" in tensors:  # exports before 2026-11-30 hold r itself (no repeat_scale)
        tensors["repeat_raw"] = tensors.pop("repeat_logit") / cfg.repeat_scale
    recommender = Recommender(cfg, dims, tensors[key]).to(device)
    recommender.load_state_dict(tensors, strict=True)
    return recommender.eval()


def plain_llama(cfg: ModelConfig) -> bool:
    """Whether the decoder is one plain Llama, so that `save_hf_backbone` can write it (an
    ensemble, `model.members` > 1, has one decoder per tower)."""
    return cfg.freq_mix == 0 and cfg.members == 1


def save_hf_backbone(export_dir: str | Path) -> Path:
    """Write `<export_dir>/backbone/` from an export's own files: the backbone's Hugging Face
    config (`config.json`, as rec.model.llama_config builds it) and its fp32 weights
    (`model.safetensors`), what `transformers.LlamaModel.from_pretrained(dir)` loads with no
    project code. Returns the directory.

    The project feeds the decoder `inputs_embeds` (item + category + behaviour + position
    embeddings, `SeqRecModel.forward`), `attention_mask` and 0-based `position_ids`; given the
    same three, the loaded model returns the same hidden states (before the item heads). It has
    no token vocabulary (vocab_size=1): its token table is one zero row, written so that
    loading reports no missing weights.
    """
    cfg, _, _ = read_export_config(export_dir)
    if not plain_llama(cfg):
        raise ValueError(
            f"{str(export_dir)!r}: model.freq_mix={cfg.freq_mix} adds a layer a plain "
            "transformers Llama does not have; no backbone/ can reproduce it"
        )
    tensors = load_file(str(Path(export_dir) / WEIGHTS_FILE))
    weights = {
        name.removeprefix(BACKBONE_PREFIX): t.float()
        for name, t in tensors.items()
        if name.startswith(BACKBONE_PREFIX)
    }
    if not weights:
        raise ValueError(f"{str(export_dir)!r}: {WEIGHTS_FILE} holds no {BACKBONE_PREFIX}* tensor")
    hf = llama_config(cfg)
    hf.architectures = ["LlamaModel"]
    weights["embed_tokens.weight"] = torch.zeros(hf.vocab_size, hf.hidden_size)
    out = Path(export_dir) / BACKBONE_DIR
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    # "format": "pt" is what transformers' loader expects in a safetensors header.
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
