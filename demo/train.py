"""`unclip-train`: train the demo model, every stage, into a diffusers-layout model folder.

    unclip-train --out demo/model                 # the shipped model: about 2 h 45 min on a 2-core CPU
    unclip-train --out /tmp/m --config smoke      # every stage in seconds

Stages run in order (clip, prior, decoder, sr256, sr1024); each writes its finished component folders (fp16)
into OUT, where the later stages read them, so a finished stage is never trained again and OUT is all that
must be kept (it is small: commit it). The running stage checkpoints its full state (weights, EMA, optimiser,
data generators) into the checkpoint folder every few minutes; a stopped run continues from there with the same
command. Ctrl-C checkpoints the running stage as of its last finished step and says so: the same command
continues it. With the same seed, config and thread count, training gives the same weights, resumed or not.

Every option and OUT itself are checked before anything is written: OUT must be new, empty or a model folder of
this tool (its training.json; an interrupted run's too), and a stage's earlier stages must be trained (or in the run).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from unclip.core.console import warnings_to_stderr
from unclip.core.errors import UnclipError, one_line
from unclip.demo import stages as st
from unclip.demo.config import CONFIGS, GENERATION, DemoConfig, Schedule

STATE = "training.json"  # in the model folder: config, seed, and each finished stage's figures
MAX_SEED = (2 ** 64 - len(st.STAGES)) // 1000  # stage i seeds torch with seed * 1000 + i, which must fit 64 bits
MAX_THREADS = 1024


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: the stage, its last finished step, and the checkpoint that holds that step (None when
    no step had finished)."""

    def __init__(self, stage: str, step: int, total: int, ckpt: Path | None):
        super().__init__(f"{stage} stopped at step {step}/{total}")
        self.stage, self.step, self.total, self.ckpt = stage, step, total, ckpt


def _stderr(message: str, nl: bool = True) -> None:
    click.echo(message, err=True, nl=nl)


class Progress:
    """One status line on stderr: stage, step, smoothed loss, speed, time left (a line every 5% when not a TTY)."""

    def __init__(self, stage: str, total: int, echo=None):
        self.stage, self.total, self.echo = stage, total, echo or _stderr
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


@dataclass
class _Loop:
    """A stage's progress as of its last finished step: what a checkpoint holds besides the networks and optimiser."""
    step: int
    rng: dict  # the data generators' states after `step`
    gen: torch.Tensor
    spans: list  # [first step, precision] of each stretch (a run resumed in another precision adds one)
    history: list = field(default_factory=list)
    before: float | None = None  # the held-out loss before training
    t_start: float = 0.0  # perf_counter at step 0, less time spent in earlier runs
    saved: int = 0  # the step the checkpoint on disk holds (at step 0 there is nothing to keep)

    def finish(self, step: int, value: float, ctx: st.Context) -> None:
        self.step = step
        self.history.append(value)
        self.rng, self.gen = ctx.rng.bit_generator.state, ctx.gen.get_state()


@contextlib.contextmanager
def _held_interrupt():
    """Hold a Ctrl-C (SIGINT) or a `kill` (SIGTERM) back until the block is done, then deliver it: the block's updates
    happen whole."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread takes signals
        return
    # None: a handler not set from Python, which can't be put back
    previous = {s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not None}
    caught: list = []
    for s in previous:
        signal.signal(s, lambda *args: caught.append(args))
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if caught and previous[caught[0][0]] is not signal.SIG_IGN:
        signum, handler = caught[0][0], previous[caught[0][0]]
        if callable(handler):
            handler(*caught[0])  # Python's default SIGINT handler raises KeyboardInterrupt; main's SIGTERM one too
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            os.kill(os.getpid(), signum)  # the default action, now that the step is whole


def _stop(signum, frame):
    raise KeyboardInterrupt


def _checkpoint(stage: st.Stage, ema: dict, opt: torch.optim.Optimizer, loop: _Loop) -> dict:
    return {"step": loop.step, "seconds": time.perf_counter() - loop.t_start, "history": list(loop.history),
            "modules": {k: m.state_dict() for k, m in stage.modules.items()},
            "ema": {k: m.state_dict() for k, m in ema.items()},
            "extra": {k: p.detach() for k, p in stage.extra.items()},
            "opt": opt.state_dict(), "rng": loop.rng, "gen": loop.gen, "loss_before": loop.before,
            "precision_spans": loop.spans}


def _resume(stage: st.Stage, ctx: st.Context, ckpt: Path, ema: dict, opt: torch.optim.Optimizer) -> _Loop:
    """The stage's progress: from its checkpoint (networks, EMA, optimiser and generators loaded), or step 0."""
    precision = "bf16" if ctx.bf16 else "fp32"
    if not ckpt.is_file():
        return _Loop(0, ctx.rng.bit_generator.state, ctx.gen.get_state(), [[0, precision]])
    state = torch.load(ckpt, map_location=ctx.device, weights_only=False)
    for k, m in stage.modules.items():
        m.load_state_dict(state["modules"][k])
        ema[k].load_state_dict(state["ema"][k])
    for k, p in stage.extra.items():
        p.data.copy_(state["extra"][k])
    opt.load_state_dict(state["opt"])
    ctx.rng.bit_generator.state = state["rng"]
    ctx.gen.set_state(state["gen"])
    spans = state.get("precision_spans", [[0, "bf16"]])  # checkpoints before the option: bf16 autocast
    start = state["step"]
    if spans[-1][1] != precision and start < getattr(ctx.cfg, stage.name).steps:
        spans.append([start, precision])
    return _Loop(start, state["rng"], state["gen"], spans, state["history"], state.get("loss_before"),
                 time.perf_counter() - state["seconds"], saved=start)


