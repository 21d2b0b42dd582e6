"""The export for users outside the project: the backbone as a `transformers` model directory
that loads with no project code, and true fp32 master weights under bf16 training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rec.export import BACKBONE_DIR, save_export, save_hf_backbone
from tests.test_model import make_batch, random_sequences, tiny_recommender

REPO = Path(__file__).resolve().parents[1]


def backbone_call(rec, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The keyword inputs the project's forward hands its Llama decoder, and its output."""
    seen: dict = {}

    def hook(_module, _args, kwargs, output):
        seen["inputs"] = {k: kwargs[k] for k in ("inputs_embeds", "attention_mask", "position_ids")}
        seen["output"] = output.last_hidden_state

    handle = rec.model.backbone.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            rec.model(batch)
    finally:
        handle.remove()
    return seen["inputs"], seen["output"]


def test_backbone_loads_in_transformers_without_project_code(tmp_path):
    rec = tiny_recommender(seed=3)
    batch = make_batch(random_sequences(5, seed=2), max_len=16)
    opt = torch.optim.Adam(rec.parameters(), lr=1e-2)
    for _ in range(2):  # away from init: a tensor left at its initial value would show
        total, _ = rec.loss(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
    rec.eval()
    export = save_export(rec, tmp_path / "export")
    out = save_hf_backbone(export)
    assert out == export / BACKBONE_DIR
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaModel"]
    inputs, expected = backbone_call(rec, batch)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp_path / "inputs.safetensors"))

    # A fresh interpreter, isolated (-I: no cwd, no PYTHONPATH on sys.path), outside the repo.
    snippet = f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import LlamaModel
        torch.set_num_threads(1)
        model, info = LlamaModel.from_pretrained({str(out)!r}, output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched weights
        assert not model.training and model.dtype == torch.float32
        inputs = load_file({str(tmp_path / "inputs.safetensors")!r})
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        save_file({{"hidden": hidden}}, {str(tmp_path / "hidden.safetensors")!r})
        mine = {{name.split(".")[0] for name in sys.modules}} & {{"rec", "rl", "serve", "jobs"}}
        assert not mine, mine  # nothing of the project was imported
    """
    subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(snippet)],
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    hidden = load_file(str(tmp_path / "hidden.safetensors"))["hidden"]
    mask = inputs["attention_mask"].bool()  # padding positions hold junk in both
    torch.testing.assert_close(hidden[mask], expected[mask], rtol=1e-5, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fp32_master_weights_under_bf16(tmp_path):
    """A bf16 DeepSpeed engine on CPU (one rank, gloo), ZeRO-2 and ZeRO-3: the weights the
    checkpoint exports equal DeepSpeed's fp32 master weights as its own zero_to_fp32 reads them
    from the checkpoint -- not the bf16 module parameters, which differ after a few steps."""
    snippet = f"""
        import torch
        import torch.distributed as dist
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from rec.deepspeed_setup import deepspeed_engine, fp32_state_dict, full_parameters
        from rec.train_config import DeepSpeedConfig, TrainConfig
        from tests.test_model import make_batch, random_sequences, tiny_recommender
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)
        batch = make_batch(random_sequences(8, seed=1), max_len=16)
        for stage in (2, 3):
            ds = DeepSpeedConfig(zero_stage=stage, precision="bf16", param_persistence_threshold=0)
            cfg = TrainConfig(num_workers=1, batch_size=8, lr=0.01, warmup_steps=1, deepspeed=ds)
            engine = deepspeed_engine(tiny_recommender(seed=stage), cfg, steps_per_epoch=4)
            for _ in range(3):
                loss, _ = engine(batch)
                engine.backward(loss)
                engine.step()
            weights = fp32_state_dict(engine, stage, keep=True)
            with full_parameters(engine, stage):
                module = {{n: p.detach().clone() for n, p in engine.module.named_parameters()}}
            path = "{tmp_path}/ds" + str(stage)
            engine.save_checkpoint(path, tag="ds")
            master = get_fp32_state_dict_from_zero_checkpoint(path, tag="ds")
            assert master and set(master) <= set(weights), set(master) ^ set(weights)
            for name, value in master.items():
                assert torch.equal(weights[name], value), (stage, name)
            params = [n for n in master if n in module]
            assert len(params) == len(module) and len(master) == len(module) + 1
            for name in params:
                assert weights[name].dtype == torch.float32, name
                assert module[name].dtype == torch.bfloat16, name
            rounded = [n for n in params if torch.equal(weights[n], module[n].float())]
            assert len(rounded) < len(params) / 2, (stage, rounded)  # not the bf16 copies
            assert torch.equal(weights["model.item_categories"],
                               engine.module.model.item_categories.cpu())
            print("stage", stage, "ok", flush=True)
        dist.destroy_process_group()
    """
    env = os.environ | {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
        **{"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"},  # what a launcher would set
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(snippet)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stage 2 ok" in proc.stdout and "stage 3 ok" in proc.stdout, proc.stdout[-2000:]


def test_no_backbone_for_a_layer_transformers_lacks(tmp_path):
    """A decoder with the frequency mix (rec/layers.py) is not a plain Llama: writing it as one
    would load in transformers and silently compute something else, so it is refused."""
    import pytest

    export = save_export(tiny_recommender(seed=1, freq_mix=0.5), tmp_path / "export")
    with pytest.raises(ValueError, match="freq_mix"):
        save_hf_backbone(export)
    assert not (export / BACKBONE_DIR).exists()
