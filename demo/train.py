"""`unclip-train`: train the demo model, every stage, into a diffusers-layout model folder.

    unclip-train --out demo/model                 # the shipped model: about 2 h 45 min on a 2-core CPU
    unclip-train --out /tmp/m --config smoke      # every stage in seconds

Stages run in order (clip, prior, decoder, sr256, sr1024); each writes its finished component folders (fp16)
into OUT, where the later stages read them, so a finished stage is never trained again and OUT is all that
must be kept (it is small: commit it). The running stage checkpoints its full state (weights, EMA, optimiser,
data generators) into the checkpoint folder every few minutes; a stopped run continues from there with the same
command. With the same seed, config and thread count, training gives the same weights, resumed or not.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from unclip.core.console import warnings_to_stderr
from unclip.demo import stages as st
from unclip.demo.config import CONFIGS, GENERATION, DemoConfig, Schedule

STATE = "training.json"  # in the model folder: config, seed, and each finished stage's figures


class Progress:
    """One status line on stderr: stage, step, smoothed loss, speed, time left (a line every 5% when not a TTY)."""

    def __init__(self, stage: str, total: int, echo=None):
        self.stage, self.total, self.echo = stage, total, echo or (lambda m, nl: click.echo(m, err=True, nl=nl))
        self.tty = sys.stderr.isatty()
        self.avg, self.t0, self.first, self.last_line = None, time.perf_counter(), None, -1

    def update(self, step: int, loss: float) -> None:
        self.avg = loss if self.avg is None else 0.98 * self.avg + 0.02 * loss
        if self.first is None:
            self.first, self.t0 = step, time.perf_counter()
            return
        rate = (time.perf_counter() - self.t0) / (step - self.first)
        left = rate * (self.total - step)
        line = (f"{self.stage:<8} {step:>6}/{self.total} loss {self.avg:.4f}  {rate:.2f} s/step  "
                f"{int(left // 60)}m{int(left % 60):02d}s left")
        if self.tty:
            self.echo("\r" + line, False)
        elif step * 20 // self.total != self.last_line:
            self.last_line = step * 20 // self.total
            self.echo(line, True)

    def message(self, text: str) -> None:
        self.echo(("\n" if self.tty else "") + f"{self.stage:<8} {text}", True)


def _lr(s: Schedule, step: int) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_stage(stage: st.Stage, ctx: st.Context, ckpt: Path, echo=None, checkpoint_seconds: float = 300) -> dict:
    """Optimise one stage to its schedule, resuming from `ckpt` when it holds this stage's state; returns its
    figures (steps, seconds, final loss, evaluation)."""
    cfg: DemoConfig = ctx.cfg
    sch: Schedule = getattr(cfg, stage.name)
    params = [p for m in stage.modules.values() for p in m.parameters()] + list(stage.extra.values())
    opt = torch.optim.AdamW(params, lr=sch.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in stage.modules.items()}
    start, seconds, history, before = 0, 0.0, [], None
    precision = "bf16" if ctx.bf16 else "fp32"
    spans = [[0, precision]]  # [first step, precision] of each stretch (a run resumed in another precision adds one)
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=ctx.device, weights_only=False)
        for k, m in stage.modules.items():
            m.load_state_dict(state["modules"][k])
            ema[k].load_state_dict(state["ema"][k])
        for k, p in stage.extra.items():
            p.data.copy_(state["extra"][k])
        opt.load_state_dict(state["opt"])
        ctx.rng.bit_generator.state = state["rng"]
        ctx.gen.set_state(state["gen"])
        start, seconds, history, before = state["step"], state["seconds"], state["history"], state.get("loss_before")
        spans = state.get("precision_spans", [[0, "bf16"]])  # checkpoints before the option: bf16 autocast
        if spans[-1][1] != precision and start < sch.steps:
            spans.append([start, precision])
    if before is None:
        before = held_out_loss(stage, ctx)
    progress = Progress(stage.name, sch.steps, echo)
    if start:
        progress.message(f"resuming at step {start}" + (f" in {precision} (before: {_spans(spans[:-1])})"
                                                         if spans[-1][0] == start and len(spans) > 1 else ""))
    last_save, t_start = time.perf_counter(), time.perf_counter() - seconds
    for m in stage.modules.values():
        m.train()
    for step in range(start, sch.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(sch, step)
        loss, value = stage.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in stage.modules.items():
                for pe, p in zip(ema[k].parameters(), m.parameters()):
                    pe.lerp_(p, 1 - decay)
        history.append(value)
        done = step + 1
        if time.perf_counter() - last_save > checkpoint_seconds or done == sch.steps:
            _save_checkpoint(ckpt, {"step": done, "seconds": time.perf_counter() - t_start, "history": history,
                                    "modules": {k: m.state_dict() for k, m in stage.modules.items()},
                                    "ema": {k: m.state_dict() for k, m in ema.items()},
                                    "extra": {k: p.detach() for k, p in stage.extra.items()},
                                    "opt": opt.state_dict(), "rng": ctx.rng.bit_generator.state,
                                    "gen": ctx.gen.get_state(), "loss_before": before, "precision_spans": spans})
            last_save = time.perf_counter()
        progress.update(done, value)
        if sch.eval_every and done % sch.eval_every == 0 and done < sch.steps:
            with torch.no_grad():
                progress.message(f"step {done}: {stage.evaluate(_eval(ema))}")
    seconds = time.perf_counter() - t_start
    after = held_out_loss(stage, ctx, ema)
    with torch.no_grad():
        figures = stage.evaluate(_eval(ema))
    progress.message(f"done in {seconds / 60:.1f} min: held-out loss {before:.4f} -> {after:.4f}; {figures}")
    stage.save(ema)
    return {"steps": sch.steps, "batch": sch.batch, "seconds": round(seconds, 1), "loss_before": before,
            "loss_after": after, "eval": figures, "precision": _spans(spans)}


def _spans(spans: list) -> str:
    """'fp32', or 'bf16 from step 0, fp32 from step 1200' for a stage resumed in another precision."""
    return spans[0][1] if len(spans) == 1 else ", ".join(f"{p} from step {s}" for s, p in spans)


def held_out_loss(stage: st.Stage, ctx: st.Context, weights: dict | None = None, batches: int = 4) -> float:
    """The stage's loss on fixed batches (their own generators: the training stream is untouched), with the
    training weights or, given `weights`, those copied in for the measurement."""
    saved = {k: copy.deepcopy(m.state_dict()) for k, m in stage.modules.items()} if weights else None
    if weights:
        for k, m in stage.modules.items():
            m.load_state_dict(weights[k].state_dict())
    rng, gen = ctx.rng, ctx.gen
    ctx.rng, ctx.gen = np.random.default_rng(12345), torch.Generator().manual_seed(12345)
    try:
        with torch.no_grad():
            return float(np.mean([float(stage.loss()[0]) for _ in range(batches)]))
    finally:
        ctx.rng, ctx.gen = rng, gen
        if saved:
            for k, m in stage.modules.items():
                m.load_state_dict(saved[k])


def _eval(modules: dict) -> dict:
    return {k: m.eval() for k, m in modules.items()}


def _read_state(out: Path, cfg_name: str, cfg: DemoConfig, seed: int) -> dict:
    path = out / STATE
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("config") != json.loads(json.dumps(cfg.to_dict())) or state.get("seed") != seed:
            raise click.ClickException(f"{out} holds a model trained with another config or seed; choose another "
                                       "--out, or pass the same --config and --seed to continue it")
        return state
    return {"config_name": cfg_name, "config": cfg.to_dict(), "seed": seed, "stages": {}}


def _write_state(out: Path, state: dict) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, out / STATE)


def training_precision(precision: str, device: torch.device) -> str:
    """The forward passes' precision: bf16 autocast, or fp32. `auto` takes bf16 where the hardware computes it (a
    CUDA GPU of compute capability 8 or newer, a CPU with AVX512-BF16 or AMX) and fp32 elsewhere: a CPU without
    native bf16 emulates it several times slower than fp32 (an AVX2 CPU, 2026-11-27: a demo decoder step 32.6 s in
    bf16, 4.0 s in fp32)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"training precision {precision!r}: choose auto, bf16 or fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda":  # Ampere (compute capability 8) and newer compute bf16; older GPUs emulate it
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    from unclip.engine.backend_torch import native_bf16
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