def train_stage(stage: st.Stage, ctx: st.Context, ckpt: Path, echo=None, checkpoint_seconds: float = 300) -> dict:
    """Optimise one stage to its schedule, resuming from `ckpt` when it holds this stage's state; returns its
    figures (steps, seconds, final loss, evaluation). Ctrl-C (KeyboardInterrupt) checkpoints the stage as of its last
    finished step and raises Interrupted."""
    cfg: DemoConfig = ctx.cfg
    sch: Schedule = getattr(cfg, stage.name)
    params = [p for m in stage.modules.values() for p in m.parameters()] + list(stage.extra.values())
    opt = torch.optim.AdamW(params, lr=sch.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in stage.modules.items()}
    loop = _resume(stage, ctx, ckpt, ema, opt)
    progress = Progress(stage.name, sch.steps, echo)
    try:
        if loop.before is None:
            loop.before = held_out_loss(stage, ctx)
        if not loop.step:
            loop.t_start = time.perf_counter()
        if loop.step:
            spans, start = loop.spans, loop.step
            progress.message(f"resuming at step {start}" + (f" in {spans[-1][1]} (before: {_spans(spans[:-1])})"
                                                            if spans[-1][0] == start and len(spans) > 1 else ""))
        _steps(stage, ctx, (opt, ema, params), loop, (ckpt, checkpoint_seconds, progress))
        seconds = time.perf_counter() - loop.t_start
        after = held_out_loss(stage, ctx, ema)
        with torch.no_grad():
            figures = stage.evaluate(_eval(ema))
        progress.message(f"done in {seconds / 60:.1f} min: held-out loss {loop.before:.4f} -> {after:.4f}; {figures}")
        stage.save(ema)
    except KeyboardInterrupt:
        if loop.step > loop.saved:  # the state as of the last finished step (a step is rolled back or done whole)
            with _held_interrupt():  # a second Ctrl-C waits for this save
                _save_checkpoint(ckpt, _checkpoint(stage, ema, opt, loop))
        raise Interrupted(stage.name, loop.step, sch.steps, ckpt if ckpt.is_file() else None) from None
    return {"steps": sch.steps, "batch": sch.batch, "seconds": round(seconds, 1), "loss_before": loop.before,
            "loss_after": after, "eval": figures, "precision": _spans(loop.spans)}


