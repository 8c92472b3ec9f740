"""`unclip-run "PROMPT"`: parse options into a Request, call unclip.engine.api.run, print the PNG paths."""
from __future__ import annotations

import sys
from dataclasses import fields

import click
from unclip.core.console import warnings_to_stderr
from unclip.core.errors import UnclipError, one_line
from unclip.engine import samplers
from unclip.engine.api import run
from unclip.engine.backend import BACKENDS
from unclip.engine.pipeline import Settings
from unclip.engine.request import MAX_IMAGES, TORCH_MODES, Request, read_prompts

D = Settings()
RANDOM = "using the built-in '{}' preset: its weights are random, so images look like noise; the default model " \
         "'demo' is trained, and README.md 'Real Karlo weights' explains how to use Karlo's"


def _progress(stage: str, i: int, n: int) -> None:
    """One line per stage on stderr: 'decoder  12/25'."""
    click.echo(f"\r{stage:<8} {i:>3}/{n}", nl=i == n, err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("prompt", required=False, default=None)
@click.option("--model", default="demo", help="model folder (diffusers layout, e.g. Karlo), or built in: demo "
              "(trained on the shapes world), tiny, small (random weights)")
@click.option("--engines", default=None, help="export folder [default: engines/<model>-<precision>]")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              help="onnxruntime/tensorrt: fp32, fp16; openvino: fp32, bf16; torch: all")
@click.option("--seed", type=int, default=D.seed, help="image i uses seed + i")
@click.option("--num-images", type=int, default=D.num_images)
@click.option("--size", type=int, default=None, help="image side in pixels, one of the model's stage sizes "
              "(Karlo 64, 256; demo 32, 128, 512) [default: the model's largest]")
@click.option("--prior-steps", type=int, default=None, help="[default: the model's, else 25]")
@click.option("--prior-guidance", type=float, default=None, help="[default: the model's, else Karlo's 4]")
@click.option("--decoder-steps", type=int, default=None, help="[default: the model's, else 25]")
@click.option("--decoder-guidance", type=float, default=None, help="[default: the model's (demo 3), else 8]")
@click.option("--sr256-steps", type=int, default=None, help="[default: the model's, else 7]")
@click.option("--sr1024-steps", type=int, default=None, help="[default: the model's, else 15]")
@click.option("--sampler", type=click.Choice(samplers.CHOICES), default=D.sampler,
              help="ddpm (alias unclip) reproduces diffusers' UnCLIPScheduler")
@click.option("--eta", type=float, default=D.eta, help="DDIM noise (0: deterministic)")
@click.option("--negative", default=D.negative, help="prompt of the unconditional guidance half")
@click.option("--prior-candidates", type=int, default=1,
              help="sample N image embeddings per image and keep the one closest to the text (paper: 2)")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE",
              help="one prompt per line, one image each (image i uses seed + i); blank lines are skipped")
@click.option("--variation", default=None, metavar="IMAGE", help="make variations of IMAGE (no prompt needed)")
@click.option("--invert", is_flag=True, help="with --variation: start from the DDIM inversion of IMAGE (use --eta > 0)")
@click.option("--interpolate", nargs=2, default=None, metavar="A B",
              help="blend two image embeddings; A and B are image paths or prompts")
@click.option("--text-diff", nargs=2, default=None, metavar="FROM TO",
              help="edit PROMPT's (or --variation IMAGE's) embedding toward TO and away from FROM")
@click.option("--amount", type=float, default=0.25, help="--text-diff strength theta in [0, 1]")
@click.option("--frames", type=int, default=None, help="frames of --interpolate (>= 2) or of a --text-diff sweep")
@click.option("--max-batch", type=int, default=4, help="images per engine call (when exporting engines)")
@click.option("--torch-mode", type=click.Choice(TORCH_MODES), default="eager", help="the torch backend's runtime")
@click.option("--max-images", type=int, default=MAX_IMAGES, help="refuse requests for more images than this")
@click.option("--out", default="out", help="folder for the PNGs")
@click.option("--overwrite", is_flag=True, help="replace existing PNGs of the same name (default: NAME-1.png, ...)")
@click.option("--dump", default=None, help="folder for the intermediates (.npy) and dump.json")
@click.version_option(package_name="unclip-engine")
def main(prompt, prompts_file, **opts):
    """Generate images of PROMPT with unCLIP (an empty PROMPT is unconditional), or vary, blend and edit images
    through their CLIP embeddings (--variation, --interpolate, --text-diff)."""
    warnings_to_stderr()
    try:
        (prompt or "").encode("utf-8")
    except UnicodeEncodeError:
        raise click.ClickException("PROMPT is not valid UTF-8 text; pass the prompt in UTF-8") from None
    names = {f.name for f in fields(Settings)}
    written: list = []
    try:
        settings = Settings(**{k: v for k, v in opts.items() if k in names})
        req = Request(prompt=prompt, prompts=read_prompts(prompts_file) if prompts_file else None, settings=settings,
                      **{k: v for k, v in opts.items() if k not in names})
        if req.model in ("tiny", "small"):
            click.echo(RANDOM.format(req.model), err=True)
        run(req, _progress, lambda m: click.echo(m, err=True), written)
    except (UnclipError, PermissionError) as e:  # PermissionError: a shared folder this user may not use
        raise click.ClickException(one_line(e)) from None
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {len(written)} image(s) were written and kept", err=True)
        for p in written:
            click.echo(str(p))
        sys.exit(130)
    for p in written:
        click.echo(str(p))


if __name__ == "__main__":
    main()