@dataclass(frozen=True)
class Checkpoints:
    """Where a running stage is checkpointed (default: OUT.ckpt next to the model folder OUT) and how often."""
    folder: str | Path | None = None
    seconds: float = 300


def train(out: str | Path, config: str = "demo", seed: int = 0, device: str = "cpu", precision: str = "auto",
          only: tuple[str, ...] = (), echo=None, checkpoints: Checkpoints = Checkpoints()) -> Path:
    """Train (or continue training) every stage of `config` into the model folder `out`, the forward passes in
    `precision` (auto, bf16 or fp32: training_precision)."""
    from unclip.models.io import load_model, write_pipeline_files
    cfg = CONFIGS[config]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoints.folder) if checkpoints.folder else out.with_name(out.name + ".ckpt")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    amp = training_precision(precision, dev)
    state = _read_state(out, config, cfg, seed)
    _write_state(out, state)
    write_pipeline_files(out, cfg.tokenizer(), cfg.schedulers(), sr1024=True, defaults=GENERATION)
    for i, name in enumerate(st.STAGES):
        if name in state["stages"] or (only and name not in only):
            continue
        torch.manual_seed(seed * 1000 + i)  # the networks' default initialisers draw from the global generator
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        ctx = st.Context(cfg, out, dev, np.random.default_rng([seed, i]), gen, bf16=amp == "bf16")
        stage = st.build(name, ctx)
        state["stages"][name] = train_stage(stage, ctx, ckpt_dir / f"{name}.pt", echo, checkpoints.seconds)
        _write_state(out, state)
        (ckpt_dir / f"{name}.pt").unlink(missing_ok=True)
    if all(s in state["stages"] for s in st.STAGES):
        load_model(out)  # the finished folder must load
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", required=True, help="model folder to write (and to continue, if it holds a stopped run)")
@click.option("--config", type=click.Choice(list(CONFIGS)), default="demo")
@click.option("--seed", type=int, default=0)
@click.option("--device", default="cpu", help="cpu or cuda")
@click.option("--checkpoints", default=None, help="checkpoint folder [default: OUT.ckpt next to OUT]")
@click.option("--threads", type=int, default=0, help="CPU threads (0: torch's default); part of what fixes the result")
@click.option("--stage", "only", multiple=True, type=click.Choice(st.STAGES), help="train only these stages")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
              help="forward passes in bf16 autocast or fp32; auto: bf16 where the GPU or CPU computes it natively "
                   "(AVX512-BF16, AMX), else fp32 (emulated bf16 is several times slower); part of what fixes the "
                   "result")
def main(out, config, seed, device, checkpoints, threads, only, precision):
    """Train the demo model (the shapes world of WORLD.md) from scratch, every stage, into OUT."""
    warnings_to_stderr()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    amp = training_precision(precision, dev)
    from unclip.engine.backend_torch import native_bf16
    if precision == "bf16" and dev.type == "cpu" and not native_bf16():
        click.echo("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, several times "
                   "slower than fp32; --precision auto or fp32 trains faster here", err=True)
    click.echo(f"training in {'bf16 autocast' if amp == 'bf16' else 'fp32'} on {dev}", err=True)
    path = train(out, config, seed, device, precision, tuple(only), checkpoints=Checkpoints(checkpoints))
    click.echo(str(path))


if __name__ == "__main__":
    main()