def _steps(stage: st.Stage, ctx: st.Context, optim: tuple, loop: _Loop, saving: tuple) -> None:
    """The training steps from loop.step on. optim: (optimiser, EMA modules, parameters); saving: (checkpoint path,
    seconds between checkpoints, Progress). A step's updates (optimiser, EMA, the generators' recorded states) happen
    whole even under Ctrl-C; one stopped before them leaves `loop` at the last finished step."""
    opt, ema, params = optim
    ckpt, every, progress = saving
    sch: Schedule = getattr(ctx.cfg, stage.name)
    last_save = time.perf_counter()
    for m in stage.modules.values():
        m.train()
    for step in range(loop.step, sch.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(sch, step)
        loss, value = stage.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        with _held_interrupt():
            opt.step()
            decay = min(ctx.cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, m in stage.modules.items():
                    for pe, p in zip(ema[k].parameters(), m.parameters()):
                        pe.lerp_(p, 1 - decay)
            loop.finish(step + 1, value, ctx)
        done = loop.step
        if time.perf_counter() - last_save > every or done == sch.steps:
            _save_checkpoint(ckpt, _checkpoint(stage, ema, opt, loop))
            loop.saved, last_save = done, time.perf_counter()
        progress.update(done, value)
        if sch.eval_every and done % sch.eval_every == 0 and done < sch.steps:
            with torch.no_grad():
                progress.message(f"step {done}: {stage.evaluate(_eval(ema))}")


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
    """OUT's training record (training.json), or a new one where OUT is new or empty; refuses a file, a folder of
    other files (never written over) and a record of another config or seed."""
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out} is a file; choose a new or empty folder for the model")
    path = out / STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
            raise click.ClickException(f"{path} is not a training record of unclip-train; choose an empty or new "
                                       "--out")
        if state.get("config") != json.loads(json.dumps(cfg.to_dict())) or state.get("seed") != seed:
            raise click.ClickException(f"{out} holds a model trained with another config or seed; choose another "
                                       "--out, or pass the same --config and --seed to continue it")
        return state
    # an interrupted first run leaves training.json first, so without it only its temporary file can be ours
    # (dot-files: a .git, .DS_Store or save_component's temporary folders; never written over)
    theirs = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != STATE + ".tmp") \
        if out.is_dir() else []
    if theirs:
        raise click.ClickException(f"--out {out} is a folder of other files ({', '.join(theirs[:3])}"
                                   f"{', ...' if len(theirs) > 3 else ''}), not a model folder of unclip-train; "
                                   "choose an empty or new --out")
    return {"config_name": cfg_name, "config": cfg.to_dict(), "seed": seed, "stages": {}}


def _check_checkpoints(ckpt_dir: Path, given: bool, fresh: bool) -> None:
    """The checkpoint folder must be a folder; for a new model folder, it must hold no stage's checkpoint (one of an
    earlier run whose model folder is gone: continuing it would mix two runs)."""
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise click.ClickException(f"--checkpoints {ckpt_dir} is a file; give a folder (it is created if missing)"
                                   if given else f"{ckpt_dir} (the checkpoint folder next to --out) is a file; move "
                                   "it away or pass --checkpoints FOLDER")
    stale = [ckpt_dir / f"{s}.pt" for s in st.STAGES if (ckpt_dir / f"{s}.pt").is_file()] if fresh else []
    if stale:
        raise click.ClickException(f"{stale[0]} is a checkpoint of an earlier run, but --out holds no training to "
                                   f"continue; delete {ckpt_dir} to start afresh, or pass another --checkpoints")


def _check_prerequisites(out: Path, state: dict, only: tuple[str, ...], command: str) -> None:
    """Every stage this run trains must find the stages it reads trained in OUT, or trained before it in this run."""
    todo = [s for s in st.STAGES if s not in state["stages"] and (not only or s in only)]
    for name in todo:
        for need in st.NEEDS.get(name, ()):
            if need in todo:
                continue
            if need not in state["stages"]:
                raise click.ClickException(f"--stage {name} reads the {need} stage, which {out} does not have yet: "
                                           f"train {need} first ({command} --stage {need}), or every stage "
                                           f"({command})")
            missing = [f for f in st.FOLDERS[need] if not (out / f).is_dir()]
            if missing:
                raise click.ClickException(f"{out}/{missing[0]} is missing, though {STATE} records the {need} "
                                           f"stage as trained; put the folder back, or train into a new --out")


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise click.ClickException(f"--device {device}: choose cpu, cuda or cuda:N (training runs on the CPU or a "
                                   "CUDA GPU)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise click.ClickException(f"--device {device}: torch sees {n} CUDA GPU{'s' if n > 1 else ''} here; choose "
                                   f"{' or '.join(f'cuda:{i}' for i in range(min(n, 4)))}{' ...' if n > 4 else ''}")
    return dev


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise click.ClickException(f"--seed must be an integer in 0 ... {MAX_SEED}, got {seed}")


def _make_folders(folders: list[tuple[Path, str]]) -> list[Path]:
    """Create the folders (each with the option that named it, for the error); returns those that were new. A
    failure removes the ones made here."""
    made: list[Path] = []
    for folder, flag in folders:
        if folder.is_dir():
            continue
        top = folder  # the highest folder this makes (mkdir makes missing parents too): what an undo removes
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            for m in reversed(made):
                shutil.rmtree(m, ignore_errors=True)
            raise click.ClickException(f"{flag} {folder}: the folder can't be created ({e.strerror or e}); choose "
                                       "another") from None
        made.append(top)
    return made


