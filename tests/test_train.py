"""The demo model's training (`unclip-train`) on the `smoke` config: every stage learns, the folder loads here and
in diffusers, and training is deterministic for a seed, also when stopped and resumed."""
from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch
from faults import interrupt_training
from safetensors.torch import load_file
from unclip.demo import stages as st
from unclip.demo import train as tr
from unclip.engine.backend_torch import native_bf16
from unclip.models import load_model


def _quiet(*_):
    pass


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke training of every stage, and the warnings it logged."""
    log, records = logging.getLogger("unclip"), _Records()
    log.addHandler(records)
    try:
        return tr.train(tmp_path_factory.mktemp("t") / "m", "smoke", seed=0, echo=_quiet), records.messages
    finally:
        log.removeHandler(records)


@pytest.fixture(scope="module")
def smoke(smoke_run):
    return smoke_run[0]


def test_the_text_context_holds_every_caption_of_the_world(smoke_run):
    """Each config's tokenizer reads the world's longest captions whole (the synthetic BPE spells some words in
    pieces: 29 tokens for 15 words), so training never cuts, nor warns about, its own captions."""
    from unclip.demo import world
    from unclip.demo.config import CONFIGS
    captions = {world.caption(world.Scene(bg, c, shape, size, pos, 0.3, 0.5, 0.5), full=True)
                for c in world.COLOURS for bg in world.COLOURS if bg != c for shape in world.SHAPES
                for size in world.SIZES for pos in world.POSITIONS if size == "small" or pos == "center"}
    for name, cfg in CONFIGS.items():
        tok = cfg.tokenizer()
        longest = max(len(tok._tok.encode(c).ids) for c in captions)
        assert longest <= cfg.text_len, (name, longest, cfg.text_len)
        ids, mask = tok(max(captions, key=lambda c: len(tok._tok.encode(c).ids)))
        assert ids[0, int(mask.sum()) - 1] == tok.eos_id
    assert not [m for m in smoke_run[1] if "tokens long" in m], smoke_run[1][:3]


def test_every_stage_learns_and_the_folder_loads(smoke):
    state = json.loads((smoke / "training.json").read_text())
    assert list(state["stages"]) == list(st.STAGES)
    for name, figures in state["stages"].items():
        # the same fixed held-out batches before and after training
        assert figures["loss_after"] < figures["loss_before"], (name, figures)
        assert figures["precision"] == ("bf16" if native_bf16() else "fp32"), figures  # auto, on this CPU
    model = load_model(smoke)
    assert model.decoder.config.sample_size == 32 and model.sr1024.config.sample_size == 512
    assert model.prior.clip_std.abs().min() > 0  # the normalisation statistics came from the data
    assert all(v.dtype == torch.float16 for v in load_file(smoke / "decoder" / "diffusion_pytorch_model.safetensors")
               .values())
    assert torch.equal(model.sr256_first.conv_in.weight, model.sr256_last.conv_in.weight)  # one network, both steps


def test_diffusers_reads_the_stages_it_has(smoke):
    pytest.importorskip("diffusers")
    from diffusers import UnCLIPPipeline
    from refs import text_proj_class
    text_proj_class()
    pipe = UnCLIPPipeline.from_pretrained(str(smoke), torch_dtype=torch.float32)  # the folder holds fp16 weights
    pipe.set_progress_bar_config(disable=True)
    assert pipe.decoder_scheduler.config.prediction_type == "sample"
    out = pipe("a red circle", prior_num_inference_steps=2, decoder_num_inference_steps=2,
               super_res_num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 128, 128, 3)


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*/*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def test_deterministic_and_resumable(tmp_path, monkeypatch):
    """Two runs give the same weights, and so does a run stopped by Ctrl-C twice and continued with the same command
    each time: once by a real SIGINT arriving during clip's 11th optimiser step (held back until the step is done),
    once inside the prior's 18th step (before its updates: rolled back). No periodic checkpoint is due in either (5
    minutes): Ctrl-C itself checkpoints."""
    only = ("clip", "prior")
    a = tr.train(tmp_path / "a", "smoke", seed=1, only=only, echo=_quiet)
    b = tr.train(tmp_path / "b", "smoke", seed=1, only=only, echo=_quiet)
    from torch.optim.optimizer import register_optimizer_step_post_hook
    steps: list[int] = []

    def sigint_on_the_11th_step(*_):
        steps.append(1)
        if len(steps) == 11:
            os.kill(os.getpid(), signal.SIGINT)

    hook = register_optimizer_step_post_hook(sigint_on_the_11th_step)
    # Python's own Ctrl-C handler, whatever started pytest (a background job of a script starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(tr.Interrupted) as stop:
            tr.train(tmp_path / "c", "smoke", seed=1, only=only, echo=_quiet)
    finally:
        hook.remove()
        signal.signal(signal.SIGINT, previous)
    assert (stop.value.stage, stop.value.step, stop.value.ckpt) == ("clip", 11, tmp_path / "c.ckpt" / "clip.pt")
    assert torch.load(stop.value.ckpt, weights_only=False)["step"] == 11
    lines: list[str] = []
    interrupt_training(monkeypatch, "prior", 18)
    with pytest.raises(tr.Interrupted) as stop:
        tr.train(tmp_path / "c", "smoke", seed=1, only=only, echo=lambda m, nl=True: lines.append(m))
    assert any("resuming at step 11" in line and line.startswith("clip") for line in lines), lines
    assert (stop.value.stage, stop.value.step) == ("prior", 17) and stop.value.ckpt.is_file()
    assert (tmp_path / "c" / "text_encoder").is_dir() and not (tmp_path / "c" / "prior").exists()
    monkeypatch.undo()
    lines.clear()
    c = tr.train(tmp_path / "c", "smoke", seed=1, only=only, echo=lambda m, nl=True: lines.append(m))
    assert any("resuming at step 17" in line and line.startswith("prior") for line in lines), lines
    assert not list((tmp_path / "c.ckpt").iterdir())  # each finished stage's checkpoint is removed
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() == wc.keys() and any(k.startswith("prior/") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]), k
    d = tr.train(tmp_path / "d", "smoke", seed=2, only=("clip",), echo=_quiet)
    assert not torch.equal(_weights(d)["text_encoder/text_model.final_layer_norm.weight"],
                           wa["text_encoder/text_model.final_layer_norm.weight"])


def test_training_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    """auto: bf16 autocast on a CPU with native bf16, fp32 on one without (emulated bf16 is several times slower);
    an explicit choice is kept; the stages' forward passes compute in the chosen precision."""
    import numpy as np
    from unclip.demo.config import CONFIGS
    from unclip.engine import backend_torch
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(backend_torch, "native_bf16", lambda native=native: native)
        assert tr.training_precision("auto", cpu) == expected
        assert tr.training_precision("bf16", cpu) == "bf16" and tr.training_precision("fp32", cpu) == "fp32"
    for capability, expected in (((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):  # V100, A100, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert tr.training_precision("auto", torch.device("cuda")) == expected
    with pytest.raises(ValueError, match="choose auto, bf16 or fp32"):
        tr.training_precision("fp16", cpu)
    x = torch.randn(4, 8)
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        ctx = st.Context(CONFIGS["smoke"], None, cpu, np.random.default_rng(0), torch.Generator(), bf16=bf16)
        with ctx.autocast():
            assert (x @ x.T).dtype == dtype


def test_a_stage_resumed_in_another_precision_records_both(tmp_path, monkeypatch):
    real_update = tr.Progress.update
    stopped: list[int] = []

    def stop_once(self, step, loss):  # Ctrl-C after clip's step 12 was checkpointed
        if step == 12 and not stopped:
            stopped.append(step)
            raise KeyboardInterrupt
        real_update(self, step, loss)

    monkeypatch.setattr(tr.Progress, "update", stop_once)
    with pytest.raises(KeyboardInterrupt):
        tr.train(tmp_path / "m", "smoke", seed=0, precision="fp32", only=("clip",), echo=_quiet,
                 checkpoints=tr.Checkpoints(seconds=0))
    lines: list[str] = []
    tr.train(tmp_path / "m", "smoke", seed=0, only=("clip",), echo=lambda m, nl=True: lines.append(m), precision="bf16")
    state = json.loads((tmp_path / "m" / "training.json").read_text())
    assert state["stages"]["clip"]["precision"] == "fp32 from step 0, bf16 from step 12"
    assert any("resuming at step 12 in bf16 (before: fp32)" in line for line in lines), lines


def test_upsampler_crops_reach_the_image_border():
    """The pipeline upsamples whole images, so the upsamplers must also train on crops that touch the border (where
    the convolutions' zero padding is): each side gets about edge_crop / 2 of the crops, none without it."""
    import numpy as np
    from unclip.demo import data, world
    rng = np.random.default_rng(0)
    size, crop, n = 512, 128, 4000
    for edge_crop, low, high in ((0.0, 0.0, 0.01), (0.3, 0.12, 0.19)):
        xs, ys = zip(*(data.crop_origin(rng, world.sample_scene(rng), size, crop, edge_crop) for _ in range(n)))
        xs, ys = np.array(xs), np.array(ys)
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= size - crop and ys.max() <= size - crop
        for side in (xs == 0, xs == size - crop, ys == 0, ys == size - crop):
            assert low <= side.mean() <= high, (edge_crop, side.mean())
