"""`unclip-export`: every stage to verified ONNX (and TensorRT engines with --trt)."""
from __future__ import annotations

import click
from unclip.core.console import warnings_to_stderr
from unclip.core.errors import UnclipError, one_line
from unclip.core.stages import STAGES


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="demo",
              help="model folder (diffusers layout, e.g. Karlo), or built in: demo (trained shapes world), tiny, small")
@click.option("--out", required=True, help="export folder")
@click.option("--stage", "stages", multiple=True, default=["all"], type=click.Choice(["all", *STAGES]))
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32")
@click.option("--max-batch", type=int, default=4, help="images per call (guided stages take twice this)")
@click.option("--trt", is_flag=True, help="also build TensorRT engines (needs tensorrt and an NVIDIA GPU)")
@click.option("--force", is_flag=True, help="rebuild even when the inputs are unchanged; export into a folder "
              "that holds other files (same names are replaced)")
def main(model, out, stages, precision, max_batch, trt, force):
    """Export MODEL's stages to ONNX in OUT, check each against torch, and write OUT/manifest.json."""
    warnings_to_stderr()
    from unclip.export.onnx_export import export_model
    from unclip.models import resolve_model
    if not out.strip():
        raise click.ClickException("--out needs a folder name (it got an empty one); pass --out DIR")
    if max_batch < 1:
        raise click.ClickException(f"--max-batch must be at least 1, got {max_batch}")
    try:
        if trt:
            from unclip.export.trt import require_tensorrt
            require_tensorrt()
        m = resolve_model(model)

        def progress(r):
            what = "unchanged, skipped" if r.skipped else f"{r.seconds:.1f} s, max err {r.max_abs:.2e}"
            click.echo(f"{r.network:<14} {r.size / 1e6:8.1f} MB  {what}", err=True)

        reports = export_model(m, out, list(stages), precision, max_batch, force, source=model, progress=progress)
        if trt:
            from unclip.export.trt import build_engines
            build_engines(out, force=force, progress=lambda msg: click.echo(msg, err=True))
    except (UnclipError, PermissionError) as e:  # PermissionError: a shared folder this user may not use
        raise click.ClickException(one_line(e)) from None
    click.echo("\n| stage | file size | export time | max error |\n|---|---|---|---|")
    for r in reports:
        click.echo(f"| {r.network} | {r.size / 1e6:.1f} MB | {'skipped' if r.skipped else f'{r.seconds:.1f} s'} "
                   f"| {r.max_abs:.2e} |")


if __name__ == "__main__":
    main()