def _undo_start(out: Path, ckpt_dir: Path, made: list[Path]) -> None:
    """Take back what a run that kept nothing (no stage finished, no checkpoint) wrote: the folders it made, or in
    an --out that was empty, its files (a later run with another --config or --seed would be refused by them)."""
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)
    if out.is_dir():  # training.json last: a run stopped during this undo still reads as its own start
        for p in sorted(out.iterdir(), key=lambda p: p.name == STATE):
            if p.is_dir() and not p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
            elif not p.name.startswith("."):
                p.unlink(missing_ok=True)


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
    `precision` (auto, bf16 or fp32: training_precision). Every argument, `out` and the stages' prerequisites are
    checked (click.ClickException) before anything is written; Ctrl-C raises Interrupted after checkpointing."""
    from unclip.models.io import load_model, write_pipeline_files
    if config not in CONFIGS:
        raise click.ClickException(f"--config {config}: choose {' or '.join(CONFIGS)}")
    if not str(out).strip():
        raise click.ClickException("--out needs a folder name (it got an empty one); pass --out DIR")
    cfg, out, echo = CONFIGS[config], Path(out), echo or _stderr
    _check_seed(seed)
    dev = _check_device(device)
    amp = training_precision(precision, dev)
    named = out if out.name not in ("", "..") else Path(os.path.abspath(out))  # --out . names the folder too
    ckpt_dir = Path(checkpoints.folder) if checkpoints.folder else named.with_name(named.name + ".ckpt")
    state = _read_state(out, config, cfg, seed)
    fresh = not (out / STATE).is_file()
    _check_checkpoints(ckpt_dir, checkpoints.folder is not None, fresh)
    _check_prerequisites(out, state, only, "unclip-train --out " + shlex.quote(str(out))
                         + (f" --config {config}" if config != "demo" else "") + (f" --seed {seed}" if seed else ""))
    made = _make_folders([(out, "--out"), (ckpt_dir, "--checkpoints")])
    _announce(echo, precision, amp, dev)
    try:
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
    except BaseException:
        if fresh and not state["stages"] and not any((ckpt_dir / f"{s}.pt").is_file() for s in st.STAGES):
            _undo_start(out, ckpt_dir, made)
        raise
    if all(s in state["stages"] for s in st.STAGES):
        load_model(out)  # the finished folder must load
    return out


def _announce(echo, precision: str, amp: str, dev: torch.device) -> None:
    from unclip.engine.backend_torch import native_bf16
    if precision == "bf16" and dev.type == "cpu" and not native_bf16():
        echo("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): torch emulates it, several times slower "
             "than fp32; --precision auto or fp32 trains faster here", True)
    echo(f"training in {'bf16 autocast' if amp == 'bf16' else 'fp32'} on {dev}", True)


def _interrupted(e: KeyboardInterrupt, out: str) -> str:
    """The line Ctrl-C prints: where training stopped and how to continue."""
    if isinstance(e, Interrupted) and e.ckpt is not None:
        return (f"interrupted: {e.stage} stopped at step {e.step}/{e.total}, checkpointed in {e.ckpt}; run the same "
                "command to continue from there")
    if isinstance(e, Interrupted):
        return (f"interrupted before {e.stage}'s first step finished, so there was nothing of it to keep; run the "
                "same command to start it again")
    if not (Path(out) / STATE).is_file():
        return "interrupted before training started; nothing was kept: run the same command to start"
    return f"interrupted; the finished stages are kept in {out}: run the same command to continue"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", required=True, help="model folder to write (and to continue, if it holds a stopped run)")
@click.option("--config", type=click.Choice(list(CONFIGS)), default="demo")
@click.option("--seed", type=int, default=0)
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N")
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
    if not 0 <= threads <= MAX_THREADS:
        raise click.ClickException(f"--threads must be in 0 ... {MAX_THREADS} (0: torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)
    main_thread = threading.current_thread() is threading.main_thread()
    term = signal.signal(signal.SIGTERM, _stop) if main_thread else None  # `kill` stops as Ctrl-C does: checkpointed
    try:
        path = train(out, config, seed, device, precision, tuple(only), checkpoints=Checkpoints(checkpoints))
    except KeyboardInterrupt as e:
        click.echo(("\n" if sys.stderr.isatty() else "") + _interrupted(e, out), err=True)
        sys.exit(130)
    except (UnclipError, PermissionError) as e:  # PermissionError: a folder this user may not write
        raise click.ClickException(one_line(e)) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, term if term is not None else signal.SIG_DFL)
    click.echo(str(path))


if __name__ == "__main__":
    main()
