"""`unclip-run "PROMPT"`: parse options, call unclip.engine.api.run, print the PNG paths."""
from __future__ import annotations

import logging
import sys

import click

from unclip.engine.api import BACKENDS, PRESET_NOTE, UserError, run
from unclip.engine.pipeline import SIZES, Settings
from unclip.engine.samplers import SAMPLERS

D = Settings()


class _Progress:
    """One line per stage on stderr: 'decoder  12/25'."""

    def __init__(self):
        self.stage = None

    def __call__(self, stage: str, i: int, n: int) -> None:
        end = "\n" if i == n else ""
        click.echo(f"\r{stage:<8} {i:>3}/{n}", nl=False, err=True)
        if end:
            click.echo("", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("prompt", required=False, default=None)
@click.option("--model", default="small", help="model folder (diffusers layout, e.g. Karlo) or preset: tiny, small")
@click.option("--engines", default=None, help="export folder [default: engines/<model>-<precision>]")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime")
@click.option("--device", default="cpu", help="cpu or cuda[:N]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32")
@click.option("--seed", type=int, default=D.seed)
@click.option("--num-images", type=int, default=D.num_images)
@click.option("--size", type=int, default=D.size, help="stop after the stage of this size: 64, 256 or 1024")
@click.option("--prior-steps", type=int, default=D.prior_steps)
@click.option("--prior-guidance", type=float, default=D.prior_guidance)
@click.option("--decoder-steps", type=int, default=D.decoder_steps)
@click.option("--decoder-guidance", type=float, default=D.decoder_guidance)
@click.option("--sr256-steps", type=int, default=D.sr256_steps)
@click.option("--sr1024-steps", type=int, default=D.sr1024_steps)
@click.option("--sampler", type=click.Choice(SAMPLERS), default=D.sampler)
@click.option("--eta", type=float, default=D.eta, help="DDIM noise (0: deterministic)")
@click.option("--negative", default=D.negative, help="prompt of the unconditional guidance half")
@click.option("--prior-candidates", type=int, default=1,
              help="sample N image embeddings per image and keep the one closest to the text (paper: 2)")
@click.option("--variation", default=None, metavar="IMAGE", help="make variations of IMAGE (no prompt needed)")
@click.option("--invert", is_flag=True, help="with --variation: start from the DDIM inversion of IMAGE (use --eta > 0)")
@click.option("--interpolate", nargs=2, default=None, metavar="A B",
              help="blend two image embeddings; A and B are image paths or prompts")
@click.option("--text-diff", nargs=2, default=None, metavar="FROM TO",
              help="edit PROMPT's (or --variation IMAGE's) embedding toward TO and away from FROM")
@click.option("--amount", type=float, default=0.25, help="--text-diff strength theta in [0, 1]")
@click.option("--frames", type=int, default=None, help="frames of --interpolate (>= 2) or of a --text-diff sweep")
@click.option("--max-batch", type=int, default=4, help="images per engine call when exporting")
@click.option("--out", default="out", help="folder for the PNGs")
@click.option("--dump", default=None, help="folder for the intermediates (.npy) and dump.json")
def main(prompt, model, engines, backend, device, precision, seed, num_images, size, prior_steps, prior_guidance,
         decoder_steps, decoder_guidance, sr256_steps, sr1024_steps, sampler, eta, negative, prior_candidates,
         variation, invert, interpolate, text_diff, amount, frames, max_batch, out, dump):
    """Generate images of PROMPT with unCLIP (an empty PROMPT is unconditional), or vary, blend and edit images
    through their CLIP embeddings (--variation, --interpolate, --text-diff)."""
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s", stream=sys.stderr)
    try:
        (prompt or "").encode("utf-8")
    except UnicodeEncodeError:
        raise click.ClickException("PROMPT is not valid UTF-8 text; pass the prompt in UTF-8") from None
    if size not in SIZES:
        raise click.ClickException(f"--size {size} is not one of {', '.join(map(str, SIZES))}")
    try:
        settings = Settings(seed=seed, num_images=num_images, size=size, prior_steps=prior_steps,
                            prior_guidance=prior_guidance, decoder_steps=decoder_steps,
                            decoder_guidance=decoder_guidance, sr256_steps=sr256_steps, sr1024_steps=sr1024_steps,
                            sampler=sampler, eta=eta, negative=negative)
    except ValueError as e:
        raise click.ClickException(f"--{e}") from None
    if model in ("tiny", "small"):
        click.echo(PRESET_NOTE.format(name=model), err=True)
    try:
        paths = run(prompt, model=model, backend=backend, engines=engines, device=device, precision=precision,
                    out=out, dump=dump, max_batch=max_batch, settings=settings, progress=_Progress(),
                    notify=lambda m: click.echo(m, err=True), variation=variation, invert=invert,
                    interpolate=tuple(interpolate) if interpolate else None,
                    text_diff=tuple(text_diff) if text_diff else None, amount=amount, frames=frames,
                    prior_candidates=prior_candidates)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    for p in paths:
        click.echo(str(p))


if __name__ == "__main__":
    main()
